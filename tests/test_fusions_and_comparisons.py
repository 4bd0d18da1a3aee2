"""The paper's comparison variants (Tables 1-4): each builds from its preset, trains, and
changes exactly the computation it claims to change."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import make_store
from sgmft.config import TrainConfig, apply_overrides, list_presets, load_preset
from sgmft.features import FeatureStore
from sgmft.models import FUSIONS, MODELS, build_model
from sgmft.train.module import LitClassifier

D, K = 32, 4
SMALL = dict(dim=D, num_classes=K, attn_dim=16, heads=4, ffn_hidden=32, dropout=0.0,
             classifier_hidden=[16, 16, 16, 16])


def small(cfg, **kw):
    n = 8 if cfg.n_tokens != cfg.dim and cfg.n_tokens != 1024 else D   # paper preset: keep n = D
    return dataclasses.replace(cfg, **{**SMALL, "n_tokens": n, **kw}).validate()


def preset_cfg(name, *overrides, **kw):
    return small(apply_overrides(load_preset(name).model, list(overrides)), **kw)


def keep(store, key, value):
    """Record the first value under key; return None so forward hooks leave outputs alone."""
    store.setdefault(key, value)


def inputs(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g), torch.randn(b, D, generator=g)


# Every variant the experiment suite runs: (preset, model overrides).
VARIANTS = [(p, ()) for p in list_presets()] + [
    ("sgmft", ("fusion=asym_coattn",)), ("sgmft", ("fusion=merge_attn",)), ("sgmft", ("fusion=coattn",)),
    ("sgmft", ("use_sim=false", "fusion=sfm")), ("sgmft", ("fusion=concat",)), ("sgmft", ("ffn_side=image",)),
]


def test_every_registered_arch_and_fusion_is_exercised():
    archs = {load_preset(p).model.arch for p in list_presets()}
    trained = {a for a in MODELS.names() if not getattr(MODELS.get(a), "assembled", False)}   # not: ensemble
    assert trained <= archs, f"archs without a preset: {trained - archs}"
    fusions = {o.split("=")[1] for _, ov in VARIANTS for o in ov if o.startswith("fusion=")} | {"sfm"}
    assert set(FUSIONS.names()) - {"sum"} <= fusions
    for name in ("mplug", "unis_mmc", "bridgetower", "balance_mla", "feature_fusion", "mm_gate", "mm_xatt"):
        assert name in MODELS
    for name in ("asym_coattn", "merge_attn", "coattn"):
        assert name in FUSIONS


def test_comparison_presets_train_like_the_recommended_sgmft():
    """Rows differ only by the model: every preset but the paper-literal one and TrustMix's three (not
    rows of the paper's tables; their optimiser was chosen by measurement, docs/design.md) has
    sgmft's optimiser."""
    ref = load_preset("sgmft").train
    assert load_preset("trust_lda").train == load_preset("trust_mda").train == load_preset("trust").train
    for name in list_presets():
        if name not in ("paper", "trust", "trust_lda", "trust_mda"):
            assert load_preset(name).train == ref, f"preset {name!r}: train section differs from sgmft's"


@pytest.fixture(scope="module")
def tiny_batch(tmp_path_factory):
    fs = FeatureStore.open(make_store(tmp_path_factory.mktemp("v") / "s", n=96, dim=D, k=K))
    return {"text": torch.tensor(np.asarray(fs.text[:64])), "image": torch.tensor(np.asarray(fs.image[:64])),
            "label": torch.tensor(np.asarray(fs.labels[:64]))}


