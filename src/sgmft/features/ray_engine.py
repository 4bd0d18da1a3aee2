"""``--engine ray``: the extraction (and batch prediction) pipeline on Ray Data.

The same batches as the local engine (batch ``b`` = posts ``[b*B, (b+1)*B)`` of the
validated manifest), through the same code (:mod:`sgmft.features.encode`), into the same
content-addressed shards (:class:`sgmft.features.shards.ShardCache`) and the same store
assembly (``_assemble``); only *where* each stage runs changes:

1. the driver streams the manifest (:func:`~sgmft.ingest.manifest.iter_manifest`: the same
   checks and rejects as ``--engine local``) into a spill file, one batch per record
   (:func:`spill_manifest`), so it never holds the post list;
2. CPU tasks (``Dataset.map`` over ``ray.data.range(n_batches)``): per batch, its posts read
   from the spill file, the content keys (image bytes are hashed here, not on the driver),
   a check for a finished shard (resume), and
   :func:`~sgmft.features.encode.prepare_batch` (clean, decode, tokenize, preprocess) with
   a copy of the backbone that has no model weights (:func:`cpu_stage`);
3. an actor pool of backbone replicas (``Dataset.map_batches`` with a callable class, one
   batch per call; one replica per GPU when the cluster has GPUs, else ``actors`` CPU
   replicas with ``threads`` torch threads each): :func:`~sgmft.features.encode.encode_prepared`,
   then the shard is written atomically by the replica;
4. the driver streams the spill file and the shards, batch by batch in post order, into the
   store (the local engine's assembly). Its memory does not grow with the manifest beyond
   44 bytes a batch and the duplicate-id hashes (about 24 bytes a post).

So the store is byte-identical to ``--engine local`` for the same backbone, precision and
torch thread count (float sums depend on the thread count in the last bits), and a killed
job loses only the shards that were not yet written. The shard cache must be on a path
every node sees (a shared filesystem); see docs/scale.md. Ray is imported lazily: only
this module needs it (``pip install 'sgmft[ray]'``).
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import contextlib
import copy
import json
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sgmft.atomic import atomic_file
from sgmft.features.extract_options import DEFAULT_OBJECT_STORE_MB  # noqa: F401  (re-exported)

log = logging.getLogger("sgmft.ray")

INSTALL_HINT = "--engine ray needs Ray Data: pip install 'sgmft[ray]' (or pip install 'ray[data]==2.60.0')"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                object_store_mb: int | None = DEFAULT_OBJECT_STORE_MB, progress: bool = False):
    """Ray for the duration of the block: joins ``address`` (``"auto"``: the cluster this node
    belongs to, started by ``ray start``; ``"ray://host:10001"``: Ray Client), or starts a
    local instance with ``num_cpus`` (default: all cores) and shuts it down afterwards. An
    already initialised Ray (e.g. in a notebook) is used as it is."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING,
                                  log_to_driver=progress)
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, object_store_memory=(int(object_store_mb) << 20) if object_store_mb else None,
                     **kw)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def cpu_stage(backbone):
    """A copy of ``backbone`` for the CPU stage (tokenize, preprocess_images): the same object
    with every ``torch.nn.Module`` attribute dropped, so shipping it to CPU tasks does not
    ship the weights. The forward is never called on it."""
    import torch

    shim = copy.copy(backbone)
    for k, v in list(vars(shim).items()):
        if isinstance(v, torch.nn.Module):
            setattr(shim, k, None)
    return shim


@dataclass
class BackboneInfo:
    """What the driver needs of a backbone it does not load (a replica reports it)."""

    spec: str
    dim: int
    precision: str
    batch_size: int
    image_size: int
    fp: str

    def fingerprint(self) -> str:
        return self.fp

    @classmethod
    def of(cls, bb) -> "BackboneInfo":
        return cls(bb.spec, int(bb.dim), bb.precision, int(bb.batch_size), int(getattr(bb, "image_size", 0) or 0),
                   bb.fingerprint())


