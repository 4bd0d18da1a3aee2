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
from sgmft.features.encode import (DEFAULT_MAX_IMAGES, PreparedBatch, check_image_choice, encode_prepared,
                                   prepare_batch, reduce_side)
from sgmft.ingest.images import DEFAULT_MAX_PIXELS, image_bytes_digest
from sgmft.ingest.manifest import Post, Reject, read_manifest, write_rejects
from sgmft.ingest.text import CleanConfig, TextCleaner
from sgmft.labels import DEFAULT_LABELS

log = logging.getLogger("sgmft.extract")
CACHE_VERSION = 3  # 2: images decoded at reduced size, max_images; 3: shards hold text_over/text_cut
# Prepared batches waiting for the model forward, all together (bytes of their tensors).
DEFAULT_PREFETCH_BYTES = 512 * 2**20


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
def _post_key(prefix: bytes, post: Post) -> str:
    h = hashlib.sha256(prefix)
    h.update(json.dumps(post.text, ensure_ascii=False).encode())
    for p in post.images:
        try:
            h.update(image_bytes_digest(p).encode())
        except ImageLoadError as e:
            h.update(f"unreadable:{e.reason}".encode())
    return h.hexdigest()


class _Cache:
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


def extract_features(manifest: str | Path, out_store: str | Path, *, backbone, clean_cfg: CleanConfig | None = None,
                     image_choice: str = "similar", batch_size: int = 32, cache_dir: str | Path | None = None,
                     rejects_path: str | Path | None = None, on_error: str = "skip", progress: bool | None = None,
                     label_names: Sequence[str] = DEFAULT_LABELS, device: str = "auto", dtype: str = "auto",
                     num_workers: int | None = None, num_processes: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS,
                     overwrite: bool = False, keep_cache: bool = True, threads: int | None = None,
                     max_images: int | None = DEFAULT_MAX_IMAGES, prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
                     image_root: str | Path | None = None, allow_any_path: bool = False,
                     field_limits: dict | None = None, _after_batch: Callable[[int], None] | None = None,
                     _engine: Callable[..., ExtractResult] | None = None) -> ExtractResult:
    """Extract features for every valid post of ``manifest`` into the store ``out_store``.

    ``backbone``: a spec for :func:`sgmft.features.backbones.load_backbone` or a ``Backbone``.
    ``image_choice``: ``"similar"`` (the image closest to the text, cosine; the paper's
    manual choice, automated), ``"first"`` (first usable image; later ones are not even
    loaded) or ``"mean"`` (L2-normalised mean of the usable images).
    ``cache_dir``: default ``<out_store>.cache``; deleted at the end unless ``keep_cache``.
    ``on_error="skip"`` records bad rows and images as rejects (also written to
    ``rejects_path`` as JSONL); ``"raise"`` stops at the first problem.
    ``num_processes>1`` spawns that many local worker processes (gloo); under an existing
    ``torch.distributed`` group or ``torchrun`` env, every rank must call this function.
    ``threads``: torch CPU threads per process (default: unchanged; spawned workers get
    ``cpu_count // num_processes``). On CPU, float results depend on the thread count in
    the last bits: runs compare bit for bit only with equal ``threads``.
    ``max_images``: images used per post (the rest are rejected with a reason; ``None`` =
    all). ``prefetch_bytes``: prepared batches waiting for the forward hold at most this
    many bytes (plus one batch). ``image_root`` / ``allow_any_path``: where image paths
    may point (default: inside the manifest's folder; see docs/posts-manifest.md).
    ``field_limits``: ``max_id_chars`` / ``max_user_chars`` / ``max_text_chars`` for
    :func:`~sgmft.ingest.manifest.read_manifest`. Output paths (the store, its cache, the
    rejects file) may not be the manifest (checked before anything is written).
    The same pipeline on Ray Data: :func:`sgmft.features.ray_engine.extract_features_ray`
    (same arguments; the same shards and a byte-identical store at equal ``threads``).
    """
    check_image_choice(image_choice)
    if on_error not in ("skip", "raise"):
        raise InputError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    from sgmft.config import progress_enabled

    progress = progress_enabled(progress)      # None (the default): bars only on a terminal, as the CLI
    out_store = Path(out_store)
    cache_root = Path(cache_dir) if cache_dir is not None else out_store.with_name(out_store.name + ".cache")
    check_outputs({"the manifest": manifest},
                  {"the store (--out)": out_store, "the cache (--cache-dir)": cache_root,
                   "the rejects file (--rejects)": rejects_path})
    kw = dict(clean_cfg=clean_cfg, image_choice=image_choice, batch_size=batch_size, cache_dir=cache_root,
              rejects_path=rejects_path, on_error=on_error, progress=progress, label_names=tuple(label_names),
              device=device, dtype=dtype, num_workers=num_workers, max_pixels=max_pixels,
              overwrite=overwrite, keep_cache=keep_cache, threads=threads, max_images=max_images,
              prefetch_bytes=prefetch_bytes, image_root=image_root, allow_any_path=allow_any_path,
              field_limits=field_limits)
    if _engine is not None:  # another engine (sgmft.features.ray_engine) on the checked arguments
        if num_processes > 1:
            raise InputError("--num-processes is for --engine local; with --engine ray, Ray places the replicas")
        return _engine(Path(manifest), out_store, backbone, **kw)
    if num_processes > 1 and _dist() is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if not isinstance(backbone, str):
            raise InputError("num_processes > 1 needs the backbone as a spec string (each process loads it)")
        return _spawn(num_processes, Path(manifest), out_store, backbone, kw)
    from sgmft.features.backbones.hf_clip import hf_progress_bars

    with hf_progress_bars(progress):             # transformers' "Loading weights" bar follows `progress`
        return _extract(Path(manifest), out_store, backbone, _after_batch=_after_batch, **kw)


