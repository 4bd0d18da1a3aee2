"""Post-hoc calibration after training, fitted on the run's validation split (the part carved
from train for model selection; never the test split).

Two methods (``TrainConfig.calibration``), both by minimising the negative log-likelihood of
the true labels with L-BFGS over unconstrained parameters:

* ``temperature`` (Guo et al. 2017, "On Calibration of Modern Neural Networks", section
  4.2): p = softmax(z / T), one scalar T > 0 (optimised as log T);
* ``temperature_uniform`` (the default): p = (1 - eps) softmax(z / T) + eps / K, with a
  second scalar eps in [0, 1) (optimised as logit eps): the weight of "this post's label
  cannot be read from it" (a uniform guess). A single temperature cannot cap the confidence,
  so when some posts are unpredictable (both modalities generic or misleading: SimFeat's
  ``neither`` regime, label noise in real data) it leaves the most confident bins
  over-confident and the middle ones under-confident; eps caps the top probability at
  1 - eps + eps / K. Measured in docs/predict.md ("When to trust a probability").

Both maps are increasing in each logit, so the argmax, and with it the accuracy, never
changes. The record goes into the checkpoint (:func:`sgmft.checkpoint.calibration_entry`);
the inference side applies it with :func:`sgmft.checkpoint.calibrated_probs`
(predict, serve, export) and imports nothing from here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sgmft.checkpoint import calibrated_probs
from sgmft.models import forward_batch

ECE_BINS = 15          # as sgmft.eval.metrics.ECE_BINS (reported beside every ECE)
MIN_VAL_POSTS = 50     # fewer labelled validation posts: no calibration (two parameters would overfit them)

__all__ = ["calibration_record", "clip_temperature", "fit_calibration", "fit_temperature", "fit_temperature_uniform", "collect_logits", "holdout_rows",
           "validation_rows"]


@torch.no_grad()
def collect_logits(model: torch.nn.Module, store, rows, *, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (n, K) float64, labels (n,))`` of ``model`` in eval mode on rows of a feature store."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for s in range(0, len(rows), batch_size):
            r = rows[s:s + batch_size]
            batch = {"text": torch.as_tensor(np.asarray(store.text[r]), dtype=torch.float32, device=dev),
                     "image": torch.as_tensor(np.asarray(store.image[r]), dtype=torch.float32, device=dev)}
            for m in ("text_mask", "image_mask"):
                if getattr(store, m) is not None:
                    batch[m] = torch.as_tensor(np.asarray(getattr(store, m)[r]), device=dev)
            out.append(forward_batch(model, batch).logits.double().cpu().numpy())
    finally:
        model.train(was_training)
    return (np.concatenate(out) if out else np.zeros((0, 0))), np.asarray(store.labels[rows]).astype(np.int64)


def _lbfgs(nll, init: list[float], max_iter: int) -> list[float]:
    theta = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = nll(theta)
        loss.backward()
        return loss

    opt.step(closure)
    return [float(v) for v in theta.detach()]


def fit_temperature(logits, labels, *, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (L-BFGS on log T, strong Wolfe line
    search, from T = 1), clipped to [0.01, 100]. Returns 1.0 for no data."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(y) == 0:
        return 1.0
    (log_t,) = _lbfgs(lambda th: F.cross_entropy(z / th[0].exp(), y), [0.0], max_iter)
    return _clip_t(log_t)


def _clip_t(log_t: float) -> float:
    t = math.exp(log_t) if math.isfinite(log_t) else 1.0     # degenerate data: leave it alone
    return clip_temperature(t)


def clip_temperature(t: float) -> float:
    """``t`` clipped to the temperatures a fit may return, [0.01, 100]."""
    return min(max(t, 1e-2), 1e2)


def fit_temperature_uniform(logits, labels, *, max_iter: int = 200) -> tuple[float, float]:
    """``(T, eps)`` minimising the NLL of (1 - eps) softmax(logits / T) + eps / K (L-BFGS on
    (log T, logit eps) from (1, 0.018)). Returns (1.0, 0.0) for no data."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(y) == 0:
        return 1.0, 0.0

    def nll(th):
        p = calibrated_probs(z, th[0].exp(), torch.sigmoid(th[1]))
        return F.nll_loss(p.clamp_min(1e-300).log(), y)

    log_t, logit_eps = _lbfgs(nll, [0.0, -4.0], max_iter)
    eps = 1.0 / (1.0 + math.exp(-logit_eps)) if math.isfinite(logit_eps) else 0.0
    return _clip_t(log_t), min(max(eps, 0.0), 0.999)