def cluster_plan(ray, device: str, actors: int | None, threads: int | None) -> dict:
    """Replicas and their resources: one per GPU (``num_gpus=1``) when the cluster has GPUs and
    ``device`` allows them; else ``actors`` CPU replicas of ``threads`` torch threads
    (default ``threads = min(4, CPUs)`` and ``actors = max(1, CPUs // (threads + 1))``, so one
    core per replica is left to the CPU tasks). Each replica reserves up to ``threads`` CPUs,
    and all replicas together never all of them (a CPU task must always be able to run, or
    the pipeline would wait forever)."""
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    use_gpu = gpus > 0 and not str(device).startswith("cpu")
    if use_gpu:
        n = int(actors or gpus)
        t = int(threads or 1)
        return dict(actors=n, threads=t, num_gpus=1, num_cpus=1, gpu=True, cluster_cpus=cpus, cluster_gpus=gpus)
    t = int(threads or min(4, cpus))
    n = int(actors or max(1, cpus // (t + 1)))
    # the replicas together reserve at most CPUs - 1 (fractions where needed): a CPU task can always run
    per = min(float(t), max(0.01, (cpus - 1) / n))
    return dict(actors=n, threads=t, num_gpus=0, num_cpus=int(per) if per >= 1 else round(per, 2), gpu=False,
                cluster_cpus=cpus, cluster_gpus=gpus)


# -- the CPU stage (a Ray task per block of batches) ------------------------------------------
_CTX_CACHE: dict[str, Any] = {}


def _context(ref) -> dict:
    """The prepare context (shipped once through the object store), cached per worker process."""
    key = ref.hex() if hasattr(ref, "hex") else str(id(ref))
    if key not in _CTX_CACHE:
        _CTX_CACHE.clear()
        if isinstance(ref, dict):
            ctx = ref
        else:
            import ray

            ctx = ray.get(ref)
        from sgmft.ingest.text import TextCleaner

        ctx = dict(ctx, cleaner=TextCleaner(ctx["clean_cfg"]))
        if ctx.get("cache_root") is not None:
            from sgmft.features.shards import ShardCache

            ctx["cache"] = ShardCache(ctx["cache_root"], salt=ctx["cache_salt"])
        _CTX_CACHE[key] = ctx
    return _CTX_CACHE[key]


def _pack_error(e: BaseException) -> bytes:
    """A user error (bad input under ``--strict``, ...) as bytes for the driver to raise
    again, so the CLI reports it as the local engine does (``sgmft extract: error: ...``);
    Ray's own wrappers would lose its type."""
    try:
        b = pickle.dumps(e)
        pickle.loads(b)
        return b
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))


def _prepare_row(row: dict, ctx_ref) -> dict:
    """One batch: content keys, finished-shard check (extract only), then ``prepare_batch``.
    A user error (:data:`sgmft.errors.USER_ERRORS`) travels in the row's ``error`` field."""
    from sgmft.errors import USER_ERRORS

    try:
        return dict(_prepare(row, ctx_ref), error=b"")
    except USER_ERRORS as e:
        return {"b": _batch_index(row), "keys": "[]", "payload": b"", "error": _pack_error(e)}


def _batch_index(row: dict) -> int:
    """A row is ``{"b", "posts"}`` (:func:`run_batches`) or ``{"id"}``: batch ``id`` of the spill."""
    return int(row["b"] if "b" in row else row["id"])


def _prepare(row: dict, ctx_ref) -> dict:
    from sgmft.features.encode import prepare_batch

    ctx = _context(ctx_ref)
    b = _batch_index(row)
    posts = pickle.loads(row["posts"]) if "posts" in row else read_spilled(ctx["spill"], ctx["spill_offsets"], b)
    keys: list[str] = []
    if ctx.get("prefix") is not None:
        from sgmft.features.shards import post_key

        keys = [post_key(ctx["prefix"], p) for p in posts]
        if ctx["cache"].valid(keys):
            return {"b": b, "keys": json.dumps(keys), "payload": b""}
    pr = prepare_batch(ctx["stage"], ctx["cleaner"], posts, ctx["image_choice"], max_pixels=ctx["max_pixels"],
                       base=ctx["base"], on_error=ctx["on_error"], max_images=ctx["max_images"])
    return {"b": b, "keys": json.dumps(keys), "payload": pickle.dumps(pr, protocol=5)}