@pytest.mark.parametrize("preset,overrides", VARIANTS, ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_variant_trains_with_decreasing_finite_loss(preset, overrides, tiny_batch):
    torch.manual_seed(0)
    cfg = preset_cfg(preset, *overrides)
    lit = LitClassifier(cfg, TrainConfig())
    opt = torch.optim.Adam(lit.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = lit._loss(lit(tiny_batch), tiny_batch["label"])
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    out = lit(tiny_batch)
    assert out.logits.shape == (64, K) and out.fused.shape[0] == 64


# --------------------------------------------------------------------------- fusion slot
@pytest.mark.parametrize("n", [8, D])          # d = 4 and the paper's d = 1 (rank-one kernel)
@pytest.mark.parametrize("fusion", ["asym_coattn", "merge_attn", "coattn"])
def test_fusion_swap_changes_only_the_fusion(fusion, n):
    torch.manual_seed(0)
    ref = build_model(small(load_preset("sgmft").model, n_tokens=n)).eval()
    var = build_model(small(load_preset("sgmft").model, n_tokens=n, fusion=fusion)).eval()
    for part in ("text_in", "image_in", "sim"):                  # same weights before the fusion slot
        getattr(var, part).load_state_dict(getattr(ref, part).state_dict())
    seen = {}
    var.fusion.register_forward_hook(lambda m, a, o: keep(seen, "var", a))
    ref.fusion.register_forward_hook(lambda m, a, o: keep(seen, "ref", a))
    x = inputs()
    with torch.no_grad():
        f_ref, f_var = ref(*x).fused, var(*x).fused
    for a, b in zip(seen["ref"], seen["var"]):
        torch.testing.assert_close(a, b)                           # SIM output identical
    assert f_var.shape == (6, var.fusion.out_dim) == (6, 2 * D)
    assert f_ref.shape == (6, ref.fusion.out_dim)
    assert not torch.allclose(f_var[:, :D], f_ref[:, :D])


def test_asymmetric_coattention_skips_image_and_reads_it_in_text_stream():
    torch.manual_seed(0)
    fus = FUSIONS.get("asym_coattn")(small(load_preset("sgmft").model)).eval()
    xt, xi = torch.randn(3, 8, 4), torch.randn(3, 8, 4)
    out = fus(xt, xi)
    torch.testing.assert_close(out[:, D:], xi.flatten(1))          # image tokens skip the layer
    out2 = fus(xt, xi + 1.0)
    assert not torch.allclose(out[:, :D], out2[:, :D])             # text attends to the image


def test_merge_attention_is_one_shared_self_attention():
    torch.manual_seed(0)
    cfg = small(load_preset("sgmft").model, ffn_mode="token", norm_mode="token")
    fus = FUSIONS.get("merge_attn")(cfg).eval()
    xt, xi = torch.randn(3, 8, 4), torch.randn(3, 8, 4)
    with torch.no_grad():
        a, b = fus(xt, xi), fus(xi, xt)
        # type embeddings are zero at init: one parameter set for both -> swapping the inputs swaps halves
        torch.testing.assert_close(a[:, :D], b[:, D:])
        torch.testing.assert_close(a[:, D:], b[:, :D])
        fus.type_emb.data[1] += 1.0                                # a learned type embedding breaks it
        assert not torch.allclose(fus(xt, xi)[:, :D], fus(xi, xt)[:, D:])


def test_coattention_streams_read_each_other():
    torch.manual_seed(0)
    fus = FUSIONS.get("coattn")(small(load_preset("sgmft").model)).eval()
    xt, xi = torch.randn(3, 8, 4), torch.randn(3, 8, 4)
    with torch.no_grad():
        out, out_i = fus(xt, xi), fus(xt, xi + 1.0)
        out_t = fus(xt + 1.0, xi)
    assert not torch.allclose(out[:, :D], out_i[:, :D])            # text stream cross-attends to image
    assert not torch.allclose(out[:, D:], out_t[:, D:])            # and the image stream to text


# --------------------------------------------------------------------------- SIM switches
def test_use_sim_off_bypasses_sim():
    torch.manual_seed(0)
    m = build_model(preset_cfg("sgmft", "use_sim=false")).eval()
    assert m.sim is None
    t, i = inputs()
    with torch.no_grad():
        direct = m.fusion(m.tokens(m.text_in(t, None)), m.tokens(m.image_in(i, None)))
        torch.testing.assert_close(m(t, i).fused, direct)
    on = build_model(preset_cfg("sgmft")).eval()
    calls = []
    on.sim.register_forward_hook(lambda *a: keep({}, "x", calls.append(1)))
    on(t, i)
    assert calls == [1]


@pytest.mark.parametrize("side", ["text", "image"])
def test_ffn_side_decides_which_stream_gets_x_inter(side):
    torch.manual_seed(0)
    m = build_model(preset_cfg("sgmft", f"ffn_side={side}")).eval()
    rec = {}
    m.sim.norm_att_t.register_forward_hook(lambda mod, a, o: keep(rec, "xc_t", o))
    m.sim.norm_att_i.register_forward_hook(lambda mod, a, o: keep(rec, "xc_i", o))
    m.sim.ffn_sim.register_forward_hook(lambda mod, a, o: keep(rec, "sim_in", a))
    m.sim.ffn_plain.register_forward_hook(lambda mod, a, o: keep(rec, "plain_in", a))
    t, i = inputs()
    with torch.no_grad():
        m(t, i)
        xt, xi = m.tokens(m.text_in(t, None)), m.tokens(m.image_in(i, None))
        own, other = ("xc_t", "xc_i") if side == "text" else ("xc_i", "xc_t")
        torch.testing.assert_close(rec["sim_in"][0], rec[own])             # the similarity-aware FFN's stream
        torch.testing.assert_close(rec["plain_in"][0], rec[other])         # the other gets the plain FFN
        a, b = (xt, xi) if side == "text" else (xi, xt)
        x_inter = m.sim.element_interaction(a, b, rec[other])              # P^e X^C_(other side), eq 14
        torch.testing.assert_close(rec["sim_in"][1], x_inter)


# --------------------------------------------------------------------------- Table 1 heads
def test_mm_gate_is_a_gated_multimodal_unit():
    torch.manual_seed(0)
    m = build_model(preset_cfg("mm_gate")).eval()
    t, i = inputs()
    with torch.no_grad():
        out = m(t, i)
        z = out.extras["gate"]
        assert z.shape == (6, 512) and bool((z > 0).all() and (z < 1).all())
        ts, is_ = m.text_in(t, None), m.image_in(i, None)
        torch.testing.assert_close(z, torch.sigmoid(m.w_z(torch.cat([ts, is_], 1))))
        h = z * torch.tanh(m.w_t(ts)) + (1 - z) * torch.tanh(m.w_i(is_))
        torch.testing.assert_close(out.fused, h)


def test_unis_mmc_aux_loss_present_positive_and_reaches_unimodal_heads():
    torch.manual_seed(0)
    m = build_model(preset_cfg("unis_mmc"))
    t, i = inputs(8)
    out = m(t, i)
    assert {"logits_text", "logits_image", "proj_text", "proj_image"} <= set(out.extras)
    y = out.extras["logits_image"].argmax(-1)       # the image head is right: it supervises the text side
    aux = m.aux_loss_fn(out, y)
    assert torch.isfinite(aux) and float(aux.detach()) > 0
    aux.backward()
    for p in (m.cls_t.weight, m.cls_i.weight, m.proj_t.weight, m.enc_t[0].weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_unis_mmc_contrastive_is_guided_by_the_other_modalitys_prediction():
    torch.manual_seed(0)
    m = build_model(preset_cfg("unis_mmc"))
    t, i = inputs(8)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = m(t, i)
    wrong = torch.nn.functional.one_hot((y + 1) % K, K).float() * 10
    out.extras["logits_text"] = wrong
    out.extras["logits_image"] = wrong
    assert float(m.contrastive_loss(out, y).detach()) == 0.0               # nobody is right: no pull
    out.extras["logits_image"] = torch.nn.functional.one_hot(y, K).float() * 10
    loss = m.contrastive_loss(out, y)
    assert float(loss.detach()) > 0                                # image right: text anchors pulled
    loss.backward()
    assert m.proj_t.weight.grad is not None and float(m.proj_t.weight.grad.abs().sum()) > 0
    assert m.proj_i.weight.grad is None or float(m.proj_i.weight.grad.abs().sum()) == 0  # keys detached


@pytest.mark.parametrize("weighting", ["learned", "confidence"])
def test_balance_mla_weighted_decision_fusion(weighting):
    torch.manual_seed(0)
    m = build_model(preset_cfg("balance_mla", f"extra={{weighting: {weighting}, hidden: 64}}")).eval()
    t, i = inputs()
    with torch.no_grad():
        out = m(t, i)
        w = out.extras["weights"]
        torch.testing.assert_close(w.sum(-1), torch.ones(6))
        pt, pi = torch.softmax(out.extras["logits_text"], -1), torch.softmax(out.extras["logits_image"], -1)
        torch.testing.assert_close(out.logits.exp(), w[:, :1] * pt + w[:, 1:] * pi)
    y = torch.zeros(6, dtype=torch.long)
    assert float(m.aux_loss_fn(out, y)) > 0


def test_training_loss_includes_model_aux_loss():
    """The trainer adds ``model.aux_loss_fn(out, labels)`` to the cross-entropy."""
    torch.manual_seed(0)
    lit = LitClassifier(preset_cfg("unis_mmc"), TrainConfig())
    t, i = inputs(8)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = lit({"text": t, "image": i})
    ce = torch.nn.functional.cross_entropy(out.logits, y)
    total = lit._loss(out, y)
    assert not torch.allclose(total, ce)
    torch.testing.assert_close(total, ce + lit.model.aux_loss_fn(out, y))


def test_heads_reject_unknown_extra_options():
    with pytest.raises(ValueError, match="does not know extra option"):
        build_model(preset_cfg("mm_gate", "extra={hiden: 3}"))


@pytest.mark.parametrize("name", ["mplug", "bridgetower", "mm_xatt"])
def test_token_view_heads_read_both_modalities(name):
    torch.manual_seed(0)
    m = build_model(preset_cfg(name)).eval()
    t, i = inputs()
    with torch.no_grad():
        base = m(t, i).fused
        assert not torch.allclose(base, m(t, i + 0.5).fused)
        assert not torch.allclose(base, m(t + 0.5, i).fused)
        out_n1 = build_model(preset_cfg(name, n_tokens=D)).eval()(t, i)   # d = 1 (rank-one kernel) works
    assert torch.isfinite(out_n1.logits).all()


def test_absent_modality_uses_learned_placeholder_in_heads():
    torch.manual_seed(0)
    m = build_model(preset_cfg("mm_gate")).eval()
    t, i = inputs()
    mask = torch.tensor([True, False, True, True, False, True])
    with torch.no_grad():
        a = m(t, i, text_mask=mask).logits
        b = m(t * 7, i, text_mask=mask).logits
    torch.testing.assert_close(a[~mask], m(torch.zeros_like(t), i, text_mask=mask).logits[~mask])
    assert not torch.allclose(a[mask], b[mask])
