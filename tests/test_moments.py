"""The exact moment kernel for width-1 tokens (sgmft.models.moments): values and every gradient."""

import dataclasses
import math

import pytest
import torch

from sgmft.config import load_preset
from sgmft.models import build_model
from sgmft.models.moments import Z0, bins_needed, moments_softmax_mix, n_terms
from sgmft.models.rank1 import rank1_softmax_mix, rank1_softmax_mix_reference


def _rel(a, b, floor=0.0):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / max(float(b.abs().max()), floor))


def _case(b, h, n, c_scale, k_scale, v_shift, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = (c_scale * torch.randn(b, h, n, generator=g, dtype=dtype)).requires_grad_()
    k = (k_scale * torch.randn(b, n, generator=g, dtype=dtype)).requires_grad_()
    v = (torch.randn(b, n, generator=g, dtype=dtype) + v_shift).requires_grad_()
    return c, k, v


def _check_against_textbook(c, k, v, tol, floor=0.0, **kw):
    """Relative max-norm error < tol; ``floor`` bounds the denominator below where the exact
    result is 0 (the textbook then returns rounding noise)."""
    out = moments_softmax_mix(c, k, v, **kw)
    ref = rank1_softmax_mix_reference(c, k, v)
    assert _rel(out, ref) < tol
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(out, (c, k, v), g)
    theirs = torch.autograd.grad(ref, (c, k, v), g)
    for name, a, b in zip("ckv", ours, theirs):
        assert _rel(a, b, floor) < tol, (name, _rel(a, b, floor))


def _check_attention_against_textbook(out, c, inputs, g, tol=1e-12):
    """``out`` = moments_attention(xq, alpha, beta, k, v) against the textbook on c = alpha xq + beta:
    the value and the gradients of all five inputs, relative max-norm < tol."""
    xq, alpha, beta, k, v = inputs
    ref = rank1_softmax_mix_reference(c, k, v)
    assert _rel(out, ref) < tol
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(out, inputs, go)
    theirs = torch.autograd.grad(ref, inputs, go)
    for name, a, b in zip(["xq", "alpha", "beta", "k", "v"], ours, theirs):
        assert _rel(a, b) < tol, (name, _rel(a, b))


def test_series_length_bounds_truncation_below_float64_rounding():
    k = n_terms(Z0)
    assert Z0 ** k / math.factorial(k) * math.exp(2 * Z0) <= 2.0 ** -53
    assert Z0 ** (k - 1) / math.factorial(k - 1) * math.exp(2 * Z0) > 2.0 ** -53   # and it is the smallest


@pytest.mark.parametrize("c_scale,k_scale,v_shift", [
    (0.3, 0.03, 0.0),    # the literal preset's regime: nearly uniform softmax, one bin
    (1.0, 1.0, 5.0),     # values far from zero (centring), several bins
    (3.0, 2.0, -1.0),    # many bins
    (20.0, 3.0, 0.0),    # very peaked softmax (tens of bins)
])
def test_matches_textbook_float64(c_scale, k_scale, v_shift):
    c, k, v = _case(3, 4, 67, c_scale, k_scale, v_shift)
    _check_against_textbook(c, k, v, 1e-12, max_bins=10 ** 6)


def test_keys_shared_with_values_and_degenerate_inputs():
    c, k, _ = _case(2, 3, 40, 2.0, 1.0, 0.0)
    _check_against_textbook(c, k, k, 1e-12)                      # the attention calls pass v = k
    const = torch.full((2, 40), 0.7, dtype=torch.float64, requires_grad=True)
    # all keys equal: uniform weights, d out / d c is exactly 0 (textbook: ~1e-17 noise)
    _check_against_textbook(c, const, k, 1e-12, floor=1.0)
    zero_c = torch.zeros(2, 3, 40, dtype=torch.float64, requires_grad=True)
    _check_against_textbook(zero_c, k, k, 1e-12)


def test_empty_bins_dropped_heavy_tailed_keys():
    """Keys with a few far outliers (as trained weights give): most equal-width bins are empty
    and are dropped, rows with fewer occupied bins are padded; values and every gradient
    still match the textbook."""
    from sgmft.models.moments import _Bins

    c, k, v = _case(3, 4, 80, 4.0, 0.3, 0.0, seed=3)
    with torch.no_grad():
        k[0, :3] = torch.tensor([12.0, -9.0, 15.0], dtype=k.dtype)   # outliers: range ~24, bulk ~1
        k[1, 5] = 8.0
    kd = k.detach()
    bins = _Bins(kd, 40)
    assert 2 < bins.nb < 40                                      # compacted
    lo, hi = kd.amin(-1, keepdim=True), kd.amax(-1, keepdim=True)
    idx = ((kd - lo) / ((hi - lo) / 40)).floor().clamp(0, 39).long()
    occ = torch.zeros(3, 40, dtype=torch.bool).scatter_(1, idx, True)
    assert bins.nb == int(occ.sum(1).max())
    assert float(bins.unit.abs().max()) <= 1 + 1e-12
    _check_against_textbook(c, k, v, 1e-12, max_bins=10 ** 6)
    _check_against_textbook(c, k, k, 1e-12, max_bins=10 ** 6)


def test_layouts_compacting_to_one_size_keep_their_own_tables(monkeypatch):
    """Two outlying keys and a tight bulk: queries whose |c| differs need different equal-width
    layouts, and every layout compacts to the same few occupied bins.  The backward must
    still sum each layout's segments into that layout's own table (a table keyed by the
    compacted size mixes them: the key gradient is then off by ~1e-8)."""
    import sgmft.models.moments as mm

    c, k, v = _case(2, 2, 600, 1.0, 0.001, 0.0, seed=7)
    with torch.no_grad():
        mags = torch.linspace(0.3, 6.0, 600, dtype=c.dtype)[torch.randperm(600, generator=torch.Generator().manual_seed(7))]
        c.copy_(mags * torch.randn(2, 2, 600, generator=torch.Generator().manual_seed(8), dtype=c.dtype).sign())
        k[:, 0], k[:, 1] = -10.0, 10.0
    compacted = {}
    init = mm._Bins.__init__

    def recording_init(self, x, nb):
        init(self, x, nb)
        compacted[nb] = self.nb

    monkeypatch.setattr(mm._Bins, "__init__", recording_init)
    _check_against_textbook(c, k, v, 1e-12, max_bins=10 ** 6)
    shared = [nb for nb in compacted if list(compacted.values()).count(compacted[nb]) > 1]
    assert len(shared) >= 2, compacted                           # the case really shares a size


def test_large_batches_run_in_sample_chunks():
    """Batches above SAMPLE_CHUNK are split (each chunk planned for its own |c|); the result
    and every gradient still match the textbook, with one very peaked sample in one chunk."""
    from sgmft.models.moments import SAMPLE_CHUNK

    c, k, v = _case(SAMPLE_CHUNK + 7, 2, 24, 1.0, 1.0, 0.0, seed=5)
    with torch.no_grad():
        c[SAMPLE_CHUNK + 3] *= 30
    _check_against_textbook(c, k, v, 1e-12)


def test_fallback_to_fused_kernel_per_sample():
    c, k, v = _case(4, 2, 50, 1.0, 1.0, 0.0)
    with torch.no_grad():
        c[1] *= 50                                               # sample 1 needs far more bins
    need = bins_needed(c, k)
    limit = int(need[[0, 2, 3]].max())
    assert need[1] > limit
    _check_against_textbook(c, k, v, 1e-12, max_bins=limit)      # mixed: moments + fused
    _check_against_textbook(c, k, v, 1e-12, max_bins=0)          # all fused


def test_gradcheck():
    c, k, v = _case(2, 2, 9, 2.0, 1.0, 0.5)
    assert torch.autograd.gradcheck(lambda c, k, v: moments_softmax_mix(c, k, v), (c, k, v))


def test_float32_at_least_as_accurate_as_fused_kernel():
    c, k, v = _case(4, 8, 512, 1.5, 1.0, 2.0, dtype=torch.float32)
    exact = rank1_softmax_mix_reference(c.double(), k.double(), v.double())
    ours = (moments_softmax_mix(c, k, v).double() - exact).abs().max()
    fused = (rank1_softmax_mix(c, k, v).double() - exact).abs().max()
    assert ours.dtype == torch.float64 and fused > 0
    assert ours <= fused


def _paper_models(dim, scale):
    base = dataclasses.replace(load_preset("paper").model, dim=dim, n_tokens=dim, dropout=0.0, input_scale=scale)
    torch.manual_seed(0)
    fast = build_model(dataclasses.replace(base, attn_impl="moments")).double()
    text = build_model(dataclasses.replace(base, attn_impl="naive")).double()
    text.load_state_dict(fast.state_dict())
    assert fast.sim.impl == "moments" and text.sim.impl == "naive"
    return fast, text


def _run(model, x, y):
    xs = [t.clone().requires_grad_() for t in x]
    model.zero_grad()
    out = model(*xs)
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), xs[0].grad, xs[1].grad, grads


