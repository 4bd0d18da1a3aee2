"""``sgmft predict RUN --manifest M --engine ray``: batch prediction of raw posts on Ray Data.

:meth:`PostPredictor.predict_manifest` does the reading (streamed), validation, rejects and
writing exactly as with the local engine; only the per-batch work moves, through its public
``encoder=`` parameter (:class:`RayBatchEncoder`): the driver spills the streamed batches to a
file in the shard cache's folder, as the extract driver does, so its memory does not grow with
the manifest (docs/scale.md has the figures), then CPU tasks run
:func:`~sgmft.features.encode.prepare_batch` (with the weight-free copy of the backbone,
:func:`sgmft.features.ray_engine.cpu_stage`) and an actor pool of replicas, each holding
the backbone and the trained model (:meth:`PostPredictor.load` with the driver's
arguments), runs :func:`~sgmft.features.encode.encode_prepared` and the model. Results
come back per batch and are written in post order, so the output file is the one the
local engine writes (byte for byte at equal torch ``threads``).

Resumable as extraction is: each replica writes its batch's features as the extraction
shard of those posts (:class:`sgmft.features.shards.ShardCache`, same content-addressed names,
in ``<out>.cache`` or ``cache_dir``) before running the trained model on them. A rerun of a
killed job finds the finished shards in the CPU tasks, skips decoding and the backbone for
those batches, and runs only the (cheap) trained model on the stored features, so the
output is the same file. The cache is deleted after a successful run (``keep_cache=True``
keeps it). Ray is imported lazily (``pip install 'sgmft[ray]'``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from sgmft.atomic import atomic_file
from sgmft.features import ray_engine as R
from sgmft.predict.features import Predictions


class _PredictReplica(R.BatchReplica):
    """The backbone and the trained model, loaded once per replica (the driver's arguments)."""

    extra_fields = {"res": b""}

    def __init__(self, run_dir: str, load_kwargs: dict, threads: int, fingerprint: str,
                 cache_root: str | None = None, cache_salt: str = ""):
        super().__init__(threads)
        from sgmft.features.shards import ShardCache
        from sgmft.predict.posts import PostPredictor

        self.cache = ShardCache(Path(cache_root), salt=cache_salt) if cache_root else None
        self.pp = PostPredictor.load(run_dir, **load_kwargs)
        if self.pp.backbone.fingerprint() != fingerprint:
            from sgmft.errors import BackboneMismatchError

            self.refused = BackboneMismatchError(f"backbone {self.pp.backbone.spec!r} on this node differs from the driver's "
                               "(fingerprint of weights, tokenizer, preprocessing, precision)")

    def one(self, b: int, keys: str, payload: bytes) -> dict:
        from sgmft.features.encode import encode_prepared

        pp, klist = self.pp, json.loads(keys)
        if not payload:  # a finished shard (resume): the stored features, no decoding, no backbone
            z = self.cache.get(klist)
            feats = (z["text"], z["image"], z["text_mask"].astype(bool), z["image_mask"].astype(bool), z["rejects"])
            n_encoded = 0
        else:
            e = encode_prepared(pp.backbone, pickle.loads(payload), pp.image_choice)
            if self.cache is not None:
                self.cache.put(klist, e.text, e.image, e.text_mask, e.image_mask, e.rejects, e.text_over, e.text_cut)
            feats, n_encoded = (e.text, e.image, e.text_mask, e.image_mask, e.rejects), len(e.text)
        text, image, tm, im, rej = feats
        p = pp.predictor.predict_features(text, image, tm, im, explain=True)
        res = (np.asarray(p.probs), tm, im, rej, p.explanations)
        return {"b": b, "keys": keys, "n": n_encoded, "res": pickle.dumps(res, protocol=5)}


class _Encoded:
    """What predict_manifest reads of a batch's encoding: masks and image rejects."""

    def __init__(self, text_mask, image_mask, rejects):
        self.text_mask, self.image_mask, self.rejects = text_mask, image_mask, rejects


class RayBatchEncoder:
    """The ``encoder=`` (:class:`sgmft.predict.posts.BatchEncoder`) that runs the batches on Ray
    Data, for :meth:`PostPredictor.predict_manifest <sgmft.predict.PostPredictor.predict_manifest>`.

    Called with the batches of a streamed manifest, it writes them to a spill file in the
    shard cache's folder (:func:`spill_batches`, one pickled batch per record, as the extract
    driver does), runs the spill through :func:`sgmft.features.ray_engine.run_spilled` (CPU
    tasks read their batches from the file; :class:`_PredictReplica` encodes and predicts) and
    yields each batch in post order as soon as it and those before it are back, its posts read
    back from the file. The dataset keeps its rows in order (Ray Data's ``preserve_order``), so
    the driver holds 8 bytes a batch and one batch's results; ``info`` counts ``cached`` /
    ``encoded`` posts and ``run_s``."""

    def __init__(self, ray, pp, plan: dict, replica_kwargs: dict, cache_root: Path, prefix: bytes, salt: str):
        self.ray, self.pp, self.plan, self.replica_kwargs = ray, pp, plan, replica_kwargs
        self.cache_root, self.prefix, self.salt = Path(cache_root), prefix, salt
        self.info: dict[str, Any] = {"cached": 0, "encoded": 0}

    def __call__(self, batches, base: Path):
        pp, started = self.pp, time.time()
        _remove_stale_spills(self.cache_root, started)
        spill = spill_batches(batches, self.cache_root / f".posts-{os.getpid()}-{time.time_ns()}.spill")
        try:
            ctx = dict(stage=R.cpu_stage(pp.backbone), clean_cfg=pp.cleaner.cfg, image_choice=pp.image_choice,
                       max_pixels=pp.max_pixels, base=base, on_error="skip", max_images=pp.max_images,
                       prefix=self.prefix, cache_root=str(self.cache_root), cache_salt=self.salt)
            done: dict[int, tuple] = {}
            nxt, t_run = 0, time.perf_counter()
            with _in_order(self.ray):
                for row in R.run_spilled(self.ray, spill, ctx, _PredictReplica, self.replica_kwargs, self.plan):
                    done[int(row["b"])] = pickle.loads(row["res"])
                    self.info["encoded"] += int(row["n"])
                    self.info["cached"] += len(json.loads(row["keys"])) - int(row["n"])
                    while nxt in done:  # in post order (rows come in order; a safeguard if not)
                        probs, tm, im, rej, expl = done.pop(nxt)
                        yield (spill.batch(nxt), _Encoded(tm, im, rej),
                               Predictions(probs, None, pp.label_names, explanations=expl))
                        nxt += 1
            self.info["run_s"] = time.perf_counter() - t_run
            if nxt != spill.n_batches:
                raise RuntimeError(f"--engine ray: batches {nxt}..{spill.n_batches - 1} produced no result; "
                                   "run the same command again to finish them")
        finally:
            spill.path.unlink(missing_ok=True)


@contextlib.contextmanager
def _in_order(ray):
    """Datasets made in the block keep their rows in order (Ray Data's ``preserve_order``), so a
    batch that comes back ahead of a slow one waits in the object store, not in the driver."""
    opts = ray.data.DataContext.get_current().execution_options
    old, opts.preserve_order = opts.preserve_order, True
    try:
        yield
    finally:
        opts.preserve_order = old


def spill_batches(batches, path: Path) -> R.SpilledPosts:
    """Write ``batches`` (lists of posts) to ``path``, one pickled batch per record, holding one
    batch at a time: the :class:`~sgmft.features.ray_engine.SpilledPosts` the CPU tasks read."""
    from array import array

    offsets = array("q", [0])
    with atomic_file(path, "wb") as f:
        for batch in batches:
            data = pickle.dumps(batch, protocol=5)
            f.write(data)
            offsets.append(offsets[-1] + len(data))
    return R.SpilledPosts(Path(path), np.frombuffer(offsets, dtype=np.int64).copy())


def _remove_stale_spills(root: Path, started: float) -> None:
    """Spill files (and partial writes) left by killed earlier runs, older than this run's start."""
    for f in Path(root).glob("*.posts-*"):
        with contextlib.suppress(OSError):
            if f.stat().st_mtime < started:
                f.unlink()


def predict_manifest_ray(pp, manifest, out_path, rejects_path=None, *, run_dir, load_kwargs: dict,
                         address: str | None = None, num_cpus: int | None = None, actors: int | None = None,
                         threads: int | None = None, device: str = "auto",
                         object_store_mb: int | None = R.DEFAULT_OBJECT_STORE_MB, progress: bool = False,
                         cache_dir=None, keep_cache: bool = False, **kw) -> dict:
    """:meth:`pp.predict_manifest <sgmft.predict.PostPredictor.predict_manifest>` with the
    per-batch work on Ray (``encoder=`` a :class:`RayBatchEncoder`). ``pp``: the predictor as
    loaded on the driver from ``run_dir`` with ``load_kwargs`` (each replica loads the same).
    ``kw``: predict_manifest's options. The summary gains ``"ray"``: the replica plan, start-up
    seconds and ``cached`` / ``encoded`` posts (finished shards of an earlier, killed run are
    reused: module doc)."""
    t0 = time.perf_counter()
    cache_root, prefix, salt = _cache_setup(pp, out_path, cache_dir)
    with R.ray_session(address, num_cpus, object_store_mb, progress) as ray:
        plan = R.cluster_plan(ray, device, actors, threads)
        plan["startup_s"] = time.perf_counter() - t0
        replica_kwargs = dict(run_dir=str(run_dir), load_kwargs=dict(load_kwargs, device=device),
                              threads=plan["threads"], fingerprint=pp.backbone.fingerprint(),
                              cache_root=str(cache_root), cache_salt=salt)
        cache_root.mkdir(parents=True, exist_ok=True)
        encoder = RayBatchEncoder(ray, pp, plan, replica_kwargs, cache_root, prefix, salt)
        summary = pp.predict_manifest(manifest, out_path, rejects_path, progress=False, encoder=encoder, **kw)
    summary["ray"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in {**plan, **encoder.info}.items()}
    if not keep_cache:
        shutil.rmtree(cache_root, ignore_errors=True)
    return summary


def _cache_setup(pp, out_path, cache_dir) -> tuple[Path, bytes, str]:
    """(cache folder, post-key prefix, shard salt): the extraction cache's, for this
    predictor's backbone, cleaning and image settings (``<out>.cache`` by default)."""
    from sgmft.features.encode import reduce_side
    from sgmft.features.shards import CACHE_VERSION

    out_path = Path(out_path)
    root = Path(cache_dir) if cache_dir is not None else out_path.with_name(out_path.name + ".cache")
    bb = pp.backbone
    prefix = json.dumps({"v": CACHE_VERSION, "backbone": bb.fingerprint(), "clean": pp.cleaner.fingerprint(),
                         "choice": pp.image_choice, "max_pixels": pp.max_pixels, "max_images": pp.max_images,
                         "reduce_to": reduce_side(bb)}, sort_keys=True).encode()
    return root, prefix, f"v{CACHE_VERSION} image-chunk {bb.batch_size}"
