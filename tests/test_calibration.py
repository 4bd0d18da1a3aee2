"""Post-hoc calibration (issue 18): temperature scaling, alone or with a uniform weight, fitted on
the validation split (sgmft.train.calibrate), stored in the checkpoint (sgmft.checkpoint),
applied by predict (sgmft.predict.Predictor), evaluate and export; the argmax never changes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sgmft.checkpoint import CheckpointError, calibration_entry, load_checkpoint, read_calibration
from sgmft.predict import Predictor
from sgmft.checkpoint import calibrated_probs
from sgmft.train.calibrate import fit_calibration, fit_temperature, fit_temperature_uniform

from conftest import make_store


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny concat runs on a separable store, one per calibration method (the default first)."""
    from sgmft.config import load_preset
    from sgmft.train import train

    root = tmp_path_factory.mktemp("calib")
    store = make_store(root / "store", n=300, dim=16, k=4, with_split=True)
    out = {"root": root, "store": store}
    for name, cal in (("uniform", "temperature_uniform"), ("temperature", "temperature"), ("none", "none")):
        p = load_preset("concat")
        p.train.epochs, p.train.batch_size, p.train.progress, p.train.calibration = 3, 32, False, cal
        train(store, root / name, p)
        out[name] = root / name
    return out


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(20000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / 2.0, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(z.numpy(), y.numpy()) == pytest.approx(2.0, rel=0.05)
    # over-confident logits (labels drawn at T = 0.5 of the logits / 2): T < 1 sharpens
    y2 = torch.multinomial(torch.softmax(z * 2, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(z.numpy(), y2.numpy()) == pytest.approx(0.5, rel=0.05)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == 1.0


def test_fit_temperature_uniform_recovers_both_parameters():
    g = torch.Generator().manual_seed(1)
    z = 4 * torch.randn(40000, 6, generator=g, dtype=torch.float64)
    y = torch.multinomial(calibrated_probs(z, 1.5, 0.1), 1, generator=g).squeeze(1)
    t, eps = fit_temperature_uniform(z.numpy(), y.numpy())
    assert t == pytest.approx(1.5, rel=0.06) and eps == pytest.approx(0.1, abs=0.015)
    # labels with no unpredictable part: eps goes to ~0 and T to the one-scalar fit
    y0 = torch.multinomial(torch.softmax(z / 0.7, -1), 1, generator=g).squeeze(1)
    t0, eps0 = fit_temperature_uniform(z.numpy(), y0.numpy())
    assert eps0 < 0.01 and t0 == pytest.approx(fit_temperature(z.numpy(), y0.numpy()), rel=0.05)
    assert fit_temperature_uniform(np.zeros((0, 3)), np.zeros(0, np.int64)) == (1.0, 0.0)


@pytest.mark.parametrize("name,method", [("uniform", "temperature_uniform"), ("temperature", "temperature")])
def test_training_stores_the_calibration_and_predict_applies_it(runs, name, method):
    cfg = json.loads((runs[name] / "model" / "config.json").read_text())
    rec = cfg["calibration"]
    assert rec["method"] == method and rec["fitted_on"] == "val" and rec["ece_bins"] == 15
    assert (rec["uniform_weight"] == 0.0) == (method == "temperature")
    split = np.load(runs[name] / "split.npy", allow_pickle=True)
    assert rec["num_posts"] == int((split == "val").sum()) > 0
    assert rec["val_after"]["nll"] <= rec["val_before"]["nll"] + 1e-9      # the fit minimises the val NLL
    pred = Predictor.load(runs[name])
    assert pred.temperature == pytest.approx(rec["temperature"]) and pred.temperature != 1.0
    assert pred.uniform_weight == pytest.approx(rec["uniform_weight"])
    p = pred.predict_store(runs["store"])
    z = torch.as_tensor(p.logits, dtype=torch.float64)
    want = (1 - rec["uniform_weight"]) * torch.softmax(z / rec["temperature"], -1) + rec["uniform_weight"] / 4
    np.testing.assert_allclose(p.probs, want.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", ["uniform", "temperature"])
def test_calibration_never_changes_the_argmax_or_the_accuracy(runs, name):
    from sgmft.features import FeatureStore

    fs = FeatureStore.open(runs["store"])
    pred = Predictor.load(runs[name])
    p = pred.predict_store(fs)
    q = Predictor(pred.model, pred.label_names, pred.features, info=pred.info, calibration={"temperature": 1.0})
    assert q.temperature == 1.0 and q.uniform_weight == 0.0
    q = q.predict_store(fs)
    np.testing.assert_array_equal(p.top, q.top)
    np.testing.assert_array_equal(p.top, p.logits.argmax(1))
    y = np.asarray(fs.labels)
    assert np.mean(p.top == y) == np.mean(q.top == y)
    assert not np.allclose(p.probs, q.probs)                  # the probabilities did move


def test_calibration_none_and_old_checkpoints_mean_temperature_one(runs, tmp_path):
    assert "calibration" not in json.loads((runs["none"] / "model" / "config.json").read_text())
    assert Predictor.load(runs["none"]).temperature == 1.0
    _, info = load_checkpoint(runs["none"])
    none = {"method": "none", "temperature": 1.0, "uniform_weight": 0.0}
    assert info["calibration"] == none
    # an older checkpoint: no calibration entry at all
    assert read_calibration({"format": "sgmft-checkpoint"}, "x") == none
    # a record without uniform_weight (the one-scalar temperature) reads as eps = 0
    assert read_calibration({"calibration": {"method": "temperature", "temperature": 2}}, "x")["uniform_weight"] == 0


def test_a_bad_calibration_record_is_refused_naming_the_file(runs, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(runs["temperature"] / "model", bad)
    cfg = json.loads((bad / "config.json").read_text())
    for rec in ({"method": "temperature", "temperature": 0}, {"method": "platt", "temperature": 1.0},
                {"method": "temperature", "temperature": "2"}, [1.5],
                {"method": "temperature_uniform", "temperature": 1.0, "uniform_weight": 1.0}):
        cfg["calibration"] = rec
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=r"config\.json: 'calibration'"):
            load_checkpoint(bad)
    with pytest.raises(CheckpointError):
        calibration_entry({"method": "temperature", "temperature": float("nan")})
    assert calibration_entry(None) == {}


def test_fit_calibration_uses_labelled_validation_rows_only(runs):
    from sgmft.features import FeatureStore

    fs = FeatureStore.open(runs["store"])
    model = Predictor.load(runs["none"]).model
    assert fit_calibration(model, fs, np.arange(10), None, type("C", (), {"calibration": "none"})()) is None
    for rows in (np.array([], dtype=np.int64), fs.indices("val")[:49]):      # too few to fit two parameters
        skip = fit_calibration(model, fs, rows)
        assert skip["method"] == "none" and skip["temperature"] == 1.0 and "too few" in skip["reason"]
    rec = fit_calibration(model, fs, fs.indices("val"))
    assert rec["method"] == "temperature_uniform" and rec["num_posts"] == len(fs.indices("val"))
    assert not model.training


def test_save_pretrained_keeps_the_calibration(runs, tmp_path):
    pred = Predictor.load(runs["uniform"])
    pred.save_pretrained(tmp_path / "shared")
    back = Predictor.load(tmp_path / "shared")
    assert back.temperature == pytest.approx(pred.temperature) and back.uniform_weight == pred.uniform_weight > 0


def test_evaluate_reports_calibration_before_and_after(runs, tmp_path):
    from sgmft.eval.run import evaluate

    m = evaluate(runs["uniform"], runs["store"], tmp_path / "ev", tsne_max_points=30)
    cal = m["calibration"]
    assert cal["method"] == "temperature_uniform"
    assert cal["temperature"] == pytest.approx(Predictor.load(runs["uniform"]).temperature)
    assert cal["before"]["accuracy"] == cal["after"]["accuracy"] == m["accuracy"]
    assert m["ece"] == cal["after"]["ece"] and m["ece_bins"] == 15
    assert cal["before"]["ece"] != cal["after"]["ece"]
    cov = m["risk_coverage"]["coverage_at_accuracy"]
    assert set(cov) == {"0.95", "0.90"} and 0 <= cov["0.90"]["coverage"] <= 1
    assert cov["0.95"]["coverage"] <= cov["0.90"]["coverage"]
    for f in ("reliability.png", "risk_coverage.png", "confusion.png"):
        assert (tmp_path / "ev" / f).stat().st_size > 1000


def test_export_applies_the_calibration(runs, tmp_path):
    from sgmft.predict.export import export_model

    s = export_model(runs["uniform"], "torch-export", tmp_path / "m.pt2")
    pred = Predictor.load(runs["uniform"])
    assert s["temperature"] == pytest.approx(pred.temperature) and s["max_abs_diff"] <= 1e-5
    assert s["uniform_weight"] == pytest.approx(pred.uniform_weight) and s["uniform_weight"] > 0
    from sgmft.features import FeatureStore

    fs = FeatureStore.open(runs["store"])
    x_t, x_i = (torch.tensor(np.asarray(a[:7])) for a in (fs.text, fs.image))
    on = torch.ones(7, dtype=torch.bool)
    with torch.inference_mode():
        got = torch.export.load(str(tmp_path / "m.pt2")).module()(x_t, x_i, on, on)
    np.testing.assert_allclose(torch.softmax(got, -1).numpy(), pred.predict_store(fs, np.arange(7)).probs,
                               atol=1e-6)


def test_calibration_holdout_keeps_the_calibration_rows_out_of_selection(runs):
    """calibration_holdout=f: a seeded f of the validation rows fits only the calibration, the rest
    chooses the epoch; 0 (the default) uses every row for both, as before."""
    from sgmft.features import FeatureStore
    from sgmft.train.calibrate import holdout_rows

    rows = np.arange(100, 300)
    sel, cal = holdout_rows(rows, 0.0, 0)
    assert (sel == rows).all() and (cal == rows).all()
    sel, cal = holdout_rows(rows, 0.5, 0)
    assert len(cal) == 100 and len(sel) == 100 and not set(sel) & set(cal) and set(sel) | set(cal) == set(rows)
    assert (holdout_rows(rows, 0.5, 0)[1] == cal).all() and not (holdout_rows(rows, 0.5, 1)[1] == cal).all()
    fs = FeatureStore.open(runs["store"])
    val = fs.indices("val")
    model = Predictor.load(runs["none"]).model
    cfg = type("C", (), {"calibration": "temperature_uniform", "calibration_holdout": 0.5, "seed": 0})()
    if len(holdout_rows(val, 0.5, 0)[1]) >= 50:
        rec = fit_calibration(model, fs, val, None, cfg)
        assert rec["num_posts"] == len(holdout_rows(val, 0.5, 0)[1]) and "held-out 0.5" in rec["fitted_on"]
    else:   # a small store: the held-out part is too small to fit on, and says so
        assert "too few" in fit_calibration(model, fs, val, None, cfg)["reason"]


@pytest.mark.parametrize("preset", ["lda", "concat"])
def test_calibration_holdout_rows_do_not_choose_the_epoch(tmp_path, preset):
    """With calibration_holdout, the score that chose the kept weights (run.json's best_val_acc) is
    the exported model's accuracy on the selection rows alone, not on the whole validation split."""
    from sgmft.config import load_preset
    from sgmft.features import FeatureStore
    from sgmft.train import train
    from sgmft.train.calibrate import validation_rows

    store = make_store(tmp_path / "store", n=600, dim=4, k=4, with_split=True, seed=1)   # overlapping classes
    p = load_preset(preset)
    p.train.epochs, p.train.batch_size, p.train.progress, p.train.calibration_holdout = 3, 32, False, 0.5
    res = train(store, tmp_path / "run", p)
    fs = FeatureStore.open(store)
    va = np.flatnonzero(np.load(tmp_path / "run" / "split.npy", allow_pickle=True) == "val")
    sel, cal = validation_rows(va, p.train)
    pred = Predictor.load(tmp_path / "run")

    def acc(rows):
        return float((pred.predict_store(fs, rows).probs.argmax(1) == np.asarray(fs.labels)[rows]).mean())

    assert acc(sel) != acc(va)                       # the two scores differ here, so the test can tell
    assert res.best_val_acc == pytest.approx(acc(sel), abs=1e-6)
