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


def _sklearn_evidence(x, y):
    """One modality's eq L1 evidence from scikit-learn's shrinkage LDA: x -> mu_c^T P x - mu_c^T P mu_c / 2."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, y)
    return lambda z: lda.decision_function(z) - np.log(lda.priors_)


def test_lda_product_sums_each_modalitys_sklearn_lda_and_an_absent_modality_adds_nothing(tmp_path):
    store = make_store(tmp_path / "s", n=400, dim=16, k=4, masks=True)
    res = train(store, tmp_path / "run", load_preset("lda_product"))
    fs = FeatureStore.open(store)
    split = _split(tmp_path / "run")
    tr, te = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    y, tm, im = np.asarray(fs.labels), np.asarray(fs.text_mask), np.asarray(fs.image_mask)
    t, v = np.asarray(fs.text, dtype=np.float64), np.asarray(fs.image, dtype=np.float64)
    ev_t = _sklearn_evidence(t[tr][tm[tr]], y[tr][tm[tr]])        # each fitted on the posts that have it
    ev_v = _sklearn_evidence(v[tr][im[tr]], y[tr][im[tr]])
    prior = np.log(np.bincount(y[tr], minlength=4) / len(tr))
    expect = prior + ev_t(t[te]) * tm[te, None] + ev_v(v[te]) * im[te, None]
    model, _ = load_checkpoint(res.checkpoint)
    with torch.inference_mode():
        logits = model(torch.from_numpy(t[te]).float(), torch.from_numpy(v[te]).float(),
                       torch.from_numpy(tm[te]), torch.from_numpy(im[te])).logits.numpy()
    np.testing.assert_allclose(logits, expect, rtol=1e-4, atol=2e-3)
    assert (~tm[te]).any() and (~im[te]).any()                  # both kinds of absent post were checked
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["fit"]["modalities"]["text"]["posts"] == int(tm[tr].sum()) and res.best_val_acc > 0.6


def test_lda_product_gives_a_place_without_posts_of_one_modality_the_mean_evidence(tmp_path):
    from sgmft.config import ModelConfig
    from sgmft.models import build_model

    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = torch.from_numpy(rng.normal(size=(120, 4)) + np.eye(3, 4)[y] * 3).float()
    text_mask = torch.from_numpy(y != 2)                           # place 2 is never shown in text
    model = build_model(ModelConfig(arch="lda_product", dim=4, num_classes=3, input_scale=1.0))
    info = model.fit_closed_form({"text": x, "image": x, "label": torch.from_numpy(y), "text_mask": text_mask,
                                  "image_mask": torch.ones(120, dtype=torch.bool)}, None)
    w = model.linear.weight[:, :4]
    assert info["modalities"]["text"] == {"posts": 80, "places": 2}
    torch.testing.assert_close(w[2], w[:2].mean(0))
    assert (model(x, x, text_mask, torch.ones(120, dtype=torch.bool)).logits.argmax(1).numpy() == y).mean() > 0.9


def test_lda_product_runs_through_the_cli_and_exports_with_absent_modalities(tmp_path, capsys):
    import io

    store = make_store(tmp_path / "s", n=200, dim=16, k=4, masks=True)
    assert main(["train", str(store), "--out", str(tmp_path / "r"), "--preset", "lda_product", "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "r"), "--format", "torch-export", "--out", str(tmp_path / "m.pt2")]) == 0
    capsys.readouterr()
    fs = FeatureStore.open(store)
    rows = np.flatnonzero(~np.asarray(fs.text_mask) | ~np.asarray(fs.image_mask))[:6]
    args = [torch.from_numpy(np.asarray(a)[rows]) for a in (fs.text, fs.image, fs.text_mask, fs.image_mask)]
    model, _ = load_checkpoint(tmp_path / "r" / "model")
    prog = torch.export.load(io.BytesIO((tmp_path / "m.pt2").read_bytes()))
    with torch.inference_mode():
        want, got = model(*args).logits, prog.module()(*args)
    assert len(rows) == 6
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_lda_product_reads_its_shrinkage_option():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from sgmft.config import ModelConfig
    from sgmft.models import build_model

    rng = np.random.default_rng(1)
    y = np.arange(90) % 3
    t, v = rng.normal(size=(90, 6)) + np.eye(3, 6)[y], rng.normal(size=(90, 6)) + np.eye(3, 6)[y]
    batch = {"text": torch.from_numpy(t).float(), "image": torch.from_numpy(v).float(), "label": torch.from_numpy(y)}
    model = build_model(ModelConfig(arch="lda_product", dim=6, num_classes=3, input_scale=1.0,
                                    extra={"shrinkage": 0.9}))
    model.fit_closed_form(batch, None)
    ref = [LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.9).fit(x, y) for x in (t, v)]
    expect = ref[0].decision_function(t) + ref[1].decision_function(v) - np.log(ref[0].priors_)
    with torch.no_grad():
        got = model(batch["text"], batch["image"]).logits.numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-3)
