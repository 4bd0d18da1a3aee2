"""SG-MFT against an independent float64 reference written from the equations.

``tests/reference_sgmft.py`` recomputes every stage (P^m, P^e, the projections, each
self/cross attention, eqs 12-18) in NumPy from the model's state_dict; here the model's own
intermediates (``model(..., stages=dict)`` and forward hooks on the SFM cross-attentions)
must agree with it to 1e-10 in float64, for the ``paper`` and ``sgmft`` presets, both
similarity-aware FFN sides (Table 4), the preset's default attention kernel and the textbook
``naive`` one.  ``tests/mutation/check_mutants.py`` shows these tests kill wrong versions of
the model (run by ``tests/test_mutation.py`` under ``pytest -m slow``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from reference_sgmft import NAMES, reference_forward
from sgmft.config import load_preset
from sgmft.models import build_model

# Small token views: the paper preset keeps n = D (d = 1); the recommended one is run at
# d = 16 (LayerNorm "auto" resolves to "token", as at D = 1024, n = 16) and at d = 4 ("vector").
SHAPES = {
    "paper": ("paper", dict(dim=16, n_tokens=16)),
    "sgmft": ("sgmft", dict(dim=64, n_tokens=4)),
    "sgmft_d4": ("sgmft", dict(dim=16, n_tokens=4)),
}
SMALL = dict(attn_dim=16, ffn_hidden=24, num_classes=5)
B = 4
TOL = 1e-10

# Stage -> the equation it pins, in forward order (the first mismatch is the one reported).
STAGES = {
    "xt": "input scaling / placeholder, token view", "xi": "input scaling / placeholder, token view",
    "p_m": "eqs 1, 3 (P^m)",
    "sa_i": "eqs 8, 10 (image SA)", "ca_i": "eqs 9, 11 (image CA: Q_t, K_i, V_i)",
    "x_image": "eq 12 (image)", "xc_i": "eq 13 (image)",
    "sa_t": "eqs 8, 10 (text SA)", "ca_t": "eqs 9, 11 (text CA: Q_i, K_t, V_t)",
    "x_text": "eq 12 (text)", "xc_t": "eq 13 (text)",
    "x_inter": "eqs 2, 4, 5, 14 (X_inter = P^e X^C)",
    "ffn_t": "eq 15 / plain FFN (text)", "ffn_i": "eq 15 / plain FFN (image)",
    "fs_t": "eq 16 (text)", "fs_i": "eq 16 (image)",
    "ca1": "eq 17 CA_1 (query F^S_text)", "ca2": "eq 17 CA_2 (query F^S_image)",
    "fused": "eq 17 (M_fuse)", "logits": "eq 18 (classifier)",
}


def make_cfg(shape: str, impl: str = "default", **overrides):
    preset, dims = SHAPES[shape]
    cfg = dataclasses.replace(load_preset(preset).model, **dims, **SMALL)
    if impl != "default":
        cfg = dataclasses.replace(cfg, attn_impl=impl)
    return dataclasses.replace(cfg, **overrides).validate()


def make_model(cfg, seed: int = 0):
    """float64 model in eval mode; constant-initialised parameters (LayerNorm gains and
    biases, absent-modality placeholders) are randomised so that no term can vanish."""
    torch.manual_seed(seed)
    model = build_model(cfg).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_inputs(cfg, seed: int = 0):
    """Features such that the model's scaled input has unit variance; one absent text and
    one absent image (mask False) so the learned placeholders are exercised too."""
    g = torch.Generator().manual_seed(seed)
    scale = cfg.resolved_input_scale()
    t = torch.randn(B, cfg.dim, generator=g, dtype=torch.float64) / scale
    i = torch.randn(B, cfg.dim, generator=g, dtype=torch.float64) / scale
    tm = torch.tensor([True, False, True, True])
    im = torch.tensor([True, True, False, True])
    return t, i, tm, im


def model_stages(model, t, i, tm, im) -> dict[str, np.ndarray]:
    stages: dict[str, torch.Tensor] = {}
    hooks = []
    if model.cfg.fusion == "sfm":
        for key, name in (("ca1", NAMES["CA1"]), ("ca2", NAMES["CA2"])):
            hooks.append(model.get_submodule(name).register_forward_hook(
                lambda mod, args, out, key=key: stages.setdefault(key, out)))
    try:
        with torch.no_grad():
            out = model(t, i, tm, im, stages=stages)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out.logits, stages["logits"]) and torch.equal(out.fused, stages["fused"])
    return {k: v.detach().numpy() for k, v in stages.items()}


def assert_stages_match(got: dict, want: dict, required=STAGES):
    missing = [k for k in required if k in want and k not in got]
    assert not missing, f"model did not report stages {missing}"
    for key, eq in STAGES.items():
        if key not in want:
            continue
        g, w = got[key], want[key]
        assert g.shape == w.shape, f"{key} ({eq}): shape {g.shape} != reference {w.shape}"
        err = float(np.abs(g - w).max())
        bound = TOL * max(1.0, float(np.abs(w).max()))
        assert err <= bound, f"{key} ({eq}): max |model - reference| = {err:.3e} > {bound:.1e}"


def run_both(cfg, seed: int = 0):
    model = make_model(cfg, seed)
    t, i, tm, im = make_inputs(cfg, seed)
    want = reference_forward(model.state_dict(), cfg, t.numpy(), i.numpy(), tm.numpy(), im.numpy())
    return model, model_stages(model, t, i, tm, im), want


# ------------------------------------------------------------------------------------------
# (shape, attention kernel): every preset with its default kernel and the textbook one, and
# at d = 1 also the other exact kernels (fused rank-one, plain sdpa), whichever is the default.
KERNELS = [(s, impl) for s in SHAPES for impl in ("default", "naive")] + [("paper", "rank1"), ("paper", "sdpa")]


@pytest.mark.parametrize("side", ["text", "image"])
@pytest.mark.parametrize("shape,impl", KERNELS, ids=[f"{s}-{i}" for s, i in KERNELS])
def test_every_stage_matches_reference(shape, impl, side):
    """P^m, each attention, eqs 12-18 on both sides, the preset's kernel and the naive one."""
    cfg = make_cfg(shape, impl, ffn_side=side)
    _, got, want = run_both(cfg)
    assert_stages_match(got, want)


