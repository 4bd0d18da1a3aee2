"""``sgmft extract``: raw posts (manifest + image files) -> a feature store.

Pipeline per post: validate the manifest row, then the shared encode path of
:mod:`sgmft.features.encode` (clean the text, load every image robustly, encode text and
images with a frozen :class:`Backbone`, choose one image vector with ``image_choice``; a
bad image file becomes a reject with field ``images`` and the post keeps its other
images), and write the store with ``text_mask`` / ``image_mask`` (False + a zero row when
a modality is missing).

Work is done in *batches aligned to post order* (batch b = posts ``[b*B, (b+1)*B)``), so
every run, resumed or distributed, forms identical batches and hence bit-identical
features. Each finished batch is written atomically to the cache as one ``.npz`` shard of
per-post results keyed by a content hash (backbone fingerprint, cleaner fingerprint,
image choice, raw text, image bytes digests): a re-run skips finished batches, a killed
run loses at most the batches in flight. Under ``torch.distributed`` (``torchrun``, or
``num_processes>1`` here) rank r encodes batches ``b % world == r``; rank 0 assembles
the store after a barrier. See docs/extract.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sgmft.atomic import atomic_file, check_outputs
from sgmft.errors import ImageLoadError
from sgmft.features import FeatureStoreWriter
from sgmft.features.encode import PreparedBatch, encode_prepared, prepare_batch, reduce_side
from sgmft.features.extract_options import DEFAULT_PREFETCH_BYTES, ExtractOptions  # noqa: F401  (re-exported)
from sgmft.ingest.images import image_bytes_digest
from sgmft.ingest.manifest import Post, Reject, read_manifest, write_rejects
from sgmft.ingest.text import TextCleaner

log = logging.getLogger("sgmft.extract")
CACHE_VERSION = 3  # 2: images decoded at reduced size, max_images; 3: shards hold text_over/text_cut


class _OrderedBudget:
    """Bytes of prepared-but-not-yet-encoded batches. Batches take their share in post
    order (a batch waits for its turn and for room), and the consumer, which encodes in
    the same order, gives it back; so the batch the consumer waits for always gets in
    (everything before it was released) and prefetch never holds more than ``capacity``
    bytes beyond one batch. ``abort()`` wakes every waiter (the consumer stopped)."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self.turn, self.aborted = int(capacity), 0, 0, False
        self.peak = 0
        self._cv = threading.Condition()

    def acquire(self, turn: int, n: int) -> int:
        n = max(0, min(int(n), self.capacity))
        with self._cv:
            while not self.aborted and (self.turn != turn or self.used + n > self.capacity):
                self._cv.wait()
            if self.aborted:
                return 0
            self.used += n
            self.peak = max(self.peak, self.used)
            self.turn += 1
            self._cv.notify_all()
        return n

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()

    def abort(self) -> None:
        with self._cv:
            self.aborted = True
            self._cv.notify_all()


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


# -- distributed helpers -----------------------------------------------------------------------
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _maybe_init_dist() -> bool:
    """Join a process group described by torchrun-style env vars; True if we created it."""
    import torch.distributed as dist

    if _dist() is not None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    # Only barriers and small Python objects cross ranks, so gloo is enough even on GPUs.
    dist.init_process_group("gloo")
    return True


def _gather(obj: Any) -> list[Any]:
    d = _dist()
    if d is None:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


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


from sgmft.errors import InputError  # noqa: E402  (user errors: SgmftError and ValueError)


_Cache = ShardCache  # the older name


class CorruptShardError(InputError):
    """A cache shard that cannot be read back (its batch is recomputed)."""

    def __init__(self, path: Path, why: str):
        self.path = Path(path)
        super().__init__(f"corrupt cache shard {path} ({why})")


# -- per-batch work ----------------------------------------------------------------------------
@dataclass
class _Job:
    """One batch of posts: its content keys, and its prepared inputs unless already cached."""

    b: int
    keys: list[str]                      # per post: content key
    cached: bool
    prepared: PreparedBatch | None = None
    held: int = 0                        # bytes of the prefetch budget this job holds


