"""Pins each equation of SG-MFT (section 3) and the config switches."""

import dataclasses

import pytest
import torch

from sgmft.config import ModelConfig, load_preset
from sgmft.models import build_model, list_models
from sgmft.models.rank1 import rank1_softmax_mix, rank1_softmax_mix_reference

D = 32


def keep(store, key, value):
    """Record the first value under key; return None so forward hooks leave outputs alone."""
    store.setdefault(key, value)


def cfg(**kw):
    # the paper-literal switches, explicit (the dataclass defaults are the recommended preset)
    base = dict(dim=D, num_classes=5, n_tokens=8, attn_dim=16, heads=4, ffn_hidden=24, dropout=0.0,
                classifier_hidden=[16, 16, 16, 16], pe_scale="none", ffn_mode="vector",
                sfm_residual=False, sfm_merge="sum")
    base.update(kw)
    return ModelConfig(**base).validate()


def inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g), torch.randn(b, D, generator=g)


@pytest.mark.parametrize("n", [8, D])
def test_shapes_and_classifier_depth(n):
    torch.manual_seed(0)
    m = build_model(cfg(n_tokens=n))
    out = m(*inputs())
    assert out.logits.shape == (3, 5) and out.fused.shape == (3, D)
    linears = [x for x in m.classifier.modules() if isinstance(x, torch.nn.Linear)]
    assert len(linears) == 5                                    # eq 18: 5 fully connected layers


def test_polymerizer_probabilities_sum_to_one():
    m = build_model(cfg())
    xt, xi = (m.tokens(x) for x in inputs())
    p_m = m.sim.modality_similarity(xt, xi)
    assert p_m.shape == (3, 8)
    torch.testing.assert_close(p_m.sum(-1), torch.ones(3))      # eq 3
    p_e = m.sim.element_similarity(xt, xi)
    assert p_e.shape == (3, 8, 8)
    torch.testing.assert_close(p_e.sum(-1), torch.ones(3, 8))   # eqs 4-5, each row
    # eq 1: S^m_j = sum_k X_t[j,k] X_i[j,k] -> softmax
    torch.testing.assert_close(p_m, torch.softmax((xt * xi).sum(-1), -1))


def test_pm_one_gives_cross_attention_path(monkeypatch):
    """With P^m forced to 1, eq 12 keeps only CA: X^C_image = LN(CA + X_i)."""
    torch.manual_seed(0)
    m = build_model(cfg()).eval()
    sim = m.sim
    monkeypatch.setattr(sim, "modality_similarity", lambda xt, xi: torch.ones(xt.shape[:2]))
    seen = {}
    sim.norm_att_i.register_forward_hook(lambda mod, inp, out: keep(seen, "xc_i", (inp[0], out)))
    xt, xi = (m.tokens(x) for x in inputs())
    sim(xt, xi)
    ca = sim._mha(xt, xi, sim.proj_t, sim.proj_i, sim.out_ca_i)
    sa = sim._mha(xi, xi, sim.proj_i, sim.proj_i, sim.out_sa_i)
    torch.testing.assert_close(seen["xc_i"][0], ca + xi)
    assert not torch.allclose(seen["xc_i"][0], sa + xi)
    # and with P^m = 0 only SA remains
    monkeypatch.setattr(sim, "modality_similarity", lambda xt, xi: torch.zeros(xt.shape[:2]))
    seen.clear()
    sim(xt, xi)
    torch.testing.assert_close(seen["xc_i"][0], sa + xi)