@pytest.mark.parametrize("scale", [1.0, "sqrt_dim"])
def test_paper_preset_matches_textbook_logits_and_every_gradient(scale):
    """Moment kernel vs textbook softmax(QK^T/sqrt(d_h))V in float64: logits, input gradients
    and every parameter gradient to 1e-12 relative.

    Two honest exceptions, both checked: key biases cancel in the softmax, so their exact
    gradient is 0 (the textbook's is ~1e-17 rounding noise); and with the literal raw inputs
    (scale 1) a few attention-parameter gradients are ill-conditioned in the textbook form
    itself (keys/values are bias-dominated, ~1 vs ~0.03): the textbook's own result moves by
    more than 1e-12 when its weights are perturbed by one ulp.  For those the tolerance is
    10x that measured jitter, and they must all be SIM attention parameters.
    """
    dim = 32
    fast, text = _paper_models(dim, scale)
    g = torch.Generator().manual_seed(1)
    x = [torch.nn.functional.normalize(torch.randn(5, dim, generator=g, dtype=torch.float64), dim=-1)
         for _ in range(2)]
    y = torch.tensor([0, 1, 2, 3, 4])
    f, t = _run(fast, x, y), _run(text, x, y)
    for a, b in zip(f[:3], t[:3]):
        assert _rel(a, b) < 1e-12
    state = {k: v.clone() for k, v in text.state_dict().items()}
    jitter = {name: 0.0 for name in t[3]}
    for seed in range(3):
        gen = torch.Generator().manual_seed(100 + seed)
        text.load_state_dict({k: v * (1 + 2.0 ** -52 * torch.randn(v.shape, generator=gen, dtype=v.dtype))
                              for k, v in state.items()})
        for name, gr in _run(text, x, y)[3].items():
            jitter[name] = max(jitter[name], _rel(gr, t[3][name]))
    loose = []
    for name, p in fast.named_parameters():
        if name not in f[3]:
            assert name not in t[3] or (name.endswith("k.bias") and float(t[3][name].abs().max()) < 1e-15), name
            continue
        tol = max(1e-12, 10 * jitter[name])
        if tol > 1e-12:
            loose.append(name)
        assert _rel(f[3][name], t[3][name]) < tol, (name, _rel(f[3][name], t[3][name]), jitter[name])
    assert len(f[3]) > 30
    if scale == 1.0:   # only SIM's attention parameters (fed the raw ~0.03 features) are ill-conditioned
        assert all(n.startswith(("sim.proj_", "sim.out_")) for n in loose), loose
    else:
        assert not loose, loose


