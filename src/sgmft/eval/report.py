"""The on-disk evaluation report of one model on one set of posts.

``write_eval_report`` writes ``metrics.json``, ``predictions.csv``, ``confusion.png``,
``tsne.png`` and ``tsne_coords.npz`` into a folder. Every file is written atomically, so a
crash never leaves a half-written report behind.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from sgmft.eval.metrics import classification_metrics
from sgmft import atomic
from sgmft.eval.plots import plot_confusion, plot_tsne, tsne_embed


def _plain(v):
    """A numpy scalar / bytes id as a plain str or number for the CSV."""
    v = v.item() if isinstance(v, np.generic) else v
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def write_eval_report(out_dir, *, y_true, y_pred, probs, fused, label_names, ids=None,
                      title: str = "", tsne_max_points: int = 2000, seed: int = 0,
                      tsne_max_iter: int = 1000) -> dict:
    """Write a complete evaluation report into ``out_dir`` and return its metrics.

    Files: ``metrics.json`` (:func:`classification_metrics` plus ``title``),
    ``confusion.png`` (row-normalised), ``tsne.png`` (t-SNE of the ``fused`` features coloured
    by true class; skipped when ``fused`` is None) and ``predictions.csv`` with columns
    ``id,true,pred,prob_<name>...`` (class names; prob columns omitted when ``probs`` is None).
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

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["id", "true", "pred"]
    if probs is not None:
        header += [f"prob_{name}" for name in names]
    writer.writerow(header)
    for i in range(n):
        row = [_plain(ids[i]), names[yt[i]], names[yp[i]]]
        if probs is not None:
            row += [f"{p:.6g}" for p in probs[i]]
        writer.writerow(row)
    atomic.write_bytes(out / "predictions.csv", buf.getvalue().encode("utf-8"))

    atomic.write_bytes(out / "metrics.json",
                        (json.dumps(metrics, indent=2, ensure_ascii=False) + "\n").encode())
    return metrics