@pytest.mark.parametrize("impl", ["auto", "naive"])
def test_cross_attention_uses_text_queries_with_image_keys(impl):
    """Eq 9: the forward's image-side CA uses Q_t, K_i, V_i and its text-side CA Q_i, K_t, V_t
    (one W^Q,W^K,W^V set per modality).  Checked on the intermediates the forward itself
    reports (``stages``), against the textbook formula written out here."""
    torch.manual_seed(0)
    m = build_model(cfg(attn_impl=impl)).eval()
    sim = m.sim
    t, i = inputs()
    stages = {}
    with torch.no_grad():
        m(t, i, stages=stages)
        xt, xi = stages["xt"], stages["xi"]
        h, dh = 4, 4

        def textbook(x_q, x_kv, p_q, p_kv, out):
            q = p_q.q(x_q).view(3, 8, h, dh).transpose(1, 2)
            k = p_kv.k(x_kv).view(3, 8, h, dh).transpose(1, 2)
            v = p_kv.v(x_kv).view(3, 8, h, dh).transpose(1, 2)
            att = torch.softmax(q @ k.transpose(-1, -2) / dh ** 0.5, -1) @ v
            return out(att.transpose(1, 2).reshape(3, 8, 16))

        torch.testing.assert_close(stages["ca_i"], textbook(xt, xi, sim.proj_t, sim.proj_i, sim.out_ca_i))
        torch.testing.assert_close(stages["ca_t"], textbook(xi, xt, sim.proj_i, sim.proj_t, sim.out_ca_t))
        torch.testing.assert_close(stages["sa_i"], textbook(xi, xi, sim.proj_i, sim.proj_i, sim.out_sa_i))
        torch.testing.assert_close(stages["sa_t"], textbook(xt, xt, sim.proj_t, sim.proj_t, sim.out_sa_t))
        assert not torch.allclose(stages["ca_i"], textbook(xi, xt, sim.proj_i, sim.proj_t, sim.out_ca_i))


@pytest.mark.parametrize("side", ["text", "image"])
def test_similarity_ffn_side_swaps_roles(side):
    """Table 4: the similarity-aware FFN (with W3 X_inter) runs on the chosen side."""
    torch.manual_seed(0)
    m = build_model(cfg(ffn_side=side)).eval()
    calls = {}
    m.sim.ffn_sim.register_forward_hook(lambda mod, inp, out: keep(calls, "sim", inp))
    m.sim.ffn_plain.register_forward_hook(lambda mod, inp, out: keep(calls, "plain", inp))
    m.sim.norm_att_t.register_forward_hook(lambda mod, inp, out: keep(calls, "xc_t", out))
    m.sim.norm_att_i.register_forward_hook(lambda mod, inp, out: keep(calls, "xc_i", out))
    xt, xi = (m.tokens(x) for x in inputs())
    m.sim(xt, xi)
    own, other = ("xc_t", "xc_i") if side == "text" else ("xc_i", "xc_t")
    torch.testing.assert_close(calls["sim"][0], calls[own])
    torch.testing.assert_close(calls["plain"][0], calls[other])
    # X_inter = P^e X^C_other with P^e rows over the other modality's positions (eq 14)
    a, b = (xt, xi) if side == "text" else (xi, xt)
    torch.testing.assert_close(calls["sim"][1], m.sim.element_similarity(a, b) @ calls[other])


def test_ablation_switches_change_the_computation():
    torch.manual_seed(0)
    full = build_model(cfg())
    torch.manual_seed(0)
    no_sim = build_model(cfg(use_sim=False))
    assert no_sim.sim is None and full.sim is not None
    no_sfm = build_model(cfg(fusion="concat"))
    assert no_sfm.fusion.out_dim == 2 * D and full.fusion.out_dim == D
    x = inputs()
    assert no_sfm(*x).fused.shape == (3, 2 * D)
    # same fusion/classifier weights, SIM removed -> different output
    no_sim.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("sim.")})
    assert not torch.allclose(full.eval()(*x).logits, no_sim.eval()(*x).logits)
    sig = build_model(cfg(pm_norm="sigmoid"))
    xt, xi = (sig.tokens(v) for v in x)
    p = sig.sim.modality_similarity(xt, xi)
    assert ((p > 0) & (p < 1)).all() and not torch.allclose(p.sum(-1), torch.ones(3))


