"""``sgmft predict RUN --manifest M --engine ray``: batch prediction of raw posts on Ray Data.

:meth:`PostPredictor.predict_manifest` does the reading, validation, rejects and writing
exactly as with the local engine; only the per-batch work moves: CPU tasks run
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

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np

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


def predict_manifest_ray(pp, manifest, out_path, rejects_path=None, *, run_dir, load_kwargs: dict,
                         address: str | None = None, num_cpus: int | None = None, actors: int | None = None,
                         threads: int | None = None, device: str = "auto",
                         object_store_mb: int | None = R.DEFAULT_OBJECT_STORE_MB, progress: bool = False,
                         cache_dir=None, keep_cache: bool = False, **kw) -> dict:
    """:meth:`pp.predict_manifest <sgmft.predict.PostPredictor.predict_manifest>` with the
    per-batch work on Ray. ``pp``: the predictor as loaded on the driver from ``run_dir``
    with ``load_kwargs`` (each replica loads the same). ``kw``: predict_manifest's options.
    The summary gains ``"ray"``: the replica plan, start-up seconds and ``cached`` /
    ``encoded`` posts (finished shards of an earlier, killed run are reused: module doc)."""
    import time

    t0 = time.perf_counter()
    info: dict[str, Any] = {"cached": 0, "encoded": 0}
    cache_root, prefix, salt = _cache_setup(pp, out_path, cache_dir)
    with R.ray_session(address, num_cpus, object_store_mb, progress) as ray:
        plan = R.cluster_plan(ray, device, actors, threads)
        plan["startup_s"] = time.perf_counter() - t0
        replica_kwargs = dict(run_dir=str(run_dir), load_kwargs=dict(load_kwargs, device=device),
                              threads=plan["threads"], fingerprint=pp.backbone.fingerprint(),
                              cache_root=str(cache_root), cache_salt=salt)

        def encoded(batches, base: Path):
            ctx = dict(stage=R.cpu_stage(pp.backbone), clean_cfg=pp.cleaner.cfg, image_choice=pp.image_choice,
                       max_pixels=pp.max_pixels, base=base, on_error="skip", max_images=pp.max_images,
                       prefix=prefix, cache_root=str(cache_root), cache_salt=salt)
            done: dict[int, tuple] = {}
            nxt = 0
            t_run = time.perf_counter()
            for row in R.run_batches(ray, list(enumerate(batches)), ctx, _PredictReplica, replica_kwargs, plan,
                                     progress=progress):
                done[int(row["b"])] = pickle.loads(row["res"])
                info["encoded"] += int(row["n"])
                info["cached"] += len(json.loads(row["keys"])) - int(row["n"])
                while nxt in done:  # written in post order as soon as the next batch is in
                    probs, tm, im, rej, expl = done.pop(nxt)
                    yield _Encoded(tm, im, rej), Predictions(probs, None, pp.label_names, explanations=expl)
                    nxt += 1
            info["run_s"] = time.perf_counter() - t_run
            if nxt != len(batches):
                raise RuntimeError(f"--engine ray: batches {nxt}..{len(batches) - 1} produced no result")

        summary = pp.predict_manifest(manifest, out_path, rejects_path, progress=False, _encoded=encoded, **kw)
    summary["ray"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in {**plan, **info}.items()}
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
