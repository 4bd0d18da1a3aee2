"""Evaluation: classification and calibration metrics, confusion / reliability / risk-coverage / t-SNE
figures and the on-disk report."""

from sgmft.eval.metrics import calibration_metrics, classification_metrics, coverage_at_accuracy, risk_coverage
from sgmft.eval.plots import (
    plot_confusion,
    plot_reliability,
    plot_risk_coverage,
    plot_tsne,
    plot_tsne_panels,
    tsne_embed,
)
from sgmft.eval.report import write_eval_report

__all__ = [
    "calibration_metrics",
    "classification_metrics",
    "coverage_at_accuracy",
    "plot_confusion",
    "plot_reliability",
    "plot_risk_coverage",
    "risk_coverage",
    "plot_tsne",
    "plot_tsne_panels",
    "tsne_embed",
    "write_eval_report",
]