def test_norm_modes():
    m_vec = build_model(cfg(norm_mode="vector"))
    m_tok = build_model(cfg(norm_mode="token"))
    assert m_vec.sim.norm_att_t.norm.normalized_shape == (8, 4)
    assert m_tok.sim.norm_att_t.norm.normalized_shape == (4,)
    assert cfg(n_tokens=D).resolved_norm_mode() == "vector"   # d = 1: width-1 LayerNorm is degenerate


@pytest.mark.parametrize("mode", ["vector", "token"])
def test_ffn_modes_weight_shapes(mode):
    m = build_model(cfg(ffn_mode=mode))
    width = D if mode == "vector" else 4
    assert m.sim.ffn_sim.w1.in_features == width and m.sim.ffn_sim.w3.in_features == width
    assert m.sim.ffn_plain.w3 is None


def test_rank1_kernel_matches_reference_and_gradcheck():
    torch.manual_seed(0)
    c = torch.randn(2, 3, 17, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 17, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 17, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(rank1_softmax_mix(c, k, v, 40), rank1_softmax_mix_reference(c, k, v))
    assert torch.autograd.gradcheck(lambda c, k, v: rank1_softmax_mix(c, k, v, 40), (c, k, v))


def test_rank1_model_equals_naive_attention_model():
    """The d = 1 fast path computes the same function (and gradients) as textbook attention."""
    torch.manual_seed(0)
    fast = build_model(cfg(n_tokens=D, attn_impl="rank1")).double()
    naive = build_model(cfg(n_tokens=D, attn_impl="naive")).double()
    naive.load_state_dict(fast.state_dict())
    x = [v.double() for v in inputs()]
    of, on = fast(*x), naive(*x)
    torch.testing.assert_close(of.logits, on.logits, rtol=1e-5, atol=1e-8)
    of.logits.square().sum().backward()
    on.logits.square().sum().backward()
    for (name, pf), pn in zip(fast.named_parameters(), naive.parameters()):
        if pf.grad is None:  # unused without masks, or a key bias (cancels in the softmax)
            assert pn.grad is None or (name.endswith("k.bias") and pn.grad.abs().max() < 1e-10), name
            continue
        torch.testing.assert_close(pf.grad, pn.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_missing_modality_uses_learned_placeholder():
    torch.manual_seed(0)
    m = build_model(cfg()).eval()
    t, i = inputs()
    mask = torch.tensor([True, False, True])
    i2 = i.clone()
    i2[1] = 123.0                                   # content of an absent image must not matter
    a = m(t, i, image_mask=mask).logits
    b = m(t, i2, image_mask=mask).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[1], m(t, i).logits[1])


def test_presets_build():
    for name in ["sgmft", "paper", "concat", "text_only", "image_only"]:
        p = load_preset(name)
        mc = dataclasses.replace(p.model, dim=64, num_classes=8)
        if mc.n_tokens > 64:
            mc.n_tokens = 64
        assert build_model(mc) is not None
    assert {"sgmft", "concat", "text_only", "image_only"} <= set(list_models())
    p = load_preset("paper")
    assert p.model.n_tokens == 1024 and p.train.lr == 1e-5 and p.train.batch_size == 20
    assert p.train.epochs == 30 and p.train.betas == (0.9, 0.99) and p.model.heads == 8


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="n_tokens"):
        ModelConfig(dim=30, n_tokens=8).validate()
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(attn_dim=30, heads=8).validate()
    with pytest.raises(ValueError, match="ffn_side"):
        ModelConfig(ffn_side="both").validate()


def test_retired_config_field_still_loads():
    """Configs saved before rank1_chunk was removed (run.json, checkpoints) still load."""
    from sgmft.config import model_config_from_dict

    old = dataclasses.asdict(ModelConfig(dim=64, n_tokens=8))
    old["rank1_chunk"] = 262144
    cfg = model_config_from_dict(old)
    assert cfg == ModelConfig(dim=64, n_tokens=8) and not hasattr(cfg, "rank1_chunk")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        model_config_from_dict({**old, "rank1_chunks": 1})