# -- the replicas (a Ray Data actor pool) -----------------------------------------------------
class BatchReplica:
    """Base of the actor classes (public: :mod:`sgmft.predict.ray_predict` subclasses it): torch threads set once, one prepared batch per call."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(max(1, int(threads)))

    extra_fields: dict = {}   # the result fields of ``one`` beyond b, keys, n (for error rows)
    # a user error found while loading (a node whose backbone differs): raised for every batch,
    # so it reaches the driver in the batch's error field as itself, the local engine's class
    # (an exception in an actor's constructor would reach it as Ray's ActorDiedError)
    refused: BaseException | None = None

    def __call__(self, batch: dict) -> dict:
        from sgmft.errors import USER_ERRORS

        out: dict[str, list] = {}
        for b, keys, payload, err in zip(batch["b"], batch["keys"], batch["payload"], batch["error"]):
            if not err:
                try:
                    if self.refused is not None:
                        raise self.refused
                    res = dict(self.one(int(b), str(keys), bytes(payload)), error=b"")
                except USER_ERRORS as e:
                    err = _pack_error(e)
            if err:
                res = {"b": int(b), "keys": str(keys), "n": 0, **self.extra_fields, "error": bytes(err)}
            for k, v in res.items():
                out.setdefault(k, []).append(v)
        return {k: np.asarray(v) if k in ("b", "n") else np.asarray(v, dtype=object) for k, v in out.items()}

    def one(self, b: int, keys: str, payload: bytes) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


class _ExtractReplica(BatchReplica):
    """Loads the backbone once, checks it is the driver's (same fingerprint on every node),
    encodes each prepared batch and writes its shard."""

    extra_fields = {"shard": "", "posts": 0}

    def __init__(self, spec: str, device: str, dtype: str, batch_size: int, threads: int, image_choice: str,
                 cache_root: str, cache_salt: str, fingerprint: str, n_posts: int = 0):
        super().__init__(threads)
        from sgmft.features.backbones import load_backbone
        from sgmft.features.backbones.precision import maybe_compile
        from sgmft.features.shards import ShardCache

        self.bb = load_backbone(spec, device=device, dtype=dtype, batch_size=batch_size)
        maybe_compile(self.bb, n_posts)  # the local engine's rule (opt-in: SGMFT_COMPILE)
        if self.bb.fingerprint() != fingerprint:
            from sgmft.errors import BackboneMismatchError

            self.refused = BackboneMismatchError(f"backbone {spec!r} on this node ({os.uname().nodename}) has fingerprint "
                               f"{self.bb.fingerprint()[:12]}, the job's is {fingerprint[:12]}: the nodes hold "
                               "different weights, tokenizer, preprocessing or precision")
        self.image_choice = image_choice
        self.cache = ShardCache(Path(cache_root), salt=cache_salt)

    def one(self, b: int, keys: str, payload: bytes) -> dict:
        from sgmft.features.encode import encode_prepared

        # the driver gets the shard's file name and post count, not the keys (bytes per batch it holds)
        klist = json.loads(keys)
        done = {"b": b, "keys": "", "shard": self.cache.path(klist).name, "posts": len(klist)}
        if not payload:  # a finished shard (resume)
            return dict(done, n=0)
        e = encode_prepared(self.bb, pickle.loads(payload), self.image_choice)
        self.cache.put(klist, e.text, e.image, e.text_mask, e.image_mask, e.rejects, e.text_over, e.text_cut)
        return dict(done, n=len(e.text))


_Replica = BatchReplica  # the older name


def _probe_backbone(spec: str, device: str, dtype: str, batch_size: int):
    """(BackboneInfo, CPU-stage copy) of the backbone as a replica loads it (same device kind)."""
    from sgmft.features.backbones import load_backbone

    bb = load_backbone(spec, device=device, dtype=dtype, batch_size=batch_size)
    return BackboneInfo.of(bb), cpu_stage(bb)


def _cpu_task_args() -> dict:
    return {"num_cpus": 1}


def run_batches(ray, batches: Sequence[tuple[int, list]], ctx: dict, replica_cls: type, replica_kwargs: dict,
                plan: dict, *, progress: bool = False) -> Iterator[dict]:
    """Stream ``batches`` (``(b, posts)``, all in the driver's memory) through CPU tasks and the
    replica pool; yields each replica's result row (in completion order, not post order)."""
    if not batches:
        return
    rows = [{"b": b, "posts": pickle.dumps(p, protocol=5)} for b, p in batches]
    # many small blocks: a batch is prepared, encoded and written as soon as possible (and a
    # kill loses little); capped so a huge manifest does not make a huge task graph
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4096)))
    yield from _pipeline(ray, ds, ctx, replica_cls, replica_kwargs, plan)