def extract_features(manifest: str | Path, out_store: str | Path, *, backbone,
                     options: ExtractOptions | None = None, engine: str | None = None,
                     _after_batch: Callable[[int], None] | None = None, **kwargs: Any) -> ExtractResult:
    """Extract features for every valid post of ``manifest`` into the store ``out_store``.

    ``backbone``: a spec for :func:`sgmft.features.backbones.load_backbone` or a ``Backbone``
    (``engine="ray"`` and ``num_processes > 1`` need the spec: every process loads it).
    ``options``: an :class:`~sgmft.features.extract_options.ExtractOptions` (every option,
    typed and checked, documented there); ``engine`` and ``**kwargs`` (its field names, the
    older call form) override its fields: ``extract_features(m, out, backbone=spec,
    engine="ray", batch_size=64)``. ``engine="local"``: this process (``num_processes > 1``
    spawns that many local workers, gloo; under ``torchrun`` or an existing
    ``torch.distributed`` group every rank calls this function). ``engine="ray"``: the same
    pipeline on Ray Data (:mod:`sgmft.features.ray_engine`): the same shards and a
    byte-identical store at equal ``threads``, with a driver whose memory does not grow with
    the manifest. Output paths (the store, its cache, the rejects file) may not be the
    manifest (checked before anything is written).
    """
    o = ExtractOptions.of(options, engine=engine, **kwargs)
    from sgmft.config import progress_enabled

    out_store = Path(out_store)
    o = o.replace(progress=progress_enabled(o.progress),  # None: bars only on a terminal, as the CLI
                  cache_dir=o.cache_dir or out_store.with_name(out_store.name + ".cache"))
    check_outputs({"the manifest": manifest},
                  {"the store (--out)": out_store, "the cache (--cache-dir)": o.cache_dir,
                   "the rejects file (--rejects)": o.rejects_path})
    if o.engine == "ray":
        from sgmft.features.ray_engine import run_extract_ray

        return run_extract_ray(Path(manifest), out_store, backbone, o)
    if o.num_processes > 1 and _dist() is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if not isinstance(backbone, str):
            raise InputError("num_processes > 1 needs the backbone as a spec string (each process loads it)")
        return _spawn(o.num_processes, Path(manifest), out_store, backbone, o)
    from sgmft.features.backbones.hf_clip import hf_progress_bars

    with hf_progress_bars(o.progress):             # transformers' "Loading weights" bar follows `progress`
        return _extract(Path(manifest), out_store, backbone, o, _after_batch=_after_batch)


def _extract(manifest: Path, out_store: Path, backbone, o: ExtractOptions, _after_batch=None) -> ExtractResult:
    """The local engine (one rank of it): read, encode this rank's batches, rank 0 assembles."""
    import torch

    t0, started = time.perf_counter(), time.time()
    own_group = _maybe_init_dist()
    old_threads = torch.get_num_threads()
    if o.threads:
        torch.set_num_threads(int(o.threads))
    try:
        d = _dist()
        rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
        if out_store.exists() and not o.overwrite:
            raise FileExistsError(f"{out_store} already exists; pass overwrite=True (--overwrite) to replace it")
        from sgmft.features.backbones import Backbone, load_backbone

        bb: Backbone = backbone if not isinstance(backbone, str) else load_backbone(
            backbone, device=o.device, dtype=o.dtype, batch_size=o.batch_size)
        cleaner, prefix, cache = _setup(bb, o)
        posts, row_rejects = read_manifest(manifest, **o.reader_options())
        from sgmft.features.backbones.precision import maybe_compile

        maybe_compile(bb, len(posts))  # opt-in torch.compile (SGMFT_COMPILE; docs/scale.md)
        enc = _LocalEncoder(bb, cleaner, prefix, cache, o, manifest.resolve().parent)
        stats = _gather(enc.run(posts, rank, world, _after_batch))
        hits, encoded = sum(x[0] for x in stats), sum(x[1] for x in stats)
        batch_keys = {b: k for x in stats for b, k in x[2].items()}
        if d is not None:
            d.barrier()
        result = None
        if rank == 0:
            _remove_stale_tmp(cache, started)
            splits = SplitCount()
            splits.add(posts)
            B = o.batch_size
            parts = ((posts[b * B:(b + 1) * B], _shard(cache, batch_keys[b])) for b in range(len(batch_keys)))
            target = _Target(out_store, bb, cleaner, o.image_choice, o.label_names, manifest, o.rejects_path,
                             o.overwrite, cache.root)
            result = _assemble(target, parts, splits, row_rejects, hits, encoded, world, t0)
            if not o.keep_cache:
                import shutil

                shutil.rmtree(o.cache_dir, ignore_errors=True)
        if d is not None:
            result = _gather(result)[0]
            d.barrier()
        return result
    finally:
        torch.set_num_threads(old_threads)
        if own_group and _dist() is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