@pytest.mark.parametrize("x_scale,affine", [(0.03, True), (1.0, False)])
def test_attention_entry_affine_and_general_paths(x_scale, affine, monkeypatch):
    """moments_attention(xq, alpha, beta, k, v) with c = alpha_h xq_j + beta_h: the one-bin
    affine re-expansion (raw ~0.03 features) and the general path, values and all five gradients."""
    import sgmft.models.moments as mm

    g = torch.Generator().manual_seed(3)
    xq = (x_scale * torch.randn(3, 40, generator=g, dtype=torch.float64)).requires_grad_()
    k = (x_scale * torch.randn(3, 40, generator=g, dtype=torch.float64)).requires_grad_()
    v = (torch.randn(3, 40, generator=g, dtype=torch.float64) + 2).requires_grad_()
    alpha = (0.5 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_()
    beta = (0.5 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_()
    used = []
    real = mm._AffineMix.apply
    monkeypatch.setattr(mm._AffineMix, "apply", lambda *a: used.append(1) or real(*a))
    out = mm.moments_attention(xq, alpha, beta, k, v)
    assert bool(used) == affine
    c = xq[:, None, :] * alpha[None, :, None] + beta[None, :, None]
    _check_attention_against_textbook(out, c, (xq, alpha, beta, k, v), g)


def test_queries_grouped_through_their_token_many_bins():
    """The general path of moments_attention groups the H*n queries through their token
    (_order_by_token) when several bins are needed: values and all five gradients still match
    the textbook, and the grouping is a permutation of the queries of every sample."""
    import sgmft.models.moments as mm

    g = torch.Generator().manual_seed(5)
    xq = (1.0 * torch.randn(3, 300, generator=g, dtype=torch.float64)).requires_grad_()
    k = (1.0 * torch.randn(3, 300, generator=g, dtype=torch.float64)).requires_grad_()
    v = (torch.randn(3, 300, generator=g, dtype=torch.float64) - 1).requires_grad_()
    alpha = torch.tensor([0.05, -0.5, 1.0, -1.5], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.3, -1.0, 0.2, 1.5], dtype=torch.float64, requires_grad=True)
    c = xq[:, None, :] * alpha[None, :, None] + beta[None, :, None]
    assert 2 < float(bins_needed(c, k).max()) <= 300 // n_terms(Z0)   # grouped (sorted) path, no fallback
    orders = []
    real = mm._order_by_token
    mm_order = lambda *a: orders.append(real(*a)) or orders[-1]    # noqa: E731
    mp = pytest.MonkeyPatch()
    mp.setattr(mm, "_order_by_token", mm_order)
    try:
        out = mm.moments_attention(xq, alpha, beta, k, v)
    finally:
        mp.undo()
    assert orders and all(torch.equal(o.sort(-1).values, torch.arange(4 * 300).expand(3, -1)) for o in orders)
    _check_attention_against_textbook(out, c, (xq, alpha, beta, k, v), g)


def test_paper_preset_sim_attention_gradients_match_high_precision_reference():
    """Where moments and textbook differ by more than 1e-12 in float64 (SIM's attention
    parameters on the raw ~0.03 features, where the textbook form loses digits), a 40-digit
    mpmath evaluation of the textbook formula decides: the moment kernel's gradients are within
    1e-12 (relative, max-norm per tensor) of it, and at least as close as the textbook's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hp_attention import sim_attention_reference

    dim = 32
    fast, text = _paper_models(dim, 1.0)
    g = torch.Generator().manual_seed(2)
    x = [torch.nn.functional.normalize(torch.randn(1, dim, generator=g, dtype=torch.float64), dim=-1)
         for _ in range(2)]
    y = torch.tensor([3])
    ref = sim_attention_reference(fast, x[0], x[1], y)
    f, t = _run(fast, x, y)[3], _run(text, x, y)[3]
    names = [n for n in ref if not n.endswith("k.bias")]
    assert len(names) == 18 and all(n in f and n in t for n in names)
    ours = {n: _rel(f[n], ref[n]) for n in names}
    theirs = {n: _rel(t[n], ref[n]) for n in names}
    assert max(ours.values()) < 1e-12, ours
    assert max(ours.values()) <= max(theirs.values()), (ours, theirs)
    for n in ref:
        if n.endswith("k.bias"):       # exactly 0: the reference's value is 40-digit rounding
            assert float(ref[n].abs().max()) < 1e-30 and n not in f
