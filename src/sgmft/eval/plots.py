"""Figures: confusion matrix, t-SNE maps (and the t-SNE embedding they draw).

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, never
through ``pyplot``: no display is needed and the caller's global backend is left untouched.
Every file is written atomically (temp file in the same folder, then ``os.replace``), so a
crash never leaves a half-written report behind.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sgmft import atomic

__all__ = [
    "plot_confusion",
    "plot_reliability",
    "plot_risk_coverage",
    "reliability_bins",
    "tsne_embed",
    "plot_tsne",
    "plot_tsne_panels",
    "write_eval_report",
    "DPI",
]

DPI = 150
_UNLABELLED_COLOUR = (0.6, 0.6, 0.6, 1.0)


# --------------------------------------------------------------------------- helpers
def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return atomic.write_bytes(path, buf.getvalue())


def _palette(k: int) -> list[tuple[float, float, float, float]]:
    """Colour-blind-friendly qualitative colours (tab10; tab20 beyond ten classes)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


# --------------------------------------------------------------------------- confusion
def plot_confusion(cm: np.ndarray, label_names: Sequence[str], path, title: str = "",
                   normalize: bool = True) -> Path:
    """Save an annotated confusion-matrix heat map (rows = true, columns = predicted) as PNG.

    With ``normalize`` each row is divided by its support (recall on the diagonal) and cells
    show the rate with the raw count beneath; empty rows stay at zero.
    """
    cm = np.asarray(cm, dtype=float)
    names = [str(n) for n in label_names]
    k = len(names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {k} labels")
    if normalize:
        support = cm.sum(axis=1, keepdims=True)
        shown = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)
        vmax = 1.0
    else:
        shown = cm
        vmax = max(float(cm.max()), 1.0)

    side = max(4.5, 0.65 * k + 2.5)
    fig = _new_figure((side + 1.0, side))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.ax.set_ylabel("fraction of true class" if normalize else "count", rotation=90)

    font = 9 if k <= 8 else max(5, 9 - (k - 8) // 2)
    for i in range(k):
        for j in range(k):
            v = shown[i, j]
            text = f"{v:.2f}\n({int(cm[i, j])})" if normalize else f"{int(cm[i, j])}"
            colour = "white" if v > 0.55 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=font,
                    linespacing=1.1)

    ax.set_xticks(range(k), names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(np.arange(-0.5, k, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, k, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)


# --------------------------------------------------------------------------- t-SNE
def _subsample(n: int, max_points: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
    """Indices of ``max_points`` rows, stratified by ``labels`` when that is possible."""
    if n <= max_points:
        return np.arange(n)
    idx = np.arange(n)
    if labels is not None:
        from sklearn.model_selection import train_test_split

        try:
            keep, _ = train_test_split(idx, train_size=max_points, stratify=labels,
                                       random_state=seed)
            return np.sort(keep)
        except ValueError:  # a class too small to stratify: plain random sample
            pass
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_points, replace=False))


def tsne_embed(x: np.ndarray, *, max_points: int = 2000, seed: int = 0,
               perplexity: float = 30.0, labels: np.ndarray | None = None,
               max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of feature rows ``x`` for plotting; returns ``(coords, row_indices)``.

    More than ``max_points`` rows are randomly subsampled first (stratified by ``labels``
    when given) because t-SNE is quadratic-ish and dense plots are unreadable. Wide inputs
    are reduced to 50 dimensions by PCA (the usual t-SNE preprocessing). ``perplexity`` is
    lowered automatically for very small samples; ``max_iter`` (>= 250) trades quality for
    speed. Deterministic by ``seed``.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (rows, features), got shape {x.shape}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("x has no rows")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or infinite values")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have one entry per row: {labels.shape} vs ({n},)")
    idx = _subsample(n, max_points, seed, labels)
    xs = x[idx]
    m = len(xs)
    if m < 4:  # too few points for t-SNE: lay them on a line
        return np.column_stack([np.arange(m, dtype=np.float32),
                                np.zeros(m, dtype=np.float32)]), idx
    if xs.shape[1] > 50:
        xs = PCA(n_components=min(50, m), random_state=seed).fit_transform(xs)
    perp = float(min(perplexity, max(1.0, (m - 1) / 3.0)))
    coords = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto",
                  max_iter=int(max_iter), random_state=seed).fit_transform(xs)
    return coords.astype(np.float32), idx