@dataclass
class _LocalEncoder:
    """This rank's batches (``b % world == rank``), prepared by a thread pool ahead of the
    forward pass, encoded in order, each written as its shard (or found in the cache)."""

    bb: Any
    cleaner: TextCleaner
    prefix: bytes
    cache: "ShardCache"
    o: ExtractOptions
    base: Path

    def prepare(self, posts: list[Post], b: int, turn: int, budget: _OrderedBudget, tok_lock) -> _Job:
        o = self.o
        try:
            batch = posts[b * o.batch_size:(b + 1) * o.batch_size]
            keys = [post_key(self.prefix, p) for p in batch]
            if self.cache.valid(keys):
                job = _Job(b, keys, cached=True)
            else:
                job = _Job(b, keys, cached=False, prepared=prepare_batch(
                    self.bb, self.cleaner, batch, o.image_choice, max_pixels=o.max_pixels, base=self.base,
                    on_error=o.on_error, tokenize_lock=tok_lock, max_images=o.max_images))
        except BaseException:
            budget.acquire(turn, 0)  # pass the turn on; the consumer will raise
            raise
        job.held = budget.acquire(turn, job.prepared.nbytes if job.prepared is not None else 0)
        return job

    def encode(self, job: _Job) -> None:
        e = encode_prepared(self.bb, job.prepared, self.o.image_choice)
        self.cache.put(job.keys, e.text, e.image, e.text_mask, e.image_mask, e.rejects, e.text_over, e.text_cut)

    def run(self, posts: list[Post], rank: int, world: int, after_batch=None) -> tuple[int, int, dict]:
        """(posts from the cache, posts encoded, {batch: its keys}) of this rank's batches."""
        o, B = self.o, self.o.batch_size
        mine = [b for b in range((len(posts) + B - 1) // B) if b % world == rank]
        tok_lock, budget = threading.Lock(), _OrderedBudget(o.prefetch_bytes)
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(min(B, len(posts) - b * B) for b in mine), unit="post",
                   desc=f"extract[{rank}/{world}]" if world > 1 else "extract",
                   disable=not o.progress or (rank != 0), dynamic_ncols=True)
        hits = encoded = 0
        my_keys: dict[int, list[str]] = {}
        workers = max(1, o.num_workers if o.num_workers is not None else min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sgmft-load") as pool:
            # Prepare (hash, clean, decode, preprocess) up to `workers + 1` batches ahead of the
            # forward pass. Futures are consumed in order; results never depend on timing.
            # Memory: besides this count, the prepared tensors waiting here are bounded in
            # bytes by `budget` (prefetch_bytes), taken in post order (_OrderedBudget).
            submit = lambda i: pool.submit(self.prepare, posts, mine[i], i, budget, tok_lock)  # noqa: E731
            futs = OrderedDict((mine[i], submit(i)) for i in range(min(len(mine), workers + 1)))
            nxt = len(futs)
            try:
                while futs:
                    b, fut = futs.popitem(last=False)
                    pr = fut.result()
                    if nxt < len(mine):
                        futs[mine[nxt]] = submit(nxt)
                        nxt += 1
                    if not pr.cached:
                        self.encode(pr)
                    pr.prepared = None
                    budget.release(pr.held)
                    my_keys[b] = pr.keys
                    encoded += 0 if pr.cached else len(pr.keys)
                    hits += len(pr.keys) if pr.cached else 0
                    bar.update(len(pr.keys))
                    if after_batch is not None:
                        after_batch(b)
            finally:
                budget.abort()
                for f in futs.values():
                    f.cancel()
                bar.close()
        return hits, encoded, my_keys


def _setup(bb, o: ExtractOptions):
    """What every engine (local, torch.distributed, Ray) starts from besides the posts: the
    text cleaner, the cache-key prefix and the shard cache (in ``o.cache_dir``). Batch ``b``
    is always posts ``[b*batch_size, (b+1)*batch_size)`` of the validated manifest."""
    cleaner = TextCleaner(o.clean_cfg)
    prefix = json.dumps({"v": CACHE_VERSION, "backbone": bb.fingerprint(), "clean": cleaner.fingerprint(),
                         "choice": o.image_choice, "max_pixels": o.max_pixels, "max_images": o.max_images,
                         "reduce_to": reduce_side(bb)}, sort_keys=True).encode()
    cache = ShardCache(o.cache_dir, salt=f"v{CACHE_VERSION} image-chunk {bb.batch_size}")
    return cleaner, prefix, cache


def _remove_stale_tmp(cache: "ShardCache", started: float) -> None:
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


def _shard(cache: "ShardCache", keys: list[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """A finished batch's shard, by its posts' keys or by its file name; a shard damaged after
    this run checked or wrote it is deleted and reported."""
    try:
        return cache.get(keys) if keys is not None else cache.get_named(name)
    except CorruptShardError as e:
        e.path.unlink(missing_ok=True)
        raise CorruptShardError(e.path, "damaged during this run; it was deleted: run the same "
                                "command again to recompute it") from None


@dataclass
class _Target:
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


def _assemble(t: _Target, parts, splits: SplitCount, row_rejects: Sequence[Reject], hits: int, encoded: int,
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


# -- local multi-process launcher (torchrun does the same across nodes) -----------------------
def _spawn_worker(rank: int, world: int, port: int, manifest: Path, out_store: Path, backbone: str,
                  o: ExtractOptions, ret: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not o.threads:  # share the CPU cores instead of oversubscribing them
        o = o.replace(threads=max(1, (os.cpu_count() or 1) // world))
    res = _extract(manifest, out_store, backbone, o)
    if rank == 0:
        import pickle

        Path(ret).write_bytes(pickle.dumps(res))


def _spawn(world: int, manifest: Path, out_store: Path, backbone: str, o: ExtractOptions) -> ExtractResult:
    import pickle
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="sgmft-extract-") as td:
        ret = str(Path(td) / "result.pkl")
        mp.start_processes(_spawn_worker, args=(world, port, manifest, out_store, backbone, o, ret),
                           nprocs=world, join=True, start_method="spawn")
        return pickle.loads(Path(ret).read_bytes())


_post_key = post_key  # the older name
