"""The on-disk evaluation report of one model on one set of posts.

``write_eval_report`` writes ``metrics.json``, ``predictions.csv``, ``confusion.png``,
``reliability.png``, ``risk_coverage.png``, ``tsne.png`` and ``tsne_coords.npz`` into a folder. Every file is written atomically, so a
crash never leaves a half-written report behind.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from sgmft.eval.metrics import (ECE_BINS, calibration_metrics, classification_metrics, coverage_at_accuracy,
                                risk_coverage)
from sgmft import atomic
from sgmft.eval.plots import plot_confusion, plot_reliability, plot_risk_coverage, plot_tsne, tsne_embed

#: the accuracies at which evaluate reports the coverage of abstaining below a confidence
COVERAGE_TARGETS = (0.95, 0.90)
from sgmft.predict.output import write_predictions


def write_eval_report(out_dir, *, y_true, y_pred, probs, fused, label_names, ids=None,
                      title: str = "", tsne_max_points: int = 2000, seed: int = 0,
                      tsne_max_iter: int = 1000, probs_uncalibrated=None, calibration: dict | None = None,
                      uncertain=None, explanations=None) -> dict:
    """Write a complete evaluation report into ``out_dir`` and return its metrics.

    Files: ``metrics.json`` (:func:`classification_metrics` plus ``title``),
    ``confusion.png`` (row-normalised), ``tsne.png`` (t-SNE of the ``fused`` features coloured
    by true class; skipped when ``fused`` is None) and ``predictions.csv`` in the one
    prediction schema of :mod:`sgmft.predict.output` (``id, pred, prob_<place>..., true``;
    one-hot probabilities when ``probs`` is None; plus ``uncertain`` and the explanation
    columns when given).

    With ``probs``: ``metrics.json`` gains ``ece`` (``ece_bins`` equal-width bins, L1), ``nll``,
    ``brier`` and ``mean_confidence`` of those probabilities, ``risk_coverage`` (the coverage
    at 95 % and 90 % accuracy when abstaining below a confidence, with that confidence), and
    the figures ``reliability.png`` and ``risk_coverage.png``. With ``probs_uncalibrated``
    (the raw softmax before calibration) and ``calibration`` (the checkpoint's record:
    ``method``, ``temperature``, ``uniform_weight``): ``metrics["calibration"]`` holds it with
    both sets of figures, ``before`` and ``after``, and both are drawn.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(n) for n in label_names]
    yt = np.asarray(y_true).astype(np.int64)
    yp = np.asarray(y_pred).astype(np.int64)
    n = len(yt)
    metrics = classification_metrics(yt, yp, names)
    metrics["title"] = title

    if probs is not None:
        probs = np.asarray(probs, dtype=float)
        if probs.shape != (n, len(names)):
            raise ValueError(f"probs must be (n, {len(names)}), got {probs.shape}")
    ids = np.arange(n) if ids is None else np.asarray(ids)
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries for {n} samples")

    plot_confusion(np.asarray(metrics["confusion_matrix"]), names, out / "confusion.png",
                   title=f"{title} — confusion (row-normalised)" if title else
                   "Confusion (row-normalised)")

    if fused is not None and tsne_max_points > 0:          # 0: no t-SNE (it is the slow part)
        fused = np.asarray(fused)
        if len(fused) != n:
            raise ValueError(f"fused has {len(fused)} rows for {n} samples")
        coords, idx = tsne_embed(fused.reshape(n, -1), max_points=tsne_max_points, seed=seed,
                                 labels=yt, max_iter=tsne_max_iter)
        plot_tsne(coords, yt[idx], names, out / "tsne.png",
                  title=f"{title} — t-SNE of fused features" if title else
                  "t-SNE of fused features")
        buf = io.BytesIO()                       # kept so suites can redraw panels without re-running t-SNE
        np.savez(buf, coords=coords, labels=yt[idx], rows=idx)
        atomic.write_bytes(out / "tsne_coords.npz", buf.getvalue())

    if probs is not None:
        metrics.update(_calibration_report(out, yt, probs, probs_uncalibrated, calibration, title))
    if probs is None:                      # the schema has a column per place: one-hot predictions
        probs = np.eye(len(names))[yp]
    write_predictions(out / "predictions.csv", ids, probs, names, true=yt, pred=yp, uncertain=uncertain,
                      explanations=explanations)

    atomic.write_bytes(out / "metrics.json",
                        (json.dumps(metrics, indent=2, ensure_ascii=False) + "\n").encode())
    return metrics


def _calibration_report(out: Path, yt: np.ndarray, probs: np.ndarray, raw, calibration: dict | None,
                        title: str) -> dict:
    """Calibration figures, reliability.png and risk_coverage.png (see :func:`write_eval_report`)."""
    after = calibration_metrics(yt, probs)
    res = {k: after[k] for k in ("ece", "ece_bins", "ece_norm", "nll", "brier", "mean_confidence")}
    lines = [("model's probabilities", probs)]
    if raw is not None:
        raw = np.asarray(raw, dtype=float)
        if raw.shape != probs.shape:
            raise ValueError(f"probs_uncalibrated must be {probs.shape}, got {raw.shape}")
        before = calibration_metrics(yt, raw)
        keys = ("ece", "nll", "brier", "mean_confidence", "accuracy")
        cal = {"method": "none", "temperature": 1.0, "uniform_weight": 0.0, **(calibration or {})}
        res["calibration"] = {**{k: cal[k] for k in ("method", "temperature", "uniform_weight")},
                              "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys}}
        how = f"T = {cal['temperature']:.3g}" + (f", eps = {cal['uniform_weight']:.3g}" if cal["uniform_weight"] else "")
        lines = [(f"before calibration (ECE {before['ece']:.3f})", raw),
                 (f"after, {how} (ECE {after['ece']:.3f})", probs)]
    prefix = f"{title} — " if title else ""
    plot_reliability(yt, lines, out / "reliability.png", n_bins=ECE_BINS, title=f"{prefix}reliability")
    curve = risk_coverage(yt, probs)
    res["risk_coverage"] = {"coverage_at_accuracy": {f"{t:.2f}": coverage_at_accuracy(curve, t)
                                                     for t in COVERAGE_TARGETS},
                            "full_coverage_accuracy": curve["accuracy"][-1]}
    plot_risk_coverage([("model", curve)], out / "risk_coverage.png", COVERAGE_TARGETS,
                       title=f"{prefix}accuracy vs coverage")
    return res