def _scatter_classes(ax, coords, labels, colours, seed: int = 0) -> None:
    coords = np.asarray(coords, dtype=float)
    labels = np.asarray(labels).astype(np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(labels):
        raise ValueError(f"coords must be (n, 2) matching labels; got {coords.shape} and "
                         f"{labels.shape}")
    if labels.size and labels.max() >= len(colours):
        raise ValueError(f"label {labels.max()} outside the {len(colours)} named classes")
    # One scatter in random order, so no class is systematically drawn on top of the others.
    order = np.random.default_rng(seed).permutation(len(labels))
    c = [colours[v] if v >= 0 else _UNLABELLED_COLOUR for v in labels[order]]
    size = float(np.clip(4000.0 / max(len(labels), 1), 4.0, 30.0))
    ax.scatter(coords[order, 0], coords[order, 1], c=c, s=size, alpha=0.8, linewidths=0,
               rasterized=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    for spine in ax.spines.values():  # faint frame: separates panels, no axis clutter
        spine.set_color("#d0d0d0")


def _legend_handles(label_names, colours, include_unlabelled: bool):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", markersize=7, color=col, label=name)
               for name, col in zip(label_names, colours, strict=True)]
    if include_unlabelled:
        handles.append(Line2D([], [], marker="o", linestyle="", markersize=7,
                              color=_UNLABELLED_COLOUR, label="unlabelled"))
    return handles


def plot_tsne(coords: np.ndarray, labels: np.ndarray, label_names: Sequence[str], path,
              title: str = "") -> Path:
    """Save a t-SNE scatter coloured by class with a named legend (paper Figs. 5, 7, 8).

    Negative labels are drawn grey as "unlabelled".
    """
    names = [str(n) for n in label_names]
    colours = _palette(len(names))
    labels = np.asarray(labels).astype(np.int64)
    fig = _new_figure((6.4, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    _scatter_classes(ax, coords, labels, colours)
    ax.legend(handles=_legend_handles(names, colours, bool(np.any(labels < 0))),
              loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_tsne_panels(panels: list[tuple[str, np.ndarray, np.ndarray]],
                     label_names: Sequence[str], path, ncols: int = 3,
                     title: str = "") -> Path:
    """Save several t-SNE maps (one ``(title, coords, labels)`` per model variant) side by side.

    All panels share one colour mapping and one legend below the grid, so variants can be
    compared at a glance.
    """
    if not panels:
        raise ValueError("no panels to plot")
    names = [str(n) for n in label_names]
    colours = _palette(len(names))
    ncols = max(1, min(int(ncols), len(panels)))
    nrows = -(-len(panels) // ncols)
    fig = _new_figure((4.0 * ncols, 4.0 * nrows + 0.9))
    any_unlabelled = False
    for i, (panel_title, coords, labels) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        labels = np.asarray(labels).astype(np.int64)
        any_unlabelled |= bool(np.any(labels < 0))
        _scatter_classes(ax, coords, labels, colours)
        ax.set_title(str(panel_title))
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0.9 / (4.0 * nrows + 0.9), 1, 1))
    handles = _legend_handles(names, colours, any_unlabelled)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8),
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    return _save_png(fig, path)


# --------------------------------------------------------------------------- calibration
def reliability_bins(y_true, probs, n_bins: int = 15) -> dict:
    """Per equal-width bin of the top probability (right-closed, as torchmetrics bins for its
    ECE): ``count``, ``confidence`` (mean top probability) and ``accuracy``; NaN for empty bins."""
    p = np.asarray(probs, dtype=float)
    y = np.asarray(y_true).astype(np.int64)
    conf, hit = p.max(1), (p.argmax(1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, n_bins) / count
        acc = np.bincount(idx, hit, n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": acc}


def plot_reliability(y_true, curves: list[tuple[str, np.ndarray]], path, n_bins: int = 15,
                     title: str = "") -> Path:
    """Save a reliability diagram: per confidence bin, accuracy against mean confidence (the
    diagonal is perfect calibration), one line per ``(label, probs)`` (e.g. before and after
    temperature scaling), and below it the share of posts per bin."""
    if not curves:
        raise ValueError("no probabilities to plot")
    fig = _new_figure((5.6, 6.2))
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax, axh = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    ax.plot([0, 1], [0, 1], linestyle="--", color="#888888", linewidth=1, label="perfect calibration")
    colours = _palette(max(len(curves), 2))
    n = len(np.asarray(y_true))
    width = 1.0 / n_bins / (len(curves) + 0.5)
    for i, (label, probs) in enumerate(curves):
        b = reliability_bins(y_true, probs, n_bins)
        ok = b["count"] > 0
        ax.plot(b["confidence"][ok], b["accuracy"][ok], marker="o", markersize=4, color=colours[i], label=label)
        axh.bar(b["edges"][:-1] + (i + 0.25) * width, b["count"] / max(n, 1), width=width, align="edge",
                color=colours[i], alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_xticklabels([])
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    axh.set_xlim(0, 1)
    axh.set_xlabel(f"confidence (top probability), {n_bins} equal-width bins")
    axh.set_ylabel("share of posts")
    if title:
        ax.set_title(title)
    return _save_png(fig, path)


def plot_risk_coverage(curves: list[tuple[str, dict]], path, targets=(0.95, 0.90), title: str = "") -> Path:
    """Save the accuracy-coverage curve of abstaining below a confidence threshold, one line per
    ``(label, curve)`` (:func:`sgmft.eval.metrics.risk_coverage`), with the target accuracies
    as dotted lines."""
    if not curves:
        raise ValueError("no curves to plot")
    fig = _new_figure((5.6, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    colours = _palette(max(len(curves), 2))
    lo = 1.0
    for i, (label, c) in enumerate(curves):
        ax.plot(c["coverage"], c["accuracy"], color=colours[i], label=label, linewidth=1.5)
        lo = min(lo, float(np.min(c["accuracy"])))
    for t in targets:
        ax.axhline(t, linestyle=":", color="#666666", linewidth=1)
        ax.text(0.01, t, f"{100 * t:g} % accuracy", va="bottom", fontsize=8, color="#444444")
    ax.set_xlim(0, 1)
    ax.set_ylim(max(0.0, min(lo, min(targets)) - 0.05), 1.005)
    ax.set_xlabel("coverage (share of posts answered, most confident first)")
    ax.set_ylabel("accuracy on the answered posts")
    ax.legend(loc="lower left", frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)
