"""The shard cache and the store assembly that every extraction engine shares.

Each finished batch of posts is one ``.npz`` shard, named by the hash of its posts' content
keys (:func:`post_key`), in a :class:`ShardCache`; :func:`assemble_store` streams the
batches' posts and shards, in post order, into a feature store and writes the rejects.
Used by the local engine (:mod:`sgmft.features.extract`), the Ray engine
(:mod:`sgmft.features.ray_engine`) and ``predict --engine ray`` (:mod:`sgmft.predict.ray_predict`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sgmft.atomic import atomic_file
from sgmft.errors import ImageLoadError, InputError
from sgmft.features import FeatureStoreWriter
from sgmft.features.encode import reduce_side
from sgmft.features.extract_options import ExtractOptions
from sgmft.ingest.images import image_bytes_digest
from sgmft.ingest.manifest import Post, Reject, write_rejects
from sgmft.ingest.text import TextCleaner

__all__ = ["CACHE_VERSION", "CorruptShardError", "ExtractResult", "ShardCache", "SplitCount", "StoreTarget",
           "assemble_store", "load_shard", "post_key", "remove_stale_tmp", "setup"]

log = logging.getLogger("sgmft.extract")
CACHE_VERSION = 3  # 2: images decoded at reduced size, max_images; 3: shards hold text_over/text_cut


@dataclass
class ExtractResult:
    """What :func:`extract_features` did. Counts are over the whole run (all ranks)."""

    store_path: Path
    num_posts: int            # rows in the store
    num_rejects: int          # manifest-row rejects + image rejects
    cached_hits: int          # posts taken from the cache (not encoded again)
    encoded: int              # posts encoded in this run
    text_missing: int         # posts with text_mask False (empty after cleaning)
    image_missing: int        # posts with image_mask False (no usable image)
    images_rejected: int      # image files that failed to load
    seconds: float
    world_size: int = 1
    cache_dir: Path | None = None
    rejects_path: Path | None = None
    rejects: list[Reject] = field(default_factory=list, repr=False)
    engine: dict | None = None  # --engine ray: replicas, threads, start-up and run seconds
    text_over: int = 0          # posts whose text is longer than the text encoder's context (long_text applied)
    text_cut: int = 0           # posts whose text the encoder saw only in part (CleanConfig.long_text)

    def to_dict(self, first_rejects: int = 10) -> dict:
        """The result as JSON, with the key names of ``sgmft extract --json`` (which prints
        this dict plus the backbone, D, image choice and engine name): ``rejects`` and
        ``cached`` are :attr:`num_rejects` and :attr:`cached_hits`."""
        doc = {"store": str(self.store_path), "num_posts": self.num_posts, "encoded": self.encoded,
               "cached": self.cached_hits, "seconds": round(self.seconds, 2), "processes": self.world_size,
               "text_missing": self.text_missing, "image_missing": self.image_missing, "rejects": self.num_rejects,
               "rows_rejected": len({r.line for r in self.rejects if r.stage == "manifest"}),
               "images_rejected": self.images_rejected,
               "rejects_path": None if self.rejects_path is None else str(self.rejects_path),
               "first_rejects": [r.to_dict() for r in self.rejects[:first_rejects]]}
        if self.engine:
            doc["ray"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.engine.items()}
        doc.update(text_over_limit=self.text_over, text_cut=self.text_cut)
        return doc


# -- cache -------------------------------------------------------------------------------------
def post_key(prefix: bytes, post: Post) -> str:
    """A post's content key: ``prefix`` (backbone, cleaning, image settings), its text and image bytes."""
    h = hashlib.sha256(prefix)
    h.update(json.dumps(post.text, ensure_ascii=False).encode())
    for p in post.images:
        try:
            h.update(image_bytes_digest(p).encode())
        except ImageLoadError as e:
            h.update(f"unreadable:{e.reason}".encode())
    return h.hexdigest()