def run_spilled(ray, spill: "SpilledPosts", ctx: dict, replica_cls: type, replica_kwargs: dict,
                plan: dict) -> Iterator[dict]:
    """:func:`run_batches` over the batches of a :class:`SpilledPosts` file: the dataset is
    ``ray.data.range`` of the batch indices, and each CPU task reads its batches' posts from
    the file, so the driver holds no posts (and the object store only batches in flight)."""
    if not spill.n_batches:
        return
    # at most 1,024 blocks: Ray Data's bookkeeping in the driver grows with the block count (a
    # task's output is still cut into blocks of at most DataContext.target_max_block_size)
    ds = ray.data.range(spill.n_batches, override_num_blocks=max(1, min(spill.n_batches, 1024)))
    ctx = dict(ctx, spill=str(spill.path), spill_offsets=spill.offsets)
    yield from _pipeline(ray, ds, ctx, replica_cls, replica_kwargs, plan)


def _pipeline(ray, ds, ctx: dict, replica_cls: type, replica_kwargs: dict, plan: dict) -> Iterator[dict]:
    ctx_ref = ray.put(ctx)
    # CPU tasks; a ray_remote_args_fn keeps Ray Data from fusing them into the replicas (it fuses
    # a task map into the next actor map when their resources match), so decoding runs beside
    # the forward instead of inside the replica, before it
    ds = ds.map(_prepare_row, fn_kwargs={"ctx_ref": ctx_ref}, num_cpus=1, ray_remote_args_fn=_cpu_task_args)
    ds = ds.map_batches(replica_cls, fn_constructor_kwargs=replica_kwargs, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=plan["actors"]), num_cpus=plan["num_cpus"],
                        num_gpus=plan["num_gpus"])
    for row in ds.iter_rows():
        if row.get("error"):  # a user error in a task or replica: raised here as itself
            raise pickle.loads(row["error"])
        yield row


# -- the driver's bounded memory: posts spilled to a file, batch by batch ---------------------
@dataclass
class SpilledPosts:
    """The validated posts of a streamed manifest, pickled one batch per record into one file
    (in the shard cache's folder, which every node sees): batch ``b`` is the bytes
    ``offsets[b]:offsets[b+1]``. CPU tasks and the store assembly read batches back from it."""

    path: Path
    offsets: np.ndarray           # (n_batches + 1,) int64

    @property
    def n_batches(self) -> int:
        return len(self.offsets) - 1

    def batch(self, b: int) -> list:
        return read_spilled(self.path, self.offsets, b)


def read_spilled(path, offsets: np.ndarray, b: int) -> list:
    with open(path, "rb") as f:
        f.seek(int(offsets[b]))
        return pickle.loads(f.read(int(offsets[b + 1] - offsets[b])))


