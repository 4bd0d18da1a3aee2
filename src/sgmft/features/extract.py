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

import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sgmft.errors import InputError
from sgmft.features.encode import PreparedBatch, encode_prepared, prepare_batch
from sgmft.features.extract_options import DEFAULT_PREFETCH_BYTES, ExtractOptions, resolve_options  # noqa: F401
from sgmft.features.shards import (CACHE_VERSION, CorruptShardError, ExtractResult, ShardCache,  # noqa: F401
                                   SplitCount, StoreTarget, assemble_store, load_shard, post_key,
                                   remove_stale_tmp, setup)
from sgmft.ingest.manifest import Post, read_manifest
from sgmft.ingest.text import TextCleaner

log = logging.getLogger("sgmft.extract")


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
    o = resolve_options(manifest, out_store, options, engine=engine, **kwargs)
    out_store = Path(out_store)
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
        cleaner, prefix, cache = setup(bb, o)
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
            remove_stale_tmp(cache, started)
            splits = SplitCount()
            splits.add(posts)
            B = o.batch_size
            parts = ((posts[b * B:(b + 1) * B], load_shard(cache, batch_keys[b])) for b in range(len(batch_keys)))
            target = StoreTarget(out_store, bb, cleaner, o.image_choice, o.label_names, manifest, o.rejects_path,
                             o.overwrite, cache.root)
            result = assemble_store(target, parts, splits, row_rejects, hits, encoded, world, t0)
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


_post_key, _Cache = post_key, ShardCache  # the older names
