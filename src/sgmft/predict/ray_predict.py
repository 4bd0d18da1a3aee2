"""``sgmft predict RUN --manifest M --engine ray``: batch prediction of raw posts on Ray Data.

:meth:`PostPredictor.predict_manifest` does the reading, validation, rejects and writing
exactly as with the local engine; only the per-batch work moves: CPU tasks run
:func:`~sgmft.features.encode.prepare_batch` (with the weight-free copy of the backbone,
:func:`sgmft.features.ray_engine.cpu_stage`) and an actor pool of replicas, each holding
the backbone and the trained model (:meth:`PostPredictor.load` with the driver's
arguments), runs :func:`~sgmft.features.encode.encode_prepared` and the model. Results
come back per batch and are written in post order, so the output file is the one the
local engine writes (byte for byte at equal torch ``threads``). Prediction writes no
cache: a killed job starts again. Ray is imported lazily (``pip install 'sgmft[ray]'``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from sgmft.features import ray_engine as R


class _PredictReplica(R._Replica):
    """The backbone and the trained model, loaded once per replica (the driver's arguments)."""

    extra_fields = {"res": b""}

    def __init__(self, run_dir: str, load_kwargs: dict, threads: int, fingerprint: str):
        super().__init__(threads)
        from sgmft.predict.posts import PostPredictor

        self.pp = PostPredictor.load(run_dir, **load_kwargs)
        if self.pp.backbone.fingerprint() != fingerprint:
            raise RuntimeError(f"backbone {self.pp.backbone.spec!r} on this node differs from the driver's "
                               "(fingerprint of weights, tokenizer, preprocessing, precision)")

    def one(self, b: int, keys: str, payload: bytes) -> dict:
        from sgmft.features.encode import encode_prepared

        pp = self.pp
        e = encode_prepared(pp.backbone, pickle.loads(payload), pp.image_choice)
        probs = pp.predictor.predict_features(e.text, e.image, e.text_mask, e.image_mask).probs
        res = (np.asarray(probs), e.text_mask, e.image_mask, e.rejects)
        return {"b": b, "keys": keys, "n": len(e.text), "res": pickle.dumps(res, protocol=5)}


class _Encoded:
    """What predict_manifest reads of a batch's encoding: masks and image rejects."""

    def __init__(self, text_mask, image_mask, rejects):
        self.text_mask, self.image_mask, self.rejects = text_mask, image_mask, rejects


def predict_manifest_ray(pp, manifest, out_path, rejects_path=None, *, run_dir, load_kwargs: dict,
                         address: str | None = None, num_cpus: int | None = None, actors: int | None = None,
                         threads: int | None = None, device: str = "auto",
                         object_store_mb: int | None = R.DEFAULT_OBJECT_STORE_MB, progress: bool = False,
                         **kw) -> dict:
    """:meth:`pp.predict_manifest <sgmft.predict.PostPredictor.predict_manifest>` with the
    per-batch work on Ray. ``pp``: the predictor as loaded on the driver from ``run_dir``
    with ``load_kwargs`` (each replica loads the same). ``kw``: predict_manifest's options.
    The summary gains ``"ray"``: the replica plan and start-up seconds."""
    import time

    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    with R.ray_session(address, num_cpus, object_store_mb, progress) as ray:
        plan = R.cluster_plan(ray, device, actors, threads)
        plan["startup_s"] = time.perf_counter() - t0
        replica_kwargs = dict(run_dir=str(run_dir), load_kwargs=dict(load_kwargs, device=device),
                              threads=plan["threads"], fingerprint=pp.backbone.fingerprint())

        def encoded(batches, base: Path):
            ctx = dict(stage=R.cpu_stage(pp.backbone), clean_cfg=pp.cleaner.cfg, image_choice=pp.image_choice,
                       max_pixels=pp.max_pixels, base=base, on_error="skip", max_images=pp.max_images,
                       prefix=None, cache_root=None)
            done: dict[int, tuple] = {}
            nxt = 0
            t_run = time.perf_counter()
            for row in R.run_batches(ray, list(enumerate(batches)), ctx, _PredictReplica, replica_kwargs, plan,
                                     progress=progress):
                done[int(row["b"])] = pickle.loads(row["res"])
                while nxt in done:  # written in post order as soon as the next batch is in
                    probs, tm, im, rej = done.pop(nxt)
                    yield _Encoded(tm, im, rej), probs
                    nxt += 1
            info["run_s"] = time.perf_counter() - t_run
            if nxt != len(batches):
                raise RuntimeError(f"--engine ray: batches {nxt}..{len(batches) - 1} produced no result")

        summary = pp.predict_manifest(manifest, out_path, rejects_path, progress=False, _encoded=encoded, **kw)
    summary["ray"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in {**plan, **info}.items()}
    return summary
