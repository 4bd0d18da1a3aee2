"""Evaluation: classification metrics, confusion / t-SNE figures and the on-disk report."""

from sgmft.eval.metrics import classification_metrics
from sgmft.eval.plots import (
    plot_confusion,
    plot_tsne,
    plot_tsne_panels,
    tsne_embed,
)
from sgmft.eval.report import write_eval_report

__all__ = [
    "classification_metrics",
    "plot_confusion",
    "plot_tsne",
    "plot_tsne_panels",
    "tsne_embed",
    "write_eval_report",
]