def spill_manifest(manifest: Path, path: Path, batch_size: int, reader_options: dict):
    """Stream ``manifest`` (:func:`~sgmft.ingest.manifest.iter_manifest`, one chunk per batch)
    into a :class:`SpilledPosts` file at ``path``. Returns it, the split count and the
    manifest-row rejects; holds one batch (and the duplicate-id hashes) at a time. With
    ``on_error="raise"`` a bad row raises once the whole file is read, before any work."""
    from array import array

    from sgmft.features.shards import SplitCount
    from sgmft.ingest.manifest import iter_manifest

    splits, rejects, offsets = SplitCount(), [], array("q", [0])
    with atomic_file(path, "wb") as f:
        for chunk in iter_manifest(manifest, chunk_size=batch_size, **reader_options):
            rejects.extend(chunk.rejects)
            if chunk.posts:
                data = pickle.dumps(chunk.posts, protocol=5)
                f.write(data)
                offsets.append(offsets[-1] + len(data))
                splits.add(chunk.posts)
    return SpilledPosts(Path(path), np.frombuffer(offsets, dtype=np.int64).copy()), splits, rejects


def extract_features_ray(manifest, out_store, *, backbone: str, address: str | None = None,
                         num_cpus: int | None = None, actors: int | None = None,
                         object_store_mb: int | None = DEFAULT_OBJECT_STORE_MB, **options):
    """``extract_features(..., engine="ray")`` (the older entry point, kept): the same options
    and checks, run on Ray Data (see the module doc). ``address``: a cluster to join
    (``"auto"``, ``"ray://..."``), else a local Ray instance with ``num_cpus`` CPUs;
    ``actors``: backbone replicas (default: one per GPU, see :func:`cluster_plan`);
    ``threads``: torch threads per CPU replica. ``result.engine`` holds the plan and the
    start-up / run seconds."""
    from sgmft.features.extract_options import resolve_options

    o = resolve_options(manifest, out_store, engine="ray", address=address, num_cpus=num_cpus, actors=actors,
                        object_store_mb=object_store_mb, **options)
    return run_extract_ray(Path(manifest), Path(out_store), backbone, o)


def run_extract_ray(manifest: Path, out_store: Path, backbone: str, o) -> "ExtractResult":  # noqa: F821
    """The Ray driver for :func:`~sgmft.features.extract.extract_features` (``o``: its checked
    :class:`~sgmft.features.extract_options.ExtractOptions`, ``o.cache_dir`` set): probe the
    backbone, stream the manifest into a spill file, run the batches on Ray, then stream the
    spill and the shards into the store. Holds one batch of posts at a time, plus 44 bytes a
    batch and the duplicate-id hashes (about 24 bytes a post)."""
    from sgmft.features.shards import StoreTarget, assemble_store, remove_stale_tmp, setup

    if not isinstance(backbone, str):
        raise InputError("--engine ray needs the backbone as a spec string (every replica loads it)")
    t0, started = time.perf_counter(), time.time()
    if out_store.exists() and not o.overwrite:
        raise FileExistsError(f"{out_store} already exists; pass overwrite=True (--overwrite) to replace it")
    spill = None
    try:
        with ray_session(o.address, o.num_cpus, o.object_store_mb, o.progress) as ray:
            plan = cluster_plan(ray, o.device, o.actors, o.threads)
            info, stage = _probe(ray, plan, backbone, o.device, o.dtype, o.batch_size, t0)
            cleaner, prefix, cache = setup(info, o)
            _remove_stale_spills(cache.root, started)
            spill, splits, row_rejects = spill_manifest(
                manifest, cache.root / f".posts-{os.getpid()}-{time.time_ns()}.spill", o.batch_size,
                o.reader_options())
            ctx = dict(stage=stage, clean_cfg=cleaner.cfg, image_choice=o.image_choice, max_pixels=o.max_pixels,
                       base=manifest.resolve().parent, on_error=o.on_error, max_images=o.max_images, prefix=prefix,
                       cache_root=str(cache.root), cache_salt=cache.salt)
            kwargs = dict(spec=backbone, device=o.device, dtype=o.dtype, batch_size=o.batch_size,
                          threads=plan["threads"], image_choice=o.image_choice, cache_root=str(cache.root),
                          cache_salt=cache.salt, fingerprint=info.fingerprint(), n_posts=splits.n)
            names, hits, encoded = _run_extract(ray, spill, ctx, kwargs, plan, cache, splits.n, o.progress)
        remove_stale_tmp(cache, started)
        parts = ((spill.batch(b), _shard_named(cache, names[b])) for b in range(spill.n_batches))
        target = StoreTarget(out_store, info, cleaner, o.image_choice, o.label_names, manifest, o.rejects_path,
                             o.overwrite, cache.root)
        res = assemble_store(target, parts, splits, row_rejects, hits, encoded, plan["actors"], t0)
    finally:
        if spill is not None:
            spill.path.unlink(missing_ok=True)
    if not o.keep_cache:
        import shutil

        shutil.rmtree(o.cache_dir, ignore_errors=True)
    res.engine = dict(plan, engine="ray")
    return res


