"""Fitting the input normalisation of :class:`sgmft.models.blocks.ModalityInput` on the training split.

Features from CLIP-like encoders are L2-normalised vectors in a narrow cone: a large shared mean
(the modality gap) and a few directions with most of the variance. A model that sees them raw
spends its capacity (and its first optimiser steps) on that geometry. ``input_norm`` removes it
with statistics of the training split only (docs/design.md, "Input normalisation"):

* ``standardize``: ``x' = (x - mu) / sd`` per dimension (sd floored at 1e-3 of its median, so a
  constant dimension does not explode);
* ``whiten``: ``x' = (x - mu) @ W`` with ``W = Sigma^{-1/2}`` of the Ledoit-Wolf shrinkage
  estimate of the modality's covariance (scikit-learn), so every direction has unit variance.

Only posts whose modality is present (mask True) contribute. The statistics are buffers of the
model, so they travel in the checkpoint and every consumer (predict, serve, export) applies them.
"""

from __future__ import annotations

import numpy as np
import torch

from sgmft.models.blocks import ModalityInput

__all__ = ["fit_input_norm", "norm_summary"]


def _rows(fs, modality: str, rows: np.ndarray) -> np.ndarray:
    x = np.asarray(fs.text if modality == "text" else fs.image)
    mask = fs.text_mask if modality == "text" else fs.image_mask
    keep = rows if mask is None else rows[np.asarray(mask)[rows]]
    return np.asarray(x[np.sort(keep)], dtype=np.float64)


def _standardize(x: np.ndarray) -> dict[str, torch.Tensor]:
    mu = x.mean(0)
    sd = x.std(0)
    floor = max(float(np.median(sd)) * 1e-3, 1e-12)
    return {"norm_mean": torch.from_numpy(mu).float(), "norm_scale": torch.from_numpy(1.0 / np.maximum(sd, floor)).float()}


def _whiten(x: np.ndarray) -> dict[str, torch.Tensor]:
    from sklearn.covariance import ledoit_wolf

    mu = x.mean(0)
    cov, _ = ledoit_wolf(x - mu, assume_centered=True)
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, max(vals.max() * 1e-9, 1e-30))   # 1e-30: a zero covariance (constant rows)
    w = (vecs / np.sqrt(vals)) @ vecs.T                     # Sigma^{-1/2}, symmetric
    return {"norm_mean": torch.from_numpy(mu).float(), "norm_matrix": torch.from_numpy(w).float()}


def fit_input_norm(model: torch.nn.Module, fs, rows: np.ndarray) -> dict:
    """Set every normalising :class:`ModalityInput` of ``model`` from the store's ``rows`` (the
    training split). Returns a summary per modality (for run.json and the model card)."""
    inputs = [m for m in model.modules() if isinstance(m, ModalityInput) and m.norm != "none"]
    summary: dict = {}
    for modality in ("text", "image"):
        mods = [m for m in inputs if m.modality == modality]
        if not mods:
            continue
        x = _rows(fs, modality, np.asarray(rows))
        if len(x) < 2:
            summary[modality] = {"mode": mods[0].norm, "posts": int(len(x)), "fitted": False}
            continue                                  # identity: too few posts to estimate anything
        stats = _standardize(x) if mods[0].norm == "standardize" else _whiten(x)
        with torch.no_grad():
            for m in mods:
                for k, v in stats.items():
                    getattr(m, k).copy_(v)
        summary[modality] = {"mode": mods[0].norm, "posts": int(len(x)), "fitted": True,
                             "mean_norm": round(float(stats["norm_mean"].norm()), 4)}
    return summary


def norm_summary(model: torch.nn.Module) -> dict:
    """What a loaded model's inputs do (the model card): mode per modality."""
    return {m.modality: m.norm for m in model.modules() if isinstance(m, ModalityInput) and m.modality}
