"""``evaluate()``: a checkpoint + a feature store -> metrics.json, confusion.png, tsne.png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sgmft.atomic import write_text
from sgmft.eval.metrics import accuracy_by_regime
from sgmft.eval.report import write_eval_report
from sgmft.features import FeatureStore
from sgmft.labels import label_mapping
from sgmft.predict import Predictor
from sgmft.card import write_model_card
from sgmft.runs import RunDir, ids_digest, locate


def select_rows(fs: FeatureStore, run_dir: RunDir | None, split: str) -> np.ndarray:
    """Rows of ``split``: from the training run's own saved split when the run was trained on
    this very store (it holds the validation part carved for model selection, so ``val`` and
    ``train`` are the run's), else from the store's split.npy, else every labelled row for
    ``all``."""
    labelled = np.flatnonzero(np.asarray(fs.labels) >= 0)
    if split == "all":
        return labelled
    saved = None if run_dir is None else run_dir.split
    same_store = False
    if saved is not None and saved.exists():
        run = run_dir.read_run_json() or {}
        same_store = run.get("store_ids") == ids_digest(fs.ids)
    if same_store:
        rows = np.flatnonzero(np.load(saved) == split)
    elif fs.split is not None:
        rows = fs.indices(split)
    elif saved is None or not saved.exists():
        raise ValueError(f"{fs.path}: the store has no split.npy and no training-run split was "
                         f"found next to the checkpoint; pass --split all or a run directory")
    else:
        raise ValueError(f"{fs.path}: not the store this model was trained on (post ids differ), "
                         f"so its saved split does not apply; pass --split all")
    rows = np.intersect1d(rows, labelled)
    if len(rows) == 0:
        raise ValueError(f"{fs.path}: split {split!r} has no labelled posts")
    return rows


def evaluate(checkpoint, store, out_dir, *, split: str = "test", title: str = "",
             tsne_max_points: int = 2000, seed: int = 0, predictor: Predictor | None = None) -> dict:
    ck = Path(checkpoint)
    _, run_dir = locate(ck)
    pred = predictor or Predictor.load(ck)
    fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    if fs.labels is None:
        raise ValueError(f"{fs.path}: has no labels.npy; evaluation needs labelled posts")
    rows = select_rows(fs, run_dir, split)
    # the store's label indices in the model's order, matched by name (never by position)
    to_model = label_mapping(fs.label_names, pred.label_names, fs.path / "meta.json",
                             Path(pred.info.get("path", ck)) / "labels.json")
    p = pred.predict_store(fs, rows, return_fused=True)
    metrics = write_eval_report(out_dir, y_true=to_model[np.asarray(fs.labels[rows])], y_pred=p.top, probs=p.probs,
                                fused=p.fused, label_names=pred.label_names, ids=np.asarray(fs.ids[rows]),
                                title=title or f"{pred.info.get('preset', '')} on {fs.path.name} ({split})",
                                tsne_max_points=tsne_max_points, seed=seed)
    oracle = (fs.meta.get("extra", {}).get("simfeat", {}) or {}).get("oracle")
    # The generator's oracle figures are for its own test split only: other splits get none.
    on_oracle_split = bool(oracle) and split == "test" and fs.split is not None
    if on_oracle_split:
        metrics["oracle_accuracy"] = oracle.get("test_accuracy")
        metrics["accuracy_over_oracle"] = metrics["accuracy"] / oracle["test_accuracy"]
    if fs.regime is not None:
        by_regime = oracle.get("test_accuracy_by_regime") if on_oracle_split else None
        metrics["accuracy_by_regime"] = accuracy_by_regime(
            np.asarray(fs.labels[rows]), p.top, fs.regimes(rows),
            names=list(by_regime or {}) + fs.regime_names, oracle=by_regime)
    if on_oracle_split or fs.regime is not None:
        write_text(Path(out_dir) / "metrics.json", json.dumps(metrics, indent=2))
    if run_dir is not None and Path(out_dir).resolve().parent == run_dir.root.resolve():
        write_model_card(run_dir.model)            # the card lists the run's eval-*/ figures
    return metrics