def _extract(manifest: Path, out_store: Path, backbone, *, clean_cfg, image_choice, batch_size, cache_dir,
             rejects_path, on_error, progress, label_names, device, dtype, num_workers, max_pixels,
             overwrite, keep_cache, threads=None, max_images=DEFAULT_MAX_IMAGES,
             prefetch_bytes=DEFAULT_PREFETCH_BYTES, image_root=None, allow_any_path=False,
             field_limits=None, _after_batch=None) -> ExtractResult:
    import torch

    t0, started = time.perf_counter(), time.time()
    own_group = _maybe_init_dist()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        d = _dist()
        rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
        if out_store.exists() and not overwrite:
            raise FileExistsError(f"{out_store} already exists; pass overwrite=True (--overwrite) to replace it")
        from sgmft.features.backbones import Backbone, load_backbone

        bb: Backbone = backbone if not isinstance(backbone, str) else load_backbone(
            backbone, device=device, dtype=dtype, batch_size=batch_size)
        cleaner, posts, row_rejects, prefix, cache = _plan(
            manifest, bb, clean_cfg=clean_cfg, image_choice=image_choice, cache_dir=cache_dir, on_error=on_error,
            label_names=label_names, max_pixels=max_pixels, max_images=max_images, image_root=image_root,
            allow_any_path=allow_any_path, field_limits=field_limits)
        from sgmft.features.backbones.precision import maybe_compile

        maybe_compile(bb, len(posts))  # opt-in torch.compile (SGMFT_COMPILE; docs/scale.md)
        base = manifest.resolve().parent
        n_batches = (len(posts) + batch_size - 1) // batch_size
        mine = [b for b in range(n_batches) if b % world == rank]
        tok_lock = threading.Lock()
        budget = _OrderedBudget(prefetch_bytes)

        def prepare(b: int, turn: int) -> _Job:
            try:
                batch = posts[b * batch_size:(b + 1) * batch_size]
                keys = [_post_key(prefix, p) for p in batch]
                if cache.valid(keys):
                    job = _Job(b, keys, cached=True)
                else:
                    job = _Job(b, keys, cached=False, prepared=prepare_batch(
                        bb, cleaner, batch, image_choice, max_pixels=max_pixels, base=base, on_error=on_error,
                        tokenize_lock=tok_lock, max_images=max_images))
            except BaseException:
                budget.acquire(turn, 0)  # pass the turn on; the consumer will raise
                raise
            job.held = budget.acquire(turn, job.prepared.nbytes if job.prepared is not None else 0)
            return job

        def encode(job: _Job) -> None:
            e = encode_prepared(bb, job.prepared, image_choice)
            cache.put(job.keys, e.text, e.image, e.text_mask, e.image_mask, e.rejects, e.text_over, e.text_cut)

        from tqdm.auto import tqdm

        n_mine = sum(min(batch_size, len(posts) - b * batch_size) for b in mine)
        bar = tqdm(total=n_mine, unit="post", desc=f"extract[{rank}/{world}]" if world > 1 else "extract",
                   disable=not progress or (rank != 0), dynamic_ncols=True)
        hits = encoded = 0
        my_keys: dict[int, list[str]] = {}
        workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sgmft-load") as pool:
            # Prepare (hash, clean, decode, preprocess) up to `workers + 1` batches ahead of the
            # forward pass. Futures are consumed in order; results never depend on timing.
            ahead = max(1, workers) + 1
            # Memory: besides this count, the prepared tensors waiting here are bounded in
            # bytes by `budget` (prefetch_bytes), taken in post order (_OrderedBudget).
            futs = OrderedDict((b, pool.submit(prepare, b, i)) for i, b in enumerate(mine[:ahead]))
            nxt = len(futs)
            try:
                while futs:
                    b, fut = futs.popitem(last=False)
                    pr = fut.result()
                    if nxt < len(mine):
                        futs[mine[nxt]] = pool.submit(prepare, mine[nxt], nxt)
                        nxt += 1
                    if not pr.cached:
                        encode(pr)
                    pr.prepared = None
                    budget.release(pr.held)
                    my_keys[b] = pr.keys
                    encoded += 0 if pr.cached else len(pr.keys)
                    hits += len(pr.keys) if pr.cached else 0
                    bar.update(len(pr.keys))
                    if _after_batch is not None:
                        _after_batch(b)
            finally:
                budget.abort()
                for f in futs.values():
                    f.cancel()
                bar.close()

        stats = _gather((hits, encoded, my_keys))
        hits, encoded = sum(x[0] for x in stats), sum(x[1] for x in stats)
        batch_keys = {b: k for x in stats for b, k in x[2].items()}
        if d is not None:
            d.barrier()
        result = None
        if rank == 0:
            _remove_stale_tmp(cache, started)
            result = _assemble(out_store, posts, [batch_keys[b] for b in range(n_batches)], row_rejects, cache,
                               bb, cleaner, image_choice, label_names, manifest, rejects_path, overwrite,
                               hits, encoded, world, t0)
            if not keep_cache:
                import shutil

                shutil.rmtree(cache_dir, ignore_errors=True)
        if d is not None:
            result = _gather(result)[0]
            d.barrier()
        return result
    finally:
        torch.set_num_threads(old_threads)
        if own_group and _dist() is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _plan(manifest: Path, bb, *, clean_cfg, image_choice, cache_dir, on_error, label_names, max_pixels, max_images,
          image_root, allow_any_path, field_limits):
    """What every engine (local, torch.distributed, Ray) starts from: the text cleaner, the
    valid posts and the manifest-row rejects, the cache-key prefix and the shard cache.
    Batch ``b`` is always ``posts[b*batch_size:(b+1)*batch_size]``."""
    cleaner = TextCleaner(clean_cfg)
    posts, row_rejects = read_manifest(manifest, label_names=label_names, check_images=True,
                                       on_error="raise" if on_error == "raise" else "skip",
                                       image_root=image_root, allow_any_path=allow_any_path,
                                       **(field_limits or {}))
    prefix = json.dumps({"v": CACHE_VERSION, "backbone": bb.fingerprint(), "clean": cleaner.fingerprint(),
                         "choice": image_choice, "max_pixels": max_pixels, "max_images": max_images,
                         "reduce_to": reduce_side(bb)}, sort_keys=True).encode()
    cache = _Cache(cache_dir, salt=f"v{CACHE_VERSION} image-chunk {bb.batch_size}")
    return cleaner, posts, row_rejects, prefix, cache