class ShardCache:
    """One atomically written ``.npz`` shard per finished batch, under ``root/shards``.

    A shard's name is the hash of its batch's post keys (and the backbone batch size), so
    it is found again by content; a batch is either entirely cached or encoded again.
    """

    def __init__(self, root: Path, salt: str):
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.salt = salt

    def path(self, keys: list[str]) -> Path:
        return self.shards / (hashlib.sha256("\n".join([self.salt, *keys]).encode()).hexdigest()[:40] + ".npz")

    def put(self, keys: list[str], text, image, text_mask, image_mask, rejects: list[list],
            text_over=None, text_cut=None) -> Path:
        n = len(keys)
        with atomic_file(self.path(keys), "wb") as f:
            np.savez(f, keys=np.asarray(keys), text=text, image=image, text_mask=text_mask,
                     image_mask=image_mask, rejects=np.asarray(json.dumps(rejects, ensure_ascii=False)),
                     text_over=np.zeros(n, bool) if text_over is None else text_over,
                     text_cut=np.zeros(n, bool) if text_cut is None else text_cut)
        return self.path(keys)

    _FIELDS = ("keys", "text", "image", "text_mask", "image_mask", "rejects")

    def get(self, keys: list[str]) -> dict[str, Any]:
        """The shard of ``keys``; :class:`CorruptShardError` (naming the file) if it is
        unreadable (truncated, not a zip, a missing array) or holds other posts."""
        p = self.path(keys)
        try:
            with np.load(p, allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
            missing = [k for k in self._FIELDS if k not in out]
            if missing:
                raise ValueError(f"missing array(s) {missing}")
            if out["keys"].tolist() != list(keys):
                raise ValueError("it does not hold the expected posts")
            n = len(keys)
            if len(out["text"]) != n or len(out["image"]) != n or len(out["text_mask"]) != n:
                raise ValueError("wrong row count")
            out["rejects"] = json.loads(str(out["rejects"]))
            if not isinstance(out["rejects"], list) or len(out["rejects"]) != n:
                raise ValueError("bad rejects record")
        except FileNotFoundError:
            raise
        except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, ...
            raise CorruptShardError(p, f"{type(e).__name__}: {e}") from None
        return out

    def get_named(self, name: str) -> dict[str, Any]:
        """The shard file ``name`` (as :meth:`path` gives it), checked to hold the posts its name says."""
        p = self.shards / name
        keys = self._keys_in(p)
        if self.path(keys).name != name:
            raise CorruptShardError(p, "it does not hold the posts its name says")
        return self.get(keys)

    @staticmethod
    def _keys_in(p: Path) -> list[str]:
        try:
            with np.load(p, allow_pickle=False) as z:
                return z["keys"].tolist()
        except FileNotFoundError:
            raise
        except Exception as e:
            raise CorruptShardError(p, f"{type(e).__name__}: {e}") from None

    def valid(self, keys: list[str]) -> bool:
        """True if the shard exists and reads back whole. A corrupt shard is reported in one
        warning line naming the file and deleted, so that its batch is encoded again."""
        p = self.path(keys)
        if not p.is_file():
            return False
        try:
            self.get(keys)
            return True
        except CorruptShardError as e:
            log.warning("%s; recomputing its batch", e)
            try:
                p.unlink()
            except OSError:
                pass
            return False


class CorruptShardError(InputError):
    """A cache shard that cannot be read back (its batch is recomputed)."""

    def __init__(self, path: Path, why: str):
        self.path = Path(path)
        super().__init__(f"corrupt cache shard {path} ({why})")


def setup(bb, o: ExtractOptions):
    """What every engine (local, torch.distributed, Ray) starts from besides the posts: the
    text cleaner, the cache-key prefix and the shard cache (in ``o.cache_dir``). Batch ``b``
    is always posts ``[b*batch_size, (b+1)*batch_size)`` of the validated manifest."""
    cleaner = TextCleaner(o.clean_cfg)
    prefix = json.dumps({"v": CACHE_VERSION, "backbone": bb.fingerprint(), "clean": cleaner.fingerprint(),
                         "choice": o.image_choice, "max_pixels": o.max_pixels, "max_images": o.max_images,
                         "reduce_to": reduce_side(bb)}, sort_keys=True).encode()
    cache = ShardCache(o.cache_dir, salt=f"v{CACHE_VERSION} image-chunk {bb.batch_size}")
    return cleaner, prefix, cache


def remove_stale_tmp(cache: "ShardCache", started: float) -> None:
    """Partial shard writes of killed earlier runs (older than this run's start)."""
    for f in cache.shards.glob(".*.tmp"):
        try:
            if f.stat().st_mtime < started:
                f.unlink()
        except OSError:
            pass


@dataclass
class SplitCount:
    """How many posts have a split, and which values: decides whether the store gets ``split.npy``
    (every post has one, train and test non-empty). Counted as posts stream past."""

    n: int = 0
    with_split: int = 0
    values: set = field(default_factory=set)

    def add(self, posts: Sequence[Post]) -> None:
        self.n += len(posts)
        for p in posts:
            if p.split:
                self.with_split += 1
                self.values.add(p.split)

    def keep(self) -> bool:
        """True if the store gets the split; warns (once) when some posts have one but it is dropped."""
        ok = self.n > 0 and self.with_split == self.n and {"train", "test"} <= self.values
        if self.with_split and not ok:
            import warnings

            from sgmft.errors import SgmftWarning

            warnings.warn(f"split field omitted from the store: {self.with_split} of {self.n} posts have one, and "
                          "the store's split needs one on every post with train and test non-empty "
                          "(docs/posts-manifest.md)", SgmftWarning, stacklevel=3)
        return ok


def load_shard(cache: "ShardCache", keys: list[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """A finished batch's shard, by its posts' keys or by its file name; a shard damaged after
    this run checked or wrote it is deleted and reported."""
    try:
        return cache.get(keys) if keys is not None else cache.get_named(name)
    except CorruptShardError as e:
        e.path.unlink(missing_ok=True)
        raise CorruptShardError(e.path, "damaged during this run; it was deleted: run the same "
                                "command again to recompute it") from None


@dataclass
class StoreTarget:
    """What the store assembly writes, besides the rows: the store, its contract and the rejects."""

    out_store: Path
    bb: Any                      # a Backbone, or ray_engine.BackboneInfo
    cleaner: TextCleaner
    image_choice: str
    label_names: Sequence[str]
    manifest: Path
    rejects_path: Path | None
    overwrite: bool
    cache_root: Path | None = None


def assemble_store(t: StoreTarget, parts, splits: SplitCount, row_rejects: Sequence[Reject], hits: int, encoded: int,
              world: int, t0: float) -> ExtractResult:
    """Stream ``parts`` (``(posts, shard)`` per batch, in post order; ``splits`` counted over
    all of them beforehand) into the feature store, then write the rejects (manifest rows and
    images, by line). Holds one batch at a time: the store's writer memory-maps its files."""
    n, with_split = splits.n, splits.keep()
    lab_idx = {name: i for i, name in enumerate(t.label_names)}
    extra = {"clean_config": asdict(t.cleaner.cfg), "clean_fingerprint": t.cleaner.fingerprint(),
             "image_choice": t.image_choice, "manifest": str(Path(t.manifest).resolve()),
             "backbone_fingerprint": t.bb.fingerprint(), "backbone_precision": t.bb.precision}
    img_rejects: list[Reject] = []
    counts = np.zeros(4, np.int64)  # text missing, image missing, text over the context, text cut
    # ids and users are UTF-8 bytes plus offsets (store v2): no width to know beforehand
    with FeatureStoreWriter(t.out_store, num_posts=n, dim=t.bb.dim, label_names=t.label_names, backbone=t.bb.spec,
                            normalization="l2", with_labels=True, with_users=True, with_split=with_split,
                            with_masks=True, extra=extra, overwrite=t.overwrite) as w:
        start = 0
        for part, z in parts:
            if len(part) != len(z["text"]):
                raise RuntimeError(f"batch at row {start}: {len(part)} posts but its shard has {len(z['text'])} rows")
            counts += [int((~z["text_mask"]).sum()), int((~z["image_mask"]).sum()),
                       int(z["text_over"].sum()) if "text_over" in z else 0,
                       int(z["text_cut"].sum()) if "text_cut" in z else 0]
            for p, rej in zip(part, z["rejects"]):
                img_rejects.extend(Reject(p.line, p.id, "images", reason, stage="extract") for _, reason in rej)
            w.write(start, ids=[p.id for p in part], users=[p.user for p in part], text=z["text"],
                    image=z["image"], text_mask=z["text_mask"], image_mask=z["image_mask"],
                    labels=np.array([lab_idx[p.label] if p.label is not None else -1 for p in part], np.int64),
                    split=[p.split for p in part] if with_split else None)
            start += len(part)
        if start != n:
            raise RuntimeError(f"the batches hold {start} posts, the manifest {n}")
    rejects = sorted(list(row_rejects) + img_rejects, key=lambda r: r.line)
    if t.rejects_path is not None:
        write_rejects(t.rejects_path, rejects)
    res = ExtractResult(Path(t.out_store), n, len(rejects), hits, encoded, int(counts[0]), int(counts[1]),
                        len(img_rejects), time.perf_counter() - t0, world, t.cache_root,
                        Path(t.rejects_path) if t.rejects_path is not None else None, rejects,
                        text_over=int(counts[2]), text_cut=int(counts[3]))
    log.info("extracted %d posts (%d from cache, %d encoded), %d rejects, %.1fs", n, hits, encoded,
             len(rejects), res.seconds)
    return res