def _stats(logits: np.ndarray, labels: np.ndarray, t: float, eps: float = 0.0) -> dict:
    """Validation ECE (15 bins, L1; torchmetrics), NLL and mean confidence of the calibrated
    probabilities (the same figures as :func:`sgmft.eval.metrics.calibration_metrics`, which
    this layer may not import)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    p = calibrated_probs(torch.as_tensor(logits, dtype=torch.float64), t, eps)
    y = torch.as_tensor(labels, dtype=torch.int64)
    ece = multiclass_calibration_error(p, y, num_classes=p.shape[1], n_bins=ECE_BINS, norm="l1")
    return {"ece": float(ece), "nll": float(F.nll_loss(p.clamp_min(1e-15).log(), y)),
            "mean_confidence": float(p.max(1).values.mean())}


def holdout_rows(val_rows, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(selection rows, calibration rows)`` of the validation split: with ``fraction`` 0 both are
    the whole split; else a seeded ``fraction`` of it fits only the calibration, and the rest
    chooses the epoch. Why: the epoch (or fit) kept is the one that scored best on its rows, so
    those rows flatter it, and a calibration fitted on them inherits the flattery
    (docs/predict.md, "Calibrating on posts that chose nothing")."""
    rows = np.asarray(val_rows, dtype=np.int64)
    if fraction <= 0 or len(rows) == 0:
        return rows, rows
    held = np.zeros(len(rows), bool)
    held[np.random.default_rng([seed, 0xCA1]).permutation(len(rows))[:int(round(fraction * len(rows)))]] = True
    return rows[~held], rows[held]


def validation_rows(val_rows, train_cfg) -> tuple[np.ndarray, np.ndarray]:
    """:func:`holdout_rows` with the run's ``calibration_holdout`` and ``seed`` (0 and 0 without a
    config): what chooses the epoch, and what fits the calibration."""
    return holdout_rows(val_rows, float(getattr(train_cfg, "calibration_holdout", 0.0) or 0.0),
                        getattr(train_cfg, "seed", 0))


def fit_calibration(model: torch.nn.Module, store, val_rows, model_cfg=None, train_cfg=None) -> dict | None:
    """The calibration record of a trained model, fitted on the validation rows of ``store``.

    ``train_cfg.calibration`` picks the method (``temperature_uniform`` when ``train_cfg`` is
    None); ``None`` for ``"none"``; ``{"method": "none", "temperature": 1.0, "reason": ...}``
    when fewer than :data:`MIN_VAL_POSTS` validation rows are labelled (too few to fit on). Otherwise ``{"method",
    "temperature": T, "uniform_weight": eps, "fitted_on": "val", "num_posts": n, "ece_bins":
    15, "val_before": {ece, nll, brier, mean_confidence}, "val_after": {...}}``. ``model_cfg``
    is unused today (kept so every training path calls it the same way)."""
    method = getattr(train_cfg, "calibration", "temperature_uniform") if train_cfg is not None else \
        "temperature_uniform"
    if method == "none":
        return None
    holdout = float(getattr(train_cfg, "calibration_holdout", 0.0) or 0.0)
    rows = validation_rows(val_rows, train_cfg)[1]
    rows = rows[np.asarray(store.labels)[rows] >= 0] if len(rows) else rows
    if len(rows) < MIN_VAL_POSTS:
        return {"method": "none", "temperature": 1.0, "num_posts": int(len(rows)),
                "reason": f"{len(rows)} labelled validation posts: too few to fit on (< {MIN_VAL_POSTS})"}
    logits, labels = collect_logits(model, store, rows)
    return calibration_record(logits, labels, method,
                              f"val (a held-out {holdout:g} of it, not used to choose the epoch)" if holdout else "val")


def calibration_record(logits, labels, method: str, fitted_on: str) -> dict:
    """The calibration record (``method`` ``temperature`` or ``temperature_uniform``) fitted on
    ``logits`` and ``labels``, with the ECE, NLL and confidence before and after on them (``val_before``,
    ``val_after``) and where they came from (``fitted_on``)."""
    if method == "temperature":
        t, eps = fit_temperature(logits, labels), 0.0
    else:
        t, eps = fit_temperature_uniform(logits, labels)
    return {"method": method, "temperature": t, "uniform_weight": eps, "fitted_on": fitted_on,
            "num_posts": int(len(labels)), "ece_bins": ECE_BINS, "val_before": _stats(logits, labels, 1.0),
            "val_after": _stats(logits, labels, t, eps)}