def _remove_stale_tmp(cache: "_Cache", started: float) -> None:
    """Partial shard writes of killed earlier runs (older than this run's start)."""
    for f in cache.shards.glob(".*.tmp"):
        try:
            if f.stat().st_mtime < started:
                f.unlink()
        except OSError:
            pass


def _assemble(out_store, posts, batch_keys, row_rejects, cache, bb, cleaner, image_choice, label_names,
              manifest, rejects_path, overwrite, hits, encoded, world, t0) -> ExtractResult:
    """Rank 0: stream every batch's shard (written by any rank) into the feature store."""
    n = len(posts)
    lab_idx = {name: i for i, name in enumerate(label_names)}
    splits = [p.split for p in posts]
    with_split = n > 0 and all(splits) and {"train", "test"} <= set(splits)
    if any(splits) and not with_split:
        import warnings

        from sgmft.errors import SgmftWarning

        warnings.warn(f"split field omitted from the store: {sum(map(bool, splits))} of {n} posts have one, and "
                      "the store's split needs one on every post with train and test non-empty "
                      "(docs/posts-manifest.md)", SgmftWarning, stacklevel=2)
    # ids and users each get their own fixed width (field limits cap both: --max-id-chars, --max-user-chars)
    width = max([1] + [len(p.id) for p in posts])
    uwidth = max([1] + [len(p.user) for p in posts])
    extra = {"clean_config": asdict(cleaner.cfg), "clean_fingerprint": cleaner.fingerprint(),
             "image_choice": image_choice, "manifest": str(Path(manifest).resolve()),
             "backbone_fingerprint": bb.fingerprint(), "backbone_precision": bb.precision}
    img_rejects: list[Reject] = []
    n_text_missing = n_image_missing = n_text_over = n_text_cut = 0
    with FeatureStoreWriter(out_store, num_posts=n, dim=bb.dim, label_names=label_names, backbone=bb.spec,
                            normalization="l2", with_labels=True, with_users=True, with_split=with_split,
                            with_masks=True, extra=extra, overwrite=overwrite, id_width=width,
                            user_width=uwidth) as w:
        start = 0
        for keys in batch_keys:
            try:
                z = cache.get(keys)
            except CorruptShardError as e:  # damaged after this run checked or wrote it
                cache.path(keys).unlink(missing_ok=True)
                raise CorruptShardError(e.path, "damaged during this run; it was deleted: run the same "
                                        "command again to recompute it") from None
            part = posts[start:start + len(keys)]
            n_text_missing += int((~z["text_mask"]).sum())
            n_image_missing += int((~z["image_mask"]).sum())
            n_text_over += int(z["text_over"].sum()) if "text_over" in z else 0
            n_text_cut += int(z["text_cut"].sum()) if "text_cut" in z else 0
            for p, rej in zip(part, z["rejects"]):
                img_rejects.extend(Reject(p.line, p.id, "images", reason, stage="extract") for _, reason in rej)
            w.write(start, ids=[p.id for p in part], users=[p.user for p in part], text=z["text"],
                    image=z["image"], text_mask=z["text_mask"], image_mask=z["image_mask"],
                    labels=np.array([lab_idx[p.label] if p.label is not None else -1 for p in part], np.int64),
                    split=[p.split for p in part] if with_split else None)
            start += len(keys)
    rejects = sorted(list(row_rejects) + img_rejects, key=lambda r: r.line)
    if rejects_path is not None:
        write_rejects(rejects_path, rejects)
    res = ExtractResult(Path(out_store), n, len(rejects), hits, encoded, n_text_missing, n_image_missing,
                        len(img_rejects), time.perf_counter() - t0, world, cache.root,
                        Path(rejects_path) if rejects_path is not None else None, rejects,
                        text_over=n_text_over, text_cut=n_text_cut)
    log.info("extracted %d posts (%d from cache, %d encoded), %d rejects, %.1fs", n, hits, encoded,
             len(rejects), res.seconds)
    return res


# -- local multi-process launcher (torchrun does the same across nodes) -----------------------
def _spawn_worker(rank: int, world: int, port: int, manifest: Path, out_store: Path, backbone: str,
                  kw: dict, ret: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not kw.get("threads"):  # share the CPU cores instead of oversubscribing them
        kw = dict(kw, threads=max(1, (os.cpu_count() or 1) // world))
    res = _extract(manifest, out_store, backbone, **kw)
    if rank == 0:
        import pickle

        Path(ret).write_bytes(pickle.dumps(res))


def _spawn(world: int, manifest: Path, out_store: Path, backbone: str, kw: dict) -> ExtractResult:
    import pickle
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="sgmft-extract-") as td:
        ret = str(Path(td) / "result.pkl")
        mp.start_processes(_spawn_worker, args=(world, port, manifest, out_store, backbone, kw, ret),
                           nprocs=world, join=True, start_method="spawn")
        return pickle.loads(Path(ret).read_bytes())
