"""The on-disk evaluation report of one model on one set of posts.

``write_eval_report`` writes ``metrics.json``, ``predictions.csv``, ``confusion.png``,
``tsne.png`` and ``tsne_coords.npz`` into a folder. Every file is written atomically, so a
crash never leaves a half-written report behind.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from sgmft.eval.metrics import classification_metrics
from sgmft import atomic
from sgmft.eval.plots import plot_confusion, plot_tsne, tsne_embed
from sgmft.predict.output import write_predictions


def write_eval_report(out_dir, *, y_true, y_pred, probs, fused, label_names, ids=None,
                      title: str = "", tsne_max_points: int = 2000, seed: int = 0,
                      tsne_max_iter: int = 1000) -> dict:
    """Write a complete evaluation report into ``out_dir`` and return its metrics.

    Files: ``metrics.json`` (:func:`classification_metrics` plus ``title``),
    ``confusion.png`` (row-normalised), ``tsne.png`` (t-SNE of the ``fused`` features coloured
    by true class; skipped when ``fused`` is None) and ``predictions.csv`` in the one
    prediction schema of :mod:`sgmft.predict.output` (``id, pred, prob_<place>..., true``;
    one-hot probabilities when ``probs`` is None).
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

    if fused is not None:
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

    if probs is None:                      # the schema has a column per place: one-hot predictions
        probs = np.eye(len(names))[yp]
    write_predictions(out / "predictions.csv", ids, probs, names, true=yt, pred=yp)

    atomic.write_bytes(out / "metrics.json",
                        (json.dumps(metrics, indent=2, ensure_ascii=False) + "\n").encode())
    return metrics
