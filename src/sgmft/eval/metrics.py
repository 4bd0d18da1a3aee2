"""Classification metrics for evaluation reports (scikit-learn, JSON-ready output)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

__all__ = ["ECE_BINS", "ECE_NORM", "classification_metrics", "calibration_metrics", "accuracy_by_regime",
           "regime_table", "risk_coverage", "coverage_at_accuracy", "informative_modality",
           "explanation_agreement"]

#: The expected calibration error's binning, stated wherever an ECE is reported: 15 equal-width
#: confidence bins, the L1 gap |accuracy - confidence| weighted by each bin's share (Guo et al. 2017).
ECE_BINS = 15
ECE_NORM = "l1"


def _as_index_array(a, name: str, k: int) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= k):
        raise ValueError(f"{name} has class indices outside [0, {k}) "
                         f"(min {arr.min()}, max {arr.max()}); drop unlabelled rows first")
    return arr


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           label_names: Sequence[str]) -> dict:
    """Accuracy, macro/weighted F1, per-class P/R/F1/support and the confusion matrix.

    Every class in ``label_names`` appears in ``per_class`` and in the confusion matrix
    (rows = true, columns = predicted), even when absent from the data; undefined ratios are
    0 (``zero_division=0``). ``macro_f1`` follows scikit-learn's default and averages over the
    classes that occur in ``y_true`` or ``y_pred``, so an absent class does not drag it down.
    All values are plain Python numbers, ready for ``json.dump``.
    """
    names = [str(n) for n in label_names]
    k = len(names)
    if k == 0:
        raise ValueError("label_names is empty")
    yt = _as_index_array(y_true, "y_true", k)
    yp = _as_index_array(y_pred, "y_pred", k)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred differ in length: {len(yt)} vs {len(yp)}")
    if yt.size == 0:
        raise ValueError("no samples to evaluate")
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    per_class = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
               "support": int(s[i])}
        for i, name in enumerate(names)
    }
    cm = confusion_matrix(yt, yp, labels=labels)
    return {
        "accuracy": float(accuracy_score(yt, yp)),
        "macro_f1": float(f1_score(yt, yp, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(yt, yp, labels=labels, average="weighted",
                                      zero_division=0)),
        "num_samples": int(yt.size),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
    }


def accuracy_by_regime(y_true, y_pred, regimes, names: Sequence[str] | None = None,
                       oracle: dict | None = None) -> dict:
    """Accuracy per regime: ``{name: {"n", "accuracy", "oracle_accuracy"}}``.

    ``regimes`` holds one regime name (any string) per sample. ``names`` fixes the order and
    may list regimes absent from the data (their accuracy is None, n 0). ``oracle`` maps
    regime names to the oracle's accuracy on the same samples; regimes it lacks get None.
    """
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    reg = np.asarray(regimes).astype(str)
    if not (len(yt) == len(yp) == len(reg)):
        raise ValueError(f"y_true, y_pred and regimes differ in length: {len(yt)}, {len(yp)}, {len(reg)}")
    order = list(dict.fromkeys([str(n) for n in (names or [])] + sorted(set(reg.tolist()))))
    out = {}
    for name in order:
        sel = reg == name
        n = int(sel.sum())
        o = (oracle or {}).get(name)
        out[name] = {"n": n, "accuracy": float(np.mean(yt[sel] == yp[sel])) if n else None,
                     "oracle_accuracy": None if o is None else float(o)}
    return out


def regime_table(by_model: dict[str, dict], oracle_note: str = "") -> str:
    """Markdown table, one row per model, a column per regime: accuracy (%) per regime
    (``by_model[model] = accuracy_by_regime(...)``, or that with ``_std`` entries), then
    an ``oracle`` row when any regime has an oracle figure. ``n/a`` where unknown."""
    names = list(dict.fromkeys(r for m in by_model.values() for r in m))
    if not names:
        return ""
    counts = {r: next((m[r]["n"] for m in by_model.values() if r in m), 0) for r in names}
    head = "| model | " + " | ".join(f"{r} (n={counts[r]})" for r in names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 1)]

    def cell(d):
        if d is None or d.get("accuracy") is None:
            return "n/a"
        sd = d.get("accuracy_std")
        return f"{100 * d['accuracy']:.1f}" + (f" ± {100 * sd:.1f}" if sd else "")
    for model, regs in by_model.items():
        lines.append(f"| {model} | " + " | ".join(cell(regs.get(r)) for r in names) + " |")
    oracle = {r: next((m[r].get("oracle_accuracy") for m in by_model.values()
                       if r in m and m[r].get("oracle_accuracy") is not None), None) for r in names}
    lines.append(f"| oracle{oracle_note} | " + " | ".join("n/a" if oracle[r] is None else f"{100 * oracle[r]:.1f}"
                                                        for r in names) + " |")
    return "\n".join(lines)


def _checked_probs(probs, y_true, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must be (n, K) with K >= 2, got shape {p.shape}")
    if k is not None and p.shape[1] != k:
        raise ValueError(f"probs has {p.shape[1]} columns for {k} labels")
    yt = _as_index_array(y_true, "y_true", p.shape[1])
    if len(yt) != len(p):
        raise ValueError(f"y_true and probs differ in length: {len(yt)} vs {len(p)}")
    if len(yt) == 0:
        raise ValueError("no samples to evaluate")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise ValueError("probs must be finite and non-negative")
    return p / p.sum(1, keepdims=True), yt               # float32 softmax rows: sum exactly 1


def calibration_metrics(y_true, probs, *, n_bins: int = ECE_BINS) -> dict:
    """How well the probabilities mean what they say, on labelled posts:

    * ``ece``: expected calibration error (torchmetrics ``multiclass_calibration_error``,
      ``n_bins`` equal-width bins of the top probability, L1 norm);
    * ``nll``: mean negative log-likelihood of the true class (scikit-learn ``log_loss``);
    * ``brier``: multiclass Brier score, sum over classes of (p - one-hot)^2, mean over posts
      (scikit-learn ``brier_score_loss``, never halved, also for K = 2; 0 is perfect, 2 the worst);
    * ``mean_confidence`` (mean top probability) and ``accuracy``: an ECE near their gap
      means the model is uniformly over- (confidence > accuracy) or under-confident;
    * ``ece_bins``, ``ece_norm``: the binning, so the figure is never quoted without it.
    """
    import torch
    from sklearn.metrics import brier_score_loss, log_loss
    from torchmetrics.functional.classification import multiclass_calibration_error

    p, yt = _checked_probs(probs, y_true)
    k = p.shape[1]
    ece = multiclass_calibration_error(torch.as_tensor(p), torch.as_tensor(yt), num_classes=k, n_bins=n_bins,
                                       norm=ECE_NORM)
    return {"ece": float(ece), "nll": float(log_loss(yt, p, labels=list(range(k)))),
            "brier": float(brier_score_loss(yt, p, labels=list(range(k)), scale_by_half=False)),
            "mean_confidence": float(p.max(1).mean()), "accuracy": float(np.mean(p.argmax(1) == yt)),
            "ece_bins": int(n_bins), "ece_norm": ECE_NORM}


def risk_coverage(y_true, probs) -> dict:
    """The risk-coverage curve of abstaining below a confidence threshold (Geifman & El-Yaniv 2017).

    Posts are sorted by top probability, most confident first; keeping the ``m`` most
    confident gives ``coverage`` m / n and ``accuracy`` on the kept ones (risk = 1 -
    accuracy). ``threshold[m-1]`` is the top probability of the m-th post, i.e. the
    ``--min-confidence`` that keeps (at least) those posts. Ties in confidence are kept or
    dropped together (the curve has one point per distinct threshold).
    """
    p, yt = _checked_probs(probs, y_true)
    conf = p.max(1)
    order = np.argsort(-conf, kind="stable")
    hits = np.cumsum(p.argmax(1)[order] == yt[order])
    c = conf[order]
    last = np.r_[np.flatnonzero(c[1:] != c[:-1]), len(c) - 1]      # last post of each tie group
    m = last + 1
    return {"coverage": (m / len(c)).tolist(), "accuracy": (hits[last] / m).tolist(),
            "threshold": c[last].tolist()}


def coverage_at_accuracy(curve: dict, target: float) -> dict:
    """The largest coverage whose kept posts reach ``target`` accuracy, with the confidence
    threshold that gives it; coverage 0 and threshold None when even the most confident posts
    fall short."""
    cov, acc, thr = (np.asarray(curve[k], dtype=float) for k in ("coverage", "accuracy", "threshold"))
    ok = np.flatnonzero(acc >= target)
    if len(ok) == 0:
        return {"target_accuracy": target, "coverage": 0.0, "min_confidence": None, "accuracy": None}
    i = ok[np.argmax(cov[ok])]
    return {"target_accuracy": target, "coverage": float(cov[i]), "min_confidence": float(thr[i]),
            "accuracy": float(acc[i])}


def informative_modality(regime: str) -> str | None:
    """The one modality that shows the place in a SimFeat regime (docs/simfeat.md), else None:
    coarse names ``text`` / ``image``; fine names ``text_generic`` / ``text_other_place`` (the
    text does not show it: the image does) and ``image_generic`` / ``image_other_place``
    (the text does). ``both`` and ``neither`` have none."""
    r = str(regime)
    if r in ("text", "image"):
        return r
    if r.startswith("text_"):
        return "image"
    if r.startswith("image_"):
        return "text"
    return None


def explanation_agreement(regimes, correct, explanations) -> dict:
    """How often the per-post account names the regime's informative modality.

    Counted over posts whose regime has exactly one informative modality
    (:func:`informative_modality`) and that are classified correctly; a post agrees when its
    ``decided_by`` is that modality. Returns ``{"n", "agree", "fraction", "by_regime":
    {regime: {"n", "agree", "fraction"}}}`` (fraction None for no posts)."""
    reg = [str(r) for r in regimes]
    correct = np.asarray(correct, dtype=bool)
    if not (len(reg) == len(correct) == len(explanations)):
        raise ValueError(f"regimes, correct and explanations differ in length: {len(reg)}, {len(correct)}, "
                         f"{len(explanations)}")
    by: dict[str, list[int]] = {}
    for r, ok, e in zip(reg, correct, explanations):
        m = informative_modality(r)
        if m is None or not ok:
            continue
        c = by.setdefault(r, [0, 0])
        c[0] += 1
        c[1] += e["decided_by"] == m
    def frac(n, a):
        return {"n": n, "agree": a, "fraction": a / n if n else None}
    n, a = sum(v[0] for v in by.values()), sum(v[1] for v in by.values())
    return {**frac(n, a), "by_regime": {r: frac(*v) for r, v in sorted(by.items())}}
