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

__all__ = ["classification_metrics", "accuracy_by_regime", "regime_table"]


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