@pytest.mark.parametrize("shape", ["paper", "sgmft"])
def test_projections_eqs_6_7(shape):
    """Every use of W^Q, W^K, W^V of a modality projects that modality's tokens (eqs 6-7):
    each of the 6 projections is applied twice (its modality's SA and one CA) to the same input."""
    cfg = make_cfg(shape, "naive")
    model = make_model(cfg)
    t, i, tm, im = make_inputs(cfg)
    want = reference_forward(model.state_dict(), cfg, t.numpy(), i.numpy(), tm.numpy(), im.numpy())
    calls: dict[str, list] = {}
    hooks = []
    for side in ("t", "i"):
        for sym, letter in (("W_Q", "q"), ("W_K", "k"), ("W_V", "v")):
            key = f"{letter}_{side}"
            mod = model.get_submodule(NAMES[sym].format(side=side))
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, key=key: calls.setdefault(key, []).append(o.detach().numpy())))
    with torch.no_grad():
        model(t, i, tm, im)
    for h in hooks:
        h.remove()
    for key in ("q_t", "k_t", "v_t", "q_i", "k_i", "v_i"):
        assert len(calls.get(key, [])) == 2, f"{key}: applied {len(calls.get(key, []))} times, expected 2"
        for got in calls[key]:
            np.testing.assert_allclose(got, want[key], rtol=0, atol=TOL * max(1, np.abs(want[key]).max()),
                                       err_msg=f"{key} (eqs 6-7)")


OPTIONS = [
    ("sgmft", dict(pm_norm="sigmoid")), ("sgmft", dict(pe_scale="none")), ("sgmft", dict(ffn_mode="vector")),
    ("sgmft", dict(norm_mode="vector")), ("sgmft_d4", dict(norm_mode="token")),
    ("sgmft", dict(sfm_residual=False)), ("sgmft", dict(sfm_merge="sum")),
    ("paper", dict(sfm_residual=True, sfm_merge="concat")), ("paper", dict(pe_scale="sqrt_d", ffn_mode="token")),
    ("sgmft", dict(use_sim=False)), ("sgmft", dict(fusion="concat")), ("sgmft", dict(fusion="sum")),
    ("paper", dict(use_sim=False, fusion="sum")),
]


@pytest.mark.parametrize("shape,overrides", OPTIONS, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_config_options_match_reference(shape, overrides):
    """Each named reading of the paper (SPEC.md) computes what the reference says it does."""
    cfg = make_cfg(shape, **overrides)
    _, got, want = run_both(cfg, seed=1)
    assert_stages_match(got, want)


@pytest.mark.parametrize("shape", ["paper", "sgmft"])
def test_element_similarity_inspection_is_eq_4_5(shape):
    """``SIM.element_similarity`` (for inspection; the forward never forms P^e at d = 1)."""
    for side in ("text", "image"):
        cfg = make_cfg(shape, ffn_side=side)
        model = make_model(cfg)
        t, i, tm, im = make_inputs(cfg)
        want = reference_forward(model.state_dict(), cfg, t.numpy(), i.numpy(), tm.numpy(), im.numpy())
        a, b = ("xt", "xi") if side == "text" else ("xi", "xt")
        p_e = model.sim.element_similarity(torch.from_numpy(want[a]), torch.from_numpy(want[b]))
        np.testing.assert_allclose(p_e.detach().numpy(), want["p_e"], rtol=0, atol=TOL)


def test_reference_is_not_vacuous():
    """The reference itself can tell readings apart: changing a parameter or an option moves
    its output, and it refuses a state_dict with a parameter it does not model."""
    cfg = make_cfg("sgmft")
    model = make_model(cfg)
    t, i, tm, im = (x.numpy() for x in make_inputs(cfg))
    sd = model.state_dict()
    base = reference_forward(sd, cfg, t, i, tm, im)["logits"]
    sd2 = dict(sd)
    sd2[NAMES["W3_sim"] + ".weight"] = sd[NAMES["W3_sim"] + ".weight"] * 0
    assert np.abs(reference_forward(sd2, cfg, t, i, tm, im)["logits"] - base).max() > 1e-3
    other = dataclasses.replace(cfg, sfm_residual=False)
    assert np.abs(reference_forward(sd, other, t, i, tm, im)["logits"] - base).max() > 1e-3
    with pytest.raises(AssertionError, match="not covered"):
        reference_forward({**sd, "sim.extra.weight": torch.zeros(2)}, cfg, t, i, tm, im)
    with pytest.raises(AssertionError, match="shape"):
        reference_forward({**sd, NAMES["W1_sim"] + ".weight": torch.zeros(3, 3)}, cfg, t, i, tm, im)
