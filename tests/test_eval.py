"""Tests for sgmft.eval: metrics against scikit-learn, figures, t-SNE sampling, report files."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from sgmft.eval import (
    calibration_metrics,
    classification_metrics,
    plot_confusion,
    plot_tsne,
    plot_tsne_panels,
    tsne_embed,
    write_eval_report,
)

NAMES = ["home", "work", "school", "restaurant", "cinema", "gym", "shopping", "travel"]


def _blobs(n=90, k=3, d=16, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.normal(0, 6, (k, d))[y] + rng.normal(0, 1, (n, d))
    return x.astype(np.float32), y


def _assert_real_png(path, min_side=200):
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= min_side and h >= min_side
        extrema = im.convert("RGB").getextrema()
        assert any(lo != hi for lo, hi in extrema), "image is a single colour"
        colours = im.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is None or len(colours) > 10


# ----------------------------------------------------------------------------- metrics
def test_metrics_match_sklearn_and_hand_accuracy():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
    y_pred = np.array([0, 1, 1, 1, 2, 0, 2, 3, 3, 2])
    m = classification_metrics(y_true, y_pred, NAMES)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["num_samples"] == 10
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(8),
                                                 zero_division=0)
    for i, name in enumerate(NAMES):
        pc = m["per_class"][name]
        assert pc == {"precision": pytest.approx(p[i]), "recall": pytest.approx(r[i]),
                      "f1": pytest.approx(f[i]), "support": int(s[i])}
    # Hand-checked entries: class 2 has P = 2/3, R = 2/3.
    assert m["per_class"]["school"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["school"]["recall"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=range(8)).tolist()


def test_metrics_lists_absent_classes_and_is_json_ready():
    m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), NAMES)
    assert list(m["per_class"]) == NAMES
    assert set(m) >= {"accuracy", "macro_f1", "weighted_f1", "num_samples", "per_class",
                      "confusion_matrix"}
    for pc in m["per_class"].values():
        assert set(pc) == {"precision", "recall", "f1", "support"}
    assert m["per_class"]["travel"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                        "support": 0}
    assert np.asarray(m["confusion_matrix"]).shape == (8, 8)
    assert json.loads(json.dumps(m)) == m


def test_metrics_errors():
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(np.array([0, -1]), np.array([0, 1]), NAMES)
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(np.array([0, 1]), np.array([0, 8]), NAMES)
    with pytest.raises(ValueError, match="length"):
        classification_metrics(np.array([0, 1]), np.array([0]), NAMES)
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics(np.array([], int), np.array([], int), NAMES)


# ----------------------------------------------------------------------------- figures
@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_writes_png(tmp_path, normalize):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 20, (8, 8)) + np.eye(8, dtype=int) * 60
    cm[7] = 0  # an empty row must not produce NaNs
    out = plot_confusion(cm, NAMES, tmp_path / "sub" / "cm.png", title="test",
                         normalize=normalize)
    assert out == tmp_path / "sub" / "cm.png"
    _assert_real_png(out)
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_plot_confusion_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plot_confusion(np.zeros((3, 3)), NAMES, tmp_path / "x.png")


def test_tsne_embed_subsamples_to_requested_count():
    x, y = _blobs(n=120)
    coords, idx = tsne_embed(x, max_points=60, seed=0, labels=y, max_iter=250)
    assert coords.shape == (60, 2) and idx.shape == (60,)
    assert len(np.unique(idx)) == 60 and idx.min() >= 0 and idx.max() < 120
    assert np.all(np.diff(idx) > 0)
    assert np.all(np.isfinite(coords))
    # Stratified: 3 equal classes -> 20 rows each.
    np.testing.assert_array_equal(np.bincount(y[idx]), [20, 20, 20])
    # Deterministic.
    coords2, idx2 = tsne_embed(x, max_points=60, seed=0, labels=y, max_iter=250)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_allclose(coords, coords2)


def test_tsne_embed_wide_input_no_subsample_and_tiny():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 300))  # wide: goes through PCA; perplexity clamped
    coords, idx = tsne_embed(x, max_points=100, max_iter=250)
    assert coords.shape == (40, 2)
    np.testing.assert_array_equal(idx, np.arange(40))
    coords, idx = tsne_embed(x[:2], max_iter=250)
    assert coords.shape == (2, 2)
    with pytest.raises(ValueError):
        tsne_embed(np.zeros(5))


def test_plot_tsne_and_panels(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(160) % 8
    coords = rng.normal(0, 1, (160, 2)) + np.c_[np.cos(y), np.sin(y)] * 6
    y_unl = y.copy()
    y_unl[:5] = -1
    p1 = plot_tsne(coords, y_unl, NAMES, tmp_path / "tsne.png", title="t-SNE")
    _assert_real_png(p1)
    p2 = plot_tsne_panels([("a", coords, y), ("b", coords[::-1], y), ("c", coords * 2, y),
                           ("d", coords, y)], NAMES, tmp_path / "panels.png", ncols=3)
    _assert_real_png(p2)
    with Image.open(p2) as im:
        w, h = im.size
    assert w > h  # 3 columns x 2 rows
    with pytest.raises(ValueError):
        plot_tsne_panels([], NAMES, tmp_path / "none.png")


# ----------------------------------------------------------------------------- report
def test_write_eval_report(tmp_path):
    x, y = _blobs(n=80, k=8, d=32)
    rng = np.random.default_rng(0)
    pred = np.where(rng.random(80) < 0.7, y, (y + 1) % 8)
    probs = rng.dirichlet(np.ones(8), 80)
    ids = np.array([f"post{i}" for i in range(80)])
    m = write_eval_report(tmp_path / "rep", y_true=y, y_pred=pred, probs=probs, fused=x,
                          label_names=NAMES, ids=ids, title="unit", tsne_max_points=50,
                          tsne_max_iter=250)
    out = tmp_path / "rep"
    assert {p.name for p in out.iterdir()} == {"metrics.json", "confusion.png", "tsne.png",
                                              "tsne_coords.npz", "predictions.csv", "reliability.png",
                                              "risk_coverage.png"}
    z = np.load(out / "tsne_coords.npz")
    assert z["coords"].shape == (50, 2) and np.array_equal(z["labels"], y[z["rows"]])
    loaded = json.loads((out / "metrics.json").read_text())
    assert loaded == m
    assert loaded["title"] == "unit"
    assert loaded["accuracy"] == pytest.approx(np.mean(pred == y))
    _assert_real_png(out / "confusion.png")
    _assert_real_png(out / "tsne.png")
    _assert_real_png(out / "reliability.png")
    _assert_real_png(out / "risk_coverage.png")
    cal = calibration_metrics(y, probs)
    assert loaded["ece"] == pytest.approx(cal["ece"]) and loaded["ece_bins"] == 15
    assert loaded["nll"] == pytest.approx(cal["nll"]) and loaded["brier"] == pytest.approx(cal["brier"])
    assert set(loaded["risk_coverage"]["coverage_at_accuracy"]) == {"0.95", "0.90"}
    assert "calibration" not in loaded                        # no uncalibrated probabilities given
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 80
    assert list(rows[0]) == ["id", "pred"] + [f"prob_{n}" for n in NAMES] + ["true"]
    assert rows[3]["id"] == "post3"
    assert rows[3]["true"] == NAMES[y[3]] and rows[3]["pred"] == NAMES[pred[3]]
    assert float(rows[3]["prob_gym"]) == pytest.approx(probs[3, 5], rel=1e-5)


def test_write_eval_report_without_fused_or_probs(tmp_path):
    y = np.array([0, 1, 2, 3] * 5)
    m = write_eval_report(tmp_path, y_true=y, y_pred=y, probs=None, fused=None,
                          label_names=NAMES)
    assert m["accuracy"] == 1.0 and m["title"] == ""
    assert not (tmp_path / "tsne.png").exists()
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == ",".join(["id", "pred"] + [f"prob_{n}" for n in NAMES] + ["true"])
    assert lines[1].split(",")[1] == NAMES[y[0]] and float(lines[1].split(",")[2 + y[0]]) == 1.0   # one-hot


# ----------------------------------------------------------------------------- calibration
def test_calibration_metrics_by_hand():
    # 4 posts, 2 classes: confidences 0.9 (right), 0.8 (wrong), 0.6 (right), 0.6 (right)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 0, 0, 1])
    m = calibration_metrics(y, probs, n_bins=10)
    # bins (0.5, 0.6]: conf 0.6, acc 1 (two posts); (0.7, 0.8]: 0.8 vs 0; (0.8, 0.9]: 0.9 vs 1
    assert m["ece"] == pytest.approx((2 * 0.4 + 0.8 + 0.1) / 4, abs=1e-6)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.2, 0.6, 0.6])))
    assert m["brier"] == pytest.approx(np.mean([2 * 0.1 ** 2, 2 * 0.8 ** 2, 2 * 0.4 ** 2, 2 * 0.4 ** 2]))
    assert m["mean_confidence"] == pytest.approx(np.mean([0.9, 0.8, 0.6, 0.6]))
    assert m["accuracy"] == 0.75 and m["ece_bins"] == 10 and m["ece_norm"] == "l1"
    with pytest.raises(ValueError, match="probs must be"):
        calibration_metrics(y, probs[:, :1])
    with pytest.raises(ValueError, match="differ in length"):
        calibration_metrics(y[:3], probs)


def test_reliability_bins_give_the_torchmetrics_ece():
    """The diagram draws the same bins the reported ECE is computed on."""
    from sgmft.eval.plots import reliability_bins

    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(5) * 0.4, 500)
    y = rng.integers(0, 5, 500)
    b = reliability_bins(y, probs, 15)
    ok = b["count"] > 0
    ece = np.sum(b["count"][ok] / 500 * np.abs(b["accuracy"][ok] - b["confidence"][ok]))
    assert ece == pytest.approx(calibration_metrics(y, probs)["ece"], abs=1e-5)
    assert b["count"].sum() == 500


def test_risk_coverage_by_hand():
    from sgmft.eval.metrics import coverage_at_accuracy, risk_coverage

    # confidences 0.9 0.8 0.7 0.7 0.6, correct: yes no yes yes no
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([0, 0, 0, 1, 1])
    c = risk_coverage(y, probs)
    assert c["coverage"] == [0.2, 0.4, 0.8, 1.0]                 # the two 0.7s are kept together
    assert c["accuracy"] == pytest.approx([1.0, 0.5, 0.75, 0.6])
    assert c["threshold"] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert coverage_at_accuracy(c, 0.95) == {"target_accuracy": 0.95, "coverage": 0.2,
                                             "min_confidence": pytest.approx(0.9), "accuracy": 1.0}
    assert coverage_at_accuracy(c, 0.7)["coverage"] == 0.8
    assert coverage_at_accuracy(risk_coverage([1], [[0.9, 0.1]]), 0.5)["min_confidence"] is None


def test_explanation_agreement_counts_single_modality_posts_classified_right():
    from sgmft.eval.metrics import explanation_agreement, informative_modality

    assert [informative_modality(r) for r in ("text", "image", "both", "neither", "text_generic",
                                              "text_other_place", "image_generic", "image_other_place")] == \
        [None if r is None else r for r in ("text", "image", None, None, "image", "image", "text", "text")]
    regimes = ["text_generic", "image_generic", "image_other_place", "both", "text_generic", "text"]
    correct = [True, True, True, True, False, True]
    expl = [{"decided_by": d} for d in ("image", "both", "text", "both", "image", "text")]
    a = explanation_agreement(regimes, correct, expl)
    assert (a["n"], a["agree"]) == (4, 3) and a["fraction"] == 0.75
    assert a["by_regime"]["image_generic"] == {"n": 1, "agree": 0, "fraction": 0.0}
    assert "both" not in a["by_regime"]
