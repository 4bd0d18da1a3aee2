"""The textbook bar as heads (models/linear.py): shrinkage LDA and logistic regression train through
`train()` (closed form), match scikit-learn exactly, and predict/export like every run."""

import json

import numpy as np
import pytest
import torch

from sgmft.cli import main
from sgmft.config import load_preset
from sgmft.features import FeatureStore
from sgmft.predict import Predictor
from sgmft.train import load_checkpoint, train

from conftest import make_store


def _split(run):
    return np.load(run / "split.npy", allow_pickle=False).astype(str)


def test_lda_head_is_sklearns_lda_on_the_concatenated_features(tmp_path):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    store = make_store(tmp_path / "s", n=300, dim=16, k=4)
    res = train(store, tmp_path / "run", load_preset("lda"))
    fs = FeatureStore.open(store)
    split = _split(tmp_path / "run")
    tr, te = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    x = np.hstack([np.asarray(fs.text), np.asarray(fs.image)]).astype(np.float64)
    ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x[tr], np.asarray(fs.labels)[tr])
    got = Predictor.load(tmp_path / "run").predict_store(fs, te)
    # the stored probabilities may be temperature-calibrated: the decision is sklearn's exactly
    assert np.array_equal(got.probs.argmax(1), ref.predict(x[te]))
    model, _ = load_checkpoint(res.checkpoint)
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.asarray(fs.text)[te]), torch.from_numpy(np.asarray(fs.image)[te])).logits
    np.testing.assert_allclose(logits.numpy(), ref.decision_function(x[te]), rtol=1e-4, atol=1e-3)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "complete" and run["fit"]["shrinkage"] == "auto" and res.best_val_acc > 0.6


def test_logreg_picks_c_on_the_validation_split_and_masks_mean_absent(tmp_path):
    store = make_store(tmp_path / "s", n=300, dim=16, k=4, masks=True)
    res = train(store, tmp_path / "run", load_preset("logreg"))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["fit"]["C"] in run["fit"]["c_grid"] and run["fit"]["val_acc"] == pytest.approx(res.best_val_acc, abs=1e-4)
    model, _ = load_checkpoint(res.checkpoint)
    fs = FeatureStore.open(store)
    tm = np.asarray(fs.text_mask)
    tr = np.flatnonzero(_split(tmp_path / "run") == "train")
    present = torch.from_numpy(np.asarray(fs.text)[tr][tm[tr]])
    expect = model.text_in.normalise(present).mean(0)       # absent text = the training mean (a constant)
    np.testing.assert_allclose(model.text_in.missing.detach().numpy(), expect.numpy(), atol=1e-5)


def test_linear_runs_go_through_the_cli_and_export(tmp_path, capsys):
    store = make_store(tmp_path / "s", n=200, dim=16, k=4)
    assert main(["train", str(store), "--out", str(tmp_path / "r"), "--preset", "lda", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r"), str(store), "--out", str(tmp_path / "ev"), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["accuracy"] > 0.6
    assert main(["export", str(tmp_path / "r"), "--format", "torch-export", "--out", str(tmp_path / "m.pt2")]) == 0
