"""QMF and PDF heads (sgmft.models.peers; docs/design.md "Peers: QMF and PDF")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sgmft.config import load_preset
from sgmft.models import build_model
from sgmft.models.peers import PDF, LossHistory, qmf_rank_loss

from conftest import make_store

ARCHS = ["qmf", "pdf"]


def _model(arch, dim=16, k=4, **extra):
    p = load_preset(arch)
    cfg = dataclasses.replace(p.model, dim=dim, num_classes=k, extra={**p.model.extra, "hidden": 32, **extra})
    torch.manual_seed(0)
    return build_model(cfg)


def _loss(model, out, y, index):
    kw = {"index": index} if model.aux_loss_wants_index else {}
    return F.cross_entropy(out.logits, y) + model.aux_loss_fn(out, y, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_shapes_with_masks(arch):
    m = _model(arch)
    g = torch.Generator().manual_seed(1)
    t, v = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    tm = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    vm = torch.tensor([1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    y = torch.randint(0, 4, (7,), generator=g)
    out = m(t, v, tm, vm)
    assert out.logits.shape == (7, 4) and out.fused.shape == (7, 64)
    e = out.extras
    assert e["logits_text"].shape == e["logits_image"].shape == (7, 4) and e["weights"].shape == (7, 2)
    # an absent modality has weight 0, and the post's logits are the other modality's, weighted
    assert e["weights"][2, 0] == 0 and e["weights"][1, 1] == 0
    torch.testing.assert_close(out.logits[2], e["weights"][2, 1] * e["logits_image"][2])
    # an absent modality's stored row does not matter
    t2 = t.clone()
    t2[2] = 100.0
    torch.testing.assert_close(m.eval()(t2, v, tm, vm).logits, m(t, v, tm, vm).logits)
    m.train()
    loss = _loss(m, m(t, v, tm, vm), y, torch.arange(7))
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("cls_t.weight", "cls_v.weight", "enc_t.0.weight", "text_in.missing", "image_in.missing"):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    if arch == "pdf":
        assert m.confid_t[0].weight.grad.abs().sum() > 0


def test_loss_history_is_qmf_history():
    h = LossHistory()
    h.update(torch.tensor([3, 0]), torch.tensor([1.0, 3.0]))
    h.update(torch.tensor([3]), torch.tensor([2.0]))             # cumulative: row 3 -> 3.0
    h.update(torch.tensor([5]), torch.tensor([0.0]))
    assert len(h) == 3 and h.total[3] == 3.0 and h.total[0] == 3.0
    target, margin = h.target_margin(torch.tensor([0, 3, 5]), torch.tensor([5, 0, 3]))
    # normalised over the posts seen (min 0, max 3): 1, 1, 0
    assert target.tolist() == [1.0, 0.0, -1.0] and margin.tolist() == [1.0, 0.0, 1.0]


def test_qmf_rank_loss_penalises_confidence_on_posts_with_larger_history_loss():
    h = LossHistory()
    idx = torch.tensor([0, 1])
    h.update(idx, torch.tensor([1.0, 3.0]))                       # post 1 has the larger loss
    # post 1 is (wrongly) the more confident one by 1.9; margin |c0 - c1| = 1: both pairs give 0.9
    loss = qmf_rank_loss(torch.tensor([0.1, 2.0]), idx, h)
    assert loss.item() == pytest.approx(0.9)
    assert qmf_rank_loss(torch.tensor([2.0, 0.1]), idx, h).item() == 0.0
    # nothing to rank yet (the official code's 0/0): no loss, and finite
    fresh = LossHistory()
    fresh.update(idx, torch.zeros(2))
    assert qmf_rank_loss(torch.tensor([0.1, 2.0]), idx, fresh).item() == 0.0


def test_qmf_history_grows_in_training_only():
    m = _model("qmf")
    t, v, y = torch.randn(6, 16), torch.randn(6, 16), torch.arange(6) % 4
    m.eval()
    m.aux_loss_fn(m(t, v), y, index=torch.arange(6))                 # a validation step: no history
    assert len(m.history["text"]) == 0
    m.train()
    m.aux_loss_fn(m(t, v), y)                                       # no index (another trainer): no ranking
    assert len(m.history["text"]) == 0
    m.aux_loss_fn(m(t, v), y, index=torch.arange(10, 16))
    assert len(m.history["text"]) == len(m.history["image"]) == 6


def test_qmf_weights_are_energy_confidence():
    m = _model("qmf").eval()
    t, v = torch.randn(5, 16), torch.randn(5, 16)
    e = m(t, v).extras
    torch.testing.assert_close(e["weights"][:, 0], torch.logsumexp(e["logits_text"], -1) / 10)
    torch.testing.assert_close(m(t, v).logits, e["weights"][:, :1] * e["logits_text"]
                               + e["weights"][:, 1:] * e["logits_image"])


def test_pdf_co_belief_and_relative_calibration():
    m = _model("pdf").eval()
    t, v = torch.randn(9, 16), torch.randn(9, 16)
    out = m(t, v)
    e = out.extras
    a, b = e["tcp_text"], e["tcp_image"]
    holo_t = torch.log(b) / (torch.log(a * b) + 1e-8)              # latefusion_pdf.py, as written there
    holo_v = torch.log(a) / (torch.log(a * b) + 1e-8)
    du = [torch.mean(torch.abs(torch.softmax(e[k], 1) - 1 / 4), 1) for k in ("logits_text", "logits_image")]
    rc_t = torch.where(du[0] > du[1], torch.ones_like(du[0]), du[0] / du[1])
    rc_v = torch.where(du[0] > du[1], du[1] / du[0], torch.ones_like(du[1]))
    w = torch.softmax(torch.stack([(a + holo_t) * rc_t, (b + holo_v) * rc_v], 1), 1)
    torch.testing.assert_close(e["weights"], w, atol=1e-5, rtol=0)
    assert ((rc_t == 1) | (rc_v == 1)).all() and (rc_t <= 1).all() and (rc_v <= 1).all()
    # training mode: no relative calibration (the official 'pdf_train' branch)
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    w_train = torch.softmax(torch.stack([a + holo_t, b + holo_v], 1), 1)
    torch.testing.assert_close(m(t, v).extras["weights"], w_train, atol=1e-5, rtol=0)


def _toy(n, protos, seed, noisy_text):
    """Each post shows its class in one modality; the other one (text where ``noisy_text``,
    a bool (n,), else the image) is pure noise."""
    g = torch.Generator().manual_seed(seed)
    k, dim = protos.shape
    y = torch.arange(n) % k
    clean = protos[y] + 0.7 * torch.randn(n, dim, generator=g)
    noise = torch.randn(n, dim, generator=g)
    text = torch.where(noisy_text[:, None], noise, clean)
    image = torch.where(noisy_text[:, None], clean, noise)
    return F.normalize(text, dim=1), F.normalize(image, dim=1), y


def _fit_toy(arch, noisy_text, steps=150, dim=16, k=4):
    m = _model(arch, dim=dim, k=k)
    protos = torch.randn(k, dim, generator=torch.Generator().manual_seed(0))
    text, image, y = _toy(len(noisy_text), protos, 1, noisy_text)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for step in range(steps):
        rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(step))[:128]
        opt.zero_grad()
        _loss(m, m(text[rows], image[rows]), y[rows], rows).backward()
        opt.step()
    return m.eval(), protos


@pytest.mark.parametrize("arch", ARCHS)
def test_a_noise_modality_gets_the_lower_weight(arch):
    """The papers' claim on a toy problem: after training, a modality that is pure noise
    weighs less than the informative one."""
    m, protos = _fit_toy(arch, torch.zeros(512, dtype=torch.bool))          # the image is noise
    tt, ti, ty = _toy(400, protos, 2, torch.zeros(400, dtype=torch.bool))
    with torch.no_grad():
        out = m(tt, ti)
    assert (out.logits.argmax(-1) == ty).float().mean() > 0.8
    w = out.extras["weights"]
    assert w[:, 0].mean() > 2 * w[:, 1].mean()


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_follow_each_posts_noisy_modality(arch):
    """Per-post dynamics: when the noisy modality varies from post to post, each modality
    weighs more on the posts where it is informative."""
    gen = torch.Generator().manual_seed(9)
    m, protos = _fit_toy(arch, torch.rand(1024, generator=gen) < 0.5, steps=250)
    noisy_text = torch.rand(400, generator=gen) < 0.5
    tt, ti, ty = _toy(400, protos, 2, noisy_text)
    with torch.no_grad():
        out = m(tt, ti)
    assert (out.logits.argmax(-1) == ty).float().mean() > 0.8
    w = out.extras["weights"]
    assert w[~noisy_text, 0].mean() > 1.5 * w[noisy_text, 0].mean()
    assert w[noisy_text, 1].mean() > 1.5 * w[~noisy_text, 1].mean()


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip(arch, tmp_path):
    from sgmft.checkpoint import load_checkpoint, save_checkpoint

    m = _model(arch)
    if arch == "qmf":      # training state (the loss history) is not part of the model file
        m.history["text"].update(torch.arange(4), torch.ones(4))
    ck = save_checkpoint(tmp_path / arch, m, m.cfg, ["a", "b", "c", "d"],
                         {"backbone": "test", "dim": 16, "normalization": "l2"})
    loaded, info = load_checkpoint(ck)
    assert info["model_cfg"].arch == arch and not any("history" in k for k in loaded.state_dict())
    t, v = torch.randn(6, 16), torch.randn(6, 16)
    tm = torch.tensor([1, 0, 1, 1, 1, 1], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(t, v, tm, None).logits, m.eval()(t, v, tm, None).logits,
                                   atol=0, rtol=0)


def test_options_are_checked():
    with pytest.raises(ValueError, match="does not know extra option"):
        _model("pdf", temperature=3.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        _model("qmf", temperature=0)
    with pytest.raises(ValueError, match="hidden must be >= 0"):
        _model("qmf", hidden=-1)
    assert isinstance(_model("pdf", hidden=0), PDF)


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """A tiny QMF run and a tiny PDF run, trained by the real trainer."""
    from sgmft.train import train

    root = tmp_path_factory.mktemp("peers")
    store = make_store(root / "store", n=200, dim=16, k=4, with_split=True, masks=True)
    seen = []
    orig = LossHistory.update

    def spy(self, index, loss):
        seen.append(index.clone())
        return orig(self, index, loss)

    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LossHistory, "update", spy)
        for arch in ARCHS:
            p = load_preset(arch)
            p.model.extra["hidden"] = 16
            p.train.epochs, p.train.batch_size, p.train.progress = 2, 32, False
            train(store, root / arch, p)
            runs[arch] = root / arch
    return {"root": root, "store": store, "runs": runs, "history_rows": torch.cat(seen) if seen else None}


@pytest.mark.slow
def test_trainer_feeds_qmf_the_store_rows_of_the_training_split(trained_runs):
    from sgmft.features import FeatureStore

    fs = FeatureStore.open(trained_runs["store"])
    train_rows = set(np.flatnonzero(np.asarray(fs.split) == "train").tolist())
    rows = trained_runs["history_rows"]
    assert rows is not None, "the trainer never passed the batch index to QMF's aux_loss_fn"
    assert set(rows.tolist()) == train_rows


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_export_onnx_via_cli(trained_runs, arch, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install 'sgmft[export]')")
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (pip install 'sgmft[export]')")
    import json

    import onnxruntime as ort

    from sgmft.checkpoint import calibrated_probs
    from sgmft.cli import main
    from sgmft.predict import Predictor

    out = tmp_path / f"{arch}.onnx"
    assert main(["export", str(trained_runs["runs"][arch]), "--format", "onnx", "--out", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["arch"] == arch and s["max_abs_diff"] <= 1e-5
    # the exported graph gives the (calibrated) probabilities of the trained model, with RC:
    # PDF's inference branch
    pred = Predictor.from_pretrained(str(trained_runs["runs"][arch]))
    g = torch.Generator().manual_seed(5)
    t, v = torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g)
    tm, vm = torch.ones(9, dtype=torch.bool), torch.ones(9, dtype=torch.bool)
    tm[0], vm[1] = False, False
    with torch.no_grad():
        want = calibrated_probs(pred.model(t, v, tm, vm).logits, pred.temperature, pred.uniform_weight).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"text": t.numpy(), "image": v.numpy(), "text_mask": tm.numpy(),
                                "image_mask": vm.numpy()})[0]
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(got), -1).numpy(), want, atol=1e-5, rtol=0)