def _probe(ray, plan: dict, backbone: str, device: str, dtype: str, batch_size: int, t0: float):
    """(BackboneInfo, CPU-stage copy) as the replicas will load the backbone; times into ``plan``."""
    t_probe = time.perf_counter()
    if plan["gpu"]:  # the fingerprint depends on the device kind (precision "auto"): ask a GPU
        probe = ray.remote(_probe_backbone).options(num_cpus=1, num_gpus=plan["num_gpus"])
        info, stage = ray.get(probe.remote(backbone, device, dtype, batch_size))
    else:            # CPU replicas: the driver loads it as they will
        info, stage = _probe_backbone(backbone, "cpu" if device == "auto" else device, dtype, batch_size)
    plan.update(startup_s=t_probe - t0, probe_s=time.perf_counter() - t_probe)
    return info, stage


def _run_extract(ray, spill: SpilledPosts, ctx: dict, kwargs: dict, plan: dict, cache, n_posts: int,
                 progress: bool) -> tuple[np.ndarray, int, int]:
    """Run every batch; returns each batch's shard file name (``S44``, in batch order), and the
    posts found cached and encoded. Fails if a batch produced no result."""
    from tqdm.auto import tqdm

    bar = tqdm(total=n_posts, unit="post", desc=f"extract[ray x{plan['actors']}]", disable=not progress,
               dynamic_ncols=True)
    names = np.zeros(spill.n_batches, dtype="S44")   # 44 bytes a batch: the driver's only per-batch state
    hits = encoded = 0
    t_run = time.perf_counter()
    try:
        for row in run_spilled(ray, spill, ctx, _ExtractReplica, kwargs, plan):
            b, n, m = int(row["b"]), int(row["n"]), int(row["posts"])
            names[b] = str(row["shard"]).encode()
            encoded += n
            hits += m - n
            bar.update(m)
    finally:
        bar.close()
    plan["run_s"] = time.perf_counter() - t_run
    missing = np.flatnonzero(names == b"")
    if missing.size:
        raise RuntimeError(f"--engine ray: {missing.size} batch(es) produced no result (first: {int(missing[0])}); "
                           "run the same command again to finish them")
    return names, hits, encoded


def _shard_named(cache, name: bytes) -> dict:
    from sgmft.features.shards import load_shard

    return load_shard(cache, name=name.decode())


def _remove_stale_spills(root: Path, started: float) -> None:
    """Spill files (and their partial writes) of killed earlier runs, older than this run's start."""
    for f in Path(root).glob("*.posts-*"):
        try:
            if f.stat().st_mtime < started:
                f.unlink()
        except OSError:
            pass
