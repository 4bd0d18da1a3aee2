"""Input normalisation (models/input_norm.py, ModalityInput): fitted on the training split only,
carried by the checkpoint, applied identically by predict and export."""

import json

import numpy as np
import pytest
import torch

from sgmft.config import ModelConfig, load_preset
from sgmft.features import FeatureStore
from sgmft.models import build_model
from sgmft.models.blocks import ModalityInput
from sgmft.models.input_norm import fit_input_norm
from sgmft.predict import Predictor
from sgmft.train import load_checkpoint, train

from conftest import make_store


def _inputs(model):
    return {m.modality: m for m in model.modules() if isinstance(m, ModalityInput)}


@pytest.mark.parametrize("mode", ["standardize", "whiten"])
def test_statistics_come_from_the_training_rows_with_present_modality(tmp_path, mode):
    store = FeatureStore.open(make_store(tmp_path / "s", n=200, dim=16, k=4, masks=True))
    model = build_model(ModelConfig(arch="concat", dim=16, num_classes=4, input_norm=mode, classifier_hidden=[8]))
    rows = np.arange(0, 120)
    info = fit_input_norm(model, store, rows)
    t = np.asarray(store.text)[rows][np.asarray(store.text_mask)[rows]].astype(np.float64)
    inp = _inputs(model)["text"]
    np.testing.assert_allclose(inp.norm_mean.numpy(), t.mean(0), atol=1e-6)
    assert info["text"]["posts"] == len(t) and info["text"]["fitted"]
    z = inp.normalise(torch.from_numpy(t).float()).numpy()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)                  # centred on the training rows
    if mode == "standardize":
        np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
    else:                                                                 # shrinkage: variances <= 1, near 1
        cov = np.cov(z.T, bias=True)
        assert np.all(np.diag(cov) < 1.0 + 1e-3) and np.mean(np.diag(cov)) > 0.5
    other = np.asarray(store.text)[150:][np.asarray(store.text_mask)[150:]].mean(0)
    assert not np.allclose(inp.norm_mean.numpy(), other, atol=1e-3)    # not the held-out rows' statistics


def test_off_means_no_buffers_and_unchanged_state_dict():
    cfg = ModelConfig(arch="concat", dim=16, num_classes=4, classifier_hidden=[8])
    keys = set(build_model(cfg).state_dict())
    assert not any("norm_" in k for k in keys)
    cfg.input_norm = "standardize"
    assert {k for k in build_model(cfg).state_dict() if "norm_" in k} == {
        "inputs.text.norm_mean", "inputs.text.norm_scale", "inputs.image.norm_mean", "inputs.image.norm_scale"}
    assert cfg.resolved_input_scale() == 1.0                 # "sqrt_dim" = unit variance: already there


def test_trained_run_carries_the_statistics_into_predict_and_run_json(tmp_path):
    store = make_store(tmp_path / "s", n=240, dim=16, k=4)
    p = load_preset("trust")
    p.model.input_norm = "standardize"
    p.train.epochs, p.train.batch_size, p.train.progress, p.train.min_steps = 2, 32, False, 0
    res = train(store, tmp_path / "run", p)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"]["input_norm"] == "standardize" and run["input_norm"]["text"]["fitted"]
    split = np.load(tmp_path / "run" / "split.npy", allow_pickle=False) if (tmp_path / "run" / "split.npy").exists() \
        else None
    model, _ = load_checkpoint(res.checkpoint)
    fs = FeatureStore.open(store)
    tr = np.flatnonzero(np.asarray(split).astype(str) == "train") if split is not None else None
    if tr is not None:
        np.testing.assert_allclose(_inputs(model)["text"].norm_mean.numpy(),
                                   np.asarray(fs.text)[tr].astype(np.float64).mean(0), atol=1e-6)
    x = torch.from_numpy(np.array(fs.text[:9])), torch.from_numpy(np.array(fs.image[:9]))
    with torch.inference_mode():
        direct = torch.softmax(model(*x).logits, -1).numpy()
    got = Predictor.load(tmp_path / "run").predict_features(*x).probs
    assert np.array_equal(got.argmax(1), direct.argmax(1))
    # a model without the statistics (identity) predicts differently: the buffers are in use
    model2, _ = load_checkpoint(res.checkpoint)
    inp = _inputs(model2)["text"]
    with torch.no_grad():
        inp.norm_mean.zero_()
        inp.norm_scale.fill_(1.0)
        changed = torch.softmax(model2(*x).logits, -1).numpy()
    assert not np.allclose(changed, direct, atol=1e-4)


def test_export_applies_the_normalisation(tmp_path):
    from sgmft.predict.export import export_model

    store = make_store(tmp_path / "s", n=160, dim=16, k=4)
    p = load_preset("logreg")
    p.train.progress = False
    res = train(store, tmp_path / "run", p)
    s = export_model(res.checkpoint, "torch-export", tmp_path / "m.pt2")
    assert s["max_abs_diff"] <= 1e-5
