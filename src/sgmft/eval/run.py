"""``evaluate()``: a checkpoint + a feature store -> metrics.json (accuracy, F1, calibration before
and after the checkpoint's temperature, coverage at 95 % / 90 % accuracy), confusion.png,
reliability.png, risk_coverage.png, tsne.png."""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

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
from sgmft.runs import RunDir, ids_digest, locate, split_rows


def select_rows(fs: FeatureStore, run_dir: RunDir | None, split: str) -> np.ndarray:
    """The labelled rows of ``split``: :func:`sgmft.runs.split_rows` (the training run's own
    saved split when the run was trained on this very store, else the store's split.npy;
    ``predict --store --split`` takes the same rows)."""
    labelled = np.flatnonzero(np.asarray(fs.labels) >= 0)
    if split == "all":
        return labelled
    rows = split_rows(fs, run_dir, split)
    rows = np.intersect1d(rows, labelled)
    if len(rows) == 0:
        raise InputError(f"{fs.path}: split {split!r} has no labelled posts")
    return rows


def _softmax(logits: np.ndarray) -> np.ndarray:
    """The raw probabilities, before the checkpoint's temperature (for "before calibration")."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def default_report_dir(checkpoint, split: str = "test") -> Path:
    """Where ``evaluate`` writes by default (the CLI and the Python API alike): ``eval-<split>``
    in the run folder (a bare model folder: inside it)."""
    model_dir, run_dir = locate(checkpoint)
    return (run_dir or RunDir(model_dir)).eval_dir(split)


def evaluate(checkpoint, store, out_dir=None, *, split: str = "test", title: str = "",
             tsne_max_points: int = 2000, seed: int = 0, predictor: Predictor | None = None,
             progress: bool | None = None) -> dict:
    """Evaluate ``checkpoint`` on the ``split`` rows of ``store``; the report goes to ``out_dir``
    (default :func:`default_report_dir`). ``progress``: a bar over the stages on stderr (default:
    only on a terminal). metrics.json records the store and split evaluated."""
    from tqdm.auto import tqdm

    from sgmft.config import progress_enabled

    ck = Path(checkpoint)
    _, run_dir = locate(ck)
    out_dir = default_report_dir(ck, split) if out_dir is None else out_dir
    bar = tqdm(total=2, desc="evaluate: predict", unit="stage", disable=not progress_enabled(progress))
    pred = predictor or Predictor.load(ck)
    fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    if fs.labels is None:
        raise InputError(f"{fs.path}: has no labels.npy; evaluation needs labelled posts")
    rows = select_rows(fs, run_dir, split)
    # the store's label indices in the model's order, matched by name (never by position)
    to_model = label_mapping(fs.label_names, pred.label_names, fs.path / "meta.json",
                             Path(pred.info.get("path", ck)) / "labels.json")
    p = pred.predict_store(fs, rows, return_fused=True, explain=True)
    bar.update(1)
    bar.set_description("evaluate: report (t-SNE)")
    metrics = write_eval_report(out_dir, y_true=to_model[np.asarray(fs.labels[rows])], y_pred=p.top, probs=p.probs,
                                fused=p.fused, label_names=pred.label_names, ids=np.asarray(fs.ids[rows]),
                                title=title or f"{pred.info.get('preset', '')} on {fs.path.name} ({split})",
                                tsne_max_points=tsne_max_points, seed=seed, probs_uncalibrated=_softmax(p.logits),
                                calibration={"method": (pred.info.get("calibration") or {}).get("method", "none"),
                                             "temperature": pred.temperature, "uniform_weight": pred.uniform_weight},
                                uncertain=p.uncertain, explanations=p.explanations)
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
    metrics["store"], metrics["store_ids"], metrics["split"] = str(fs.path), ids_digest(fs.ids), split
    write_text(Path(out_dir) / "metrics.json", json.dumps(metrics, indent=2))
    bar.update(1)
    bar.close()
    if run_dir is not None and Path(out_dir).resolve().parent == run_dir.root.resolve():
        write_model_card(run_dir.model)            # the card lists the run's eval-*/ figures
    return metrics
