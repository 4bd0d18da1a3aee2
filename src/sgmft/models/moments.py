"""Exact moment kernel for attention over width-1 tokens (``attn_impl: moments``).

For d = 1 every head's logit is ``c_j x_l`` up to terms constant in l (see
:mod:`sgmft.models.rank1`), so the output at query j is

    out_j = sum_l exp(c_j x_l) v_l / sum_l exp(c_j x_l),                         (A)

a ratio of two exponential moments of the keys' empirical distribution, evaluated at c_j.
Keys are shared by all heads of a sample, so all heads' queries are answered from the
same moments.

Method (binned Taylor expansion; exact to float64 rounding, never an approximation):

* The keys of a sample are split into ``nb`` equal-width bins with centres m_b and
  half-width rho, so that for every query |c_j (x_l - m_b)| <= rho * max_j |c_j| <= Z0.
  Then exp(c_j x_l) = exp(c_j m_b) * sum_{k<K} (c_j rho)^k / k! * u_l^k + R with
  u_l = (x_l - m_b) / rho in [-1, 1] and |R| <= Z0^K / K! * e^{Z0} exp(c_j m_b).
  K is the smallest integer with Z0^K / K! * e^{2 Z0} <= 2^-53 (float64 unit roundoff), so
  the truncation error, relative to the positive sum it belongs to (each bin's denominator
  is >= n_b e^{-Z0} exp(c_j m_b)), is below float64 rounding.  The same bound makes the
  series well conditioned (sum of |terms| <= e^{2 Z0} x the result).
* Per bin and value channel the moments M_{b,k} = sum_{l in b} u_l^k v_l cost O(n K);
  each query then costs O(nb K) instead of O(n) exps.  Bin terms are combined with a
  per-query shift s_j = max_b c_j m_b (attained at the first or last bin, both non-empty),
  so no exponential overflows.
* Values are centred (v' = v - mean v; softmax mixing is shift-equivariant), which keeps
  the numerator's cancellation no worse than the textbook formula's.
* The backward (hand-written, below) needs, with p_jl the attention weights,
      d out_j / d c_j = sum_l p_jl y_l (v_l - out_j)      (y_l = x_l - centre)
      d out_j / d v_l = p_jl
      d out_j / d x_l = c_j p_jl (v_l - out_j)
  The first is again (A) with values y and y v'.  The other two are "transposed" sums
  S_l = sum_j w_j p_jl = sum_j w_j exp(c_j y_l - L'_j) with L'_j = log sum_l exp(c_j y_l):
  the same expansion with the roles swapped (bins over the queries' c_j, evaluated at the
  keys), each bin scaled by its smallest L'_j so every factor stays <= e^{Z0}.  Truncation
  error relative to sum_j |w_j| p_jl is again <= Z0^K / K! e^{2 Z0}.

Everything is computed in float64 whatever the input dtype (inputs are converted exactly,
the result is rounded once), so the float32 path is at least as accurate as the fused
kernel.  A sample whose bound needs more than ``max_bins`` bins (huge |c| * key range,
where O(n) exps per query are cheaper) falls back to the fused kernel of
:func:`sgmft.models.rank1.rank1_softmax_mix`, per sample (all its heads).
"""

from __future__ import annotations

import math

import torch

from sgmft.models.rank1 import rank1_softmax_mix

Z0 = 3.0  # bound on |c_j (x_l - m_b)| inside a bin (and on |delta_j y_l| in the backward)
EPS = 2.0 ** -53  # float64 unit roundoff: the truncation target
SEGMENTS, SEGMENT = 8, 256  # queries sorted by |c| are answered in SEGMENTS parts (>= SEGMENT each)


def n_terms(z0: float, eps: float = EPS) -> int:
    """Smallest K with z0^K / K! * e^{2 z0} <= eps (truncation below float64 rounding)."""
    k, term = 0, math.exp(2 * z0)
    while term > eps:
        k += 1
        term *= z0 / k
    return max(k, 1)


K = n_terms(Z0)  # 31 terms for Z0 = 3 (fewer where the actual bound is smaller)


def _powers(t: torch.Tensor, k: int, factorial: bool) -> torch.Tensor:
    """(B, m, k) tensor of t^i (/ i! if factorial), i = 0..k-1, for t (B, m), by doubling:
    columns [h, 2h) are columns [0, h) times t^h (log2(k) tensor ops)."""
    out = t.new_empty(*t.shape, k)
    out[..., 0] = 1
    h, th = 1, t.unsqueeze(-1)                                                    # th = t^h
    while h < k:
        w = min(h, k - h)
        torch.mul(out[..., :w], th, out=out[..., h:h + w])
        h, th = 2 * h, th * th
    if factorial:
        out *= torch.exp(-torch.lgamma(torch.arange(1, k + 1, dtype=t.dtype, device=t.device)))
    return out


class _Bins:
    """Equal-width bins over the last axis of ``x`` (B, n), nb bins per row."""

    def __init__(self, x: torch.Tensor, nb: int):
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        width = (hi - lo) / nb
        safe = torch.where(width > 0, width, torch.ones_like(width))
        self.nb = nb
        self.idx = ((x - lo) / safe).floor().clamp_(0, nb - 1).long()            # (B, n)
        self.centres = lo + (torch.arange(nb, dtype=x.dtype, device=x.device) + 0.5) * width  # (B, nb)
        self.half = width / 2                                                     # (B, 1)
        self.unit = (x - self.centres.gather(1, self.idx)) / (safe / 2)           # in [-1, 1]

    def moments(self, vals: torch.Tensor, k: int) -> torch.Tensor:
        """M[b, i, c*nb + bin] = sum_{l in bin} unit_l^i vals[b, l, c]  -> (B, k, ch*nb)."""
        b, n, ch = vals.shape
        if self.nb == 1:
            spread = vals
        else:   # vals placed in their bin's columns: (B, n, ch, nb), zero elsewhere
            spread = vals.new_zeros(b, n, ch, self.nb)
            spread.scatter_(3, self.idx[:, :, None, None].expand(b, n, ch, 1), vals.unsqueeze(3))
        return torch.bmm(_powers(self.unit, k, False).transpose(1, 2), spread.reshape(b, n, -1))


def _series(at: torch.Tensor, scale: torch.Tensor, mom: torch.Tensor, nb: int):
    """sum_i (at*scale)^i / i! * mom[:, i, c*nb + bin] for every point -> (B, m, ch, nb), and
    the scaled powers (B, m, k) themselves (kept for the backward)."""
    b, k, w = mom.shape
    tp = _powers(at * scale, k, True)
    return torch.bmm(tp, mom).view(b, -1, w // nb, nb), tp


def _forward(cd, xd, vd, need_dc: bool, keep: bool):
    """Forward for c (B, Q), keys x and values v (B, n), all float64.

    Queries are sorted by the integer number of bins they need and answered in segments,
    each with the fewest bins its own largest |c| allows (most |c| are far below the max).
    Returns out, out' (centred), d out/d c (or None), den, v', and (if ``keep``) what the
    backward needs: the order and per segment (bins, scaled powers T, bin weights E).
    """
    vbar = vd.mean(-1, keepdim=True)
    vc = vd - vbar
    chans = [torch.ones_like(vc), vc]
    if need_dc:  # E_j[y] and E_j[y v'] for d out / d c (y centred on the keys' mid-range)
        y = xd - (xd.amin(-1, keepdim=True) + xd.amax(-1, keepdim=True)) / 2
        chans += [y, y * vc]
    vals = torch.stack(chans, -1)
    half_span = (xd.amax(-1) - xd.amin(-1)) / 2                                   # (B,)
    q = cd.shape[1]
    sort = float((cd.abs().amax(-1) * half_span).max()) > 2 * Z0                 # > 2 bins somewhere
    # sort by the integer bin count each query needs (an integer sort is ~4x cheaper than a float one)
    order = (cd.abs() * (half_span / Z0).unsqueeze(-1)).ceil().long().argsort(-1) if sort else None
    cs = cd.gather(1, order) if sort else cd
    seg = max(SEGMENT, -(-q // SEGMENTS)) if sort else q
    sums, shifts, tables, segments = [], [], {}, []
    for i in range(0, q, seg):
        cq = cs[:, i:i + seg]
        z = float((cq.abs().amax(-1) * half_span).max())                           # max |c| * half-range
        nb = max(1, int(math.ceil(z / Z0)))
        if nb not in tables:
            kb = _Bins(xd, nb)
            tables[nb] = (kb, kb.moments(vals, K))   # every segment using nb bins needs <= K terms
        kb, mom = tables[nb]
        k = n_terms(float((cq.abs().amax(-1) * kb.half[:, 0]).max()))
        series, tp = _series(cq, kb.half, mom[:, :k], nb)                        # (B, Qs, ch, nb)
        first, last = kb.centres[:, :1], kb.centres[:, -1:]
        shift = torch.maximum(cq * first, cq * last)   # max_b c m_b: first or last bin (both non-empty)
        if nb == 1:
            weight = None
            sums.append(series[..., 0])
        else:
            weight = torch.exp(cq.unsqueeze(-1) * kb.centres.unsqueeze(1) - shift.unsqueeze(-1))  # <= 1
            sums.append((series * weight.unsqueeze(2)).sum(-1))
        shifts.append(shift)
        if keep:
            segments.append((slice(i, i + seg), kb, tp, weight))
    sums, shift = torch.cat(sums, 1), torch.cat(shifts, 1)
    if sort:   # back to the queries' order
        sums = torch.empty_like(sums).scatter_(1, order.unsqueeze(-1).expand_as(sums), sums)
        shift = torch.empty_like(shift).scatter_(1, order, shift)
    den = sums[..., 0]                                      # e^{-s_j} sum_l e^{c_j x_l}
    out_c = sums[..., 1] / den
    dc = (sums[..., 3] - out_c * sums[..., 2]) / den if need_dc else None
    return out_c + vbar, out_c, dc, den, vc, (order, segments)


def _key_sums(w, den, state, n: int):
    """S_l = sum_j w_j p_jl for every key l and weight channel (w: (B, Q, ch)) -> (B, n, ch).

    With the forward's expansion, p_jl = E_jb / den_j * sum_i T_ji u_l^i for l in bin b, so
    S_l = sum_i u_l^i A_{b,i} with A_{b,i} = sum_j (w_j / den_j) E_jb T_ji: one matrix product
    over the queries per segment, then a short series at each key.  E_jb / den_j =
    exp(c_j m_b - log sum_l e^{c_j x_l}) <= 1, and the truncation error relative to
    sum_j |w_j| p_jl is again <= Z0^K / K! e^{2 Z0}.
    """
    order, segments = state
    wd = w / den.unsqueeze(-1)
    if order is not None:
        wd = wd.gather(1, order.unsqueeze(-1).expand_as(wd))
    b, _, ch = wd.shape
    tables: dict[int, tuple] = {}                          # per bin layout: (bins, A (B, K, nb*ch))
    for sl, kb, tp, weight in segments:
        ws = wd[:, sl]                                                            # (B, Qs, ch)
        x = ws.unsqueeze(2) if weight is None else weight.unsqueeze(-1) * ws.unsqueeze(2)  # (B, Qs, nb, ch)
        k = tp.shape[-1]
        part = torch.bmm(tp.transpose(1, 2), x.reshape(b, x.shape[1], -1))         # (B, k, nb*ch)
        if kb.nb not in tables:
            tables[kb.nb] = (kb, part.new_zeros(b, K, part.shape[-1]), [0])
        tables[kb.nb][1][:, :k] += part
        tables[kb.nb][2][0] = max(tables[kb.nb][2][0], k)
    out = wd.new_zeros(b, n, ch)
    for kb, table, (used,) in tables.values():
        at_keys = torch.bmm(_powers(kb.unit, used, False), table[:, :used]).view(b, n, kb.nb, ch)
        out += at_keys.gather(2, kb.idx[:, :, None, None].expand(b, n, 1, ch)).squeeze(2)
    return out


class _MomentsMix(torch.autograd.Function):
    """out[b, j] = sum_l softmax_l(c[b, j] k[b, l]) v[b, l] for c (B, Q), k, v (B, n)."""

    @staticmethod
    def forward(ctx, c, k, v):
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        out, out_c, dc, den, vc, state = _forward(c.double(), k.double(), v.double(),
                                                  need_dc=ctx.needs_input_grad[0], keep=need_kv)
        if any(ctx.needs_input_grad):
            ctx.state = state
            ctx.save_for_backward(c, out_c, dc, den, vc)
        return out.to(c.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        c, out_c, dc, den, vc = ctx.saved_tensors
        g = grad_out.double()
        dt = grad_out.dtype
        gc = (g * dc).to(dt) if ctx.needs_input_grad[0] else None                # d out_j / d c_j
        gk = gv = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gcw = g * c.double()
            # d out_j / d v_l = p_jl;  d out_j / d x_l = c_j p_jl (v'_l - out'_j)
            s = _key_sums(torch.stack([g, gcw, gcw * out_c], -1), den, ctx.state, vc.shape[-1])
            gv = s[..., 0].to(dt) if ctx.needs_input_grad[2] else None
            gk = (vc * s[..., 1] - s[..., 2]).to(dt) if ctx.needs_input_grad[1] else None
        ctx.state = None
        return gc, gk, gv


def bins_needed(c: torch.Tensor, k: torch.Tensor, z0: float = Z0) -> torch.Tensor:
    """Per sample, the number of key bins that keeps |c_j (x_l - m_b)| <= z0. (B,) float."""
    with torch.no_grad():
        cmax = c.detach().double().abs().flatten(1).amax(-1)
        span = (k.detach().double().amax(-1) - k.detach().double().amin(-1))
        need = (cmax * span / (2 * z0)).ceil().clamp_min(1)
        return torch.where(torch.isfinite(need), need, torch.full_like(need, math.inf))


def default_max_bins(n_keys: int) -> int:
    """Above this many bins the fused kernel's n exps per query are cheaper than nb*K terms."""
    return max(1, n_keys // K)


def moments_softmax_mix(c: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        max_bins: int | None = None) -> torch.Tensor:
    """out[b,h,j] = sum_l softmax_l(c[b,h,j] * k[b,l]) * v[b,l]; same contract as rank1_softmax_mix.

    Samples whose bound needs more than ``max_bins`` bins go to the fused kernel.
    """
    if c.dim() != 3 or k.dim() != 2 or v.shape != k.shape or c.shape[0] != k.shape[0]:
        raise ValueError(f"moments_softmax_mix: bad shapes c={tuple(c.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    b, h, nq = c.shape
    limit = default_max_bins(k.shape[-1]) if max_bins is None else max_bins
    need = bins_needed(c, k)
    ok = need <= limit
    if not bool(ok.any()):
        return rank1_softmax_mix(c, k, v)
    if bool(ok.all()):
        return _MomentsMix.apply(c.reshape(b, h * nq), k, v).view(b, h, nq)
    i_ok, i_fb = ok.nonzero().squeeze(1), (~ok).nonzero().squeeze(1)
    fast = _MomentsMix.apply(c[i_ok].reshape(-1, h * nq), k[i_ok], v[i_ok]).view(-1, h, nq)
    slow = rank1_softmax_mix(c[i_fb], k[i_fb], v[i_fb])
    out = c.new_zeros(b, h, nq)
    return out.index_copy(0, i_ok, fast).index_copy(0, i_fb, slow.to(out.dtype))


# -- heads whose query coefficients are affine in one shared scalar ---------------------------
#
# In an attention layer c[b,h,j] = alpha_h x_j + beta_h (sgmft.models.blocks._rank1_attention).
# When a single bin suffices (small |c| * key range, e.g. the literal preset's SIM on raw
# features), the series in t = rho c is re-expanded in xi_j = x_j / X:
#     sum_k t^k / k! M_k = sum_i xi^i R_{h,i},  R_{h,i} = a_h^i / i! sum_m b_h^m / m! M_{i+m},
# with a_h = rho alpha_h X, b_h = rho beta_h: the same truncated series (same error bound),
# but the powers are formed once per query token instead of once per (head, token).  The
# terms are bounded by e^{z'} with z' = rho max_h (|alpha_h| X + |beta_h|), so the path is
# only taken for z' <= AFFINE_Z (rounding amplification <= e^{2 AFFINE_Z}).

AFFINE_Z = 1.0


class _AffineMix(torch.autograd.Function):
    """out[b,h,j] = sum_l softmax_l((alpha_h xq[b,j] + beta_h) k[b,l]) v[b,l], one key bin."""

    @staticmethod
    def forward(ctx, xq, alpha, beta, k, v, scale: float, nterms: int):
        xd, kd, vd = xq.double(), k.double(), v.double()
        al, be = alpha.double(), beta.double()
        lo, hi = kd.amin(-1, keepdim=True), kd.amax(-1, keepdim=True)
        centre, rho = (lo + hi) / 2, (hi - lo) / 2                                 # (B, 1)
        unit = (kd - centre) / torch.where(rho > 0, rho, torch.ones_like(rho))     # in [-1, 1]
        vbar = vd.mean(-1, keepdim=True)
        vc = vd - vbar
        y = kd - centre
        need_c = any(ctx.needs_input_grad[:3])
        vals = torch.stack([torch.ones_like(vc), vc] + ([y, y * vc] if need_c else []), -1)   # (B, n, ch)
        mom = torch.bmm(_powers(unit, nterms, False).transpose(1, 2), vals)        # (B, K, ch)
        bsz, n = xd.shape
        heads = al.shape[0]
        # coef[b, h, i, k] = a^i / i! * b^(k-i) / (k-i)!  (k >= i), a = rho alpha X, b = rho beta
        i = torch.arange(nterms, dtype=xd.dtype, device=xd.device)
        fact = torch.exp(-torch.lgamma(i + 1))
        pa = (rho * al * scale).unsqueeze(-1) ** i * fact                          # (B, H, K)
        pb = (rho * be).unsqueeze(-1) ** i * fact
        idx = torch.arange(nterms, device=xd.device)
        diff = idx[None, :] - idx[:, None]                                         # k - i
        coef = pa.unsqueeze(-1) * pb[..., diff.clamp_min(0)] * (diff >= 0)         # (B, H, K, K)
        r = torch.einsum("bhik,bkc->bihc", coef, mom)                              # R: (B, K, H, ch)
        xi = _powers(xd / scale, nterms, False)                                    # (B, n, K)
        sums = torch.bmm(xi, r.reshape(bsz, nterms, -1)).view(bsz, n, heads, -1).transpose(1, 2)  # (B, H, n, ch)
        den = sums[..., 0]                                                         # sum_l e^{c (x_l - centre)}
        out_c = sums[..., 1] / den
        dc = (sums[..., 3] - out_c * sums[..., 2]) / den if need_c else None
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(xd, al, be, unit, xi, out_c, dc, den, vc, coef)
        return (out_c + vbar.unsqueeze(1)).to(xq.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xd, al, be, unit, xi, out_c, dc, den, vc, coef = ctx.saved_tensors
        g = grad_out.double()                                                      # (B, H, n)
        dt = grad_out.dtype
        gx = ga = gb = gk = gv = None
        if any(ctx.needs_input_grad[:3]):
            gc = g * dc                                                            # d out / d c
            if ctx.needs_input_grad[0]:
                gx = torch.einsum("bhn,h->bn", gc, al).to(dt)
            if ctx.needs_input_grad[1]:
                ga = torch.einsum("bhn,bn->h", gc, xd).to(dt)
            if ctx.needs_input_grad[2]:
                gb = gc.sum((0, 2)).to(dt)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # S_l = sum_{h,j} w_hj p_hjl,  p_hjl = sum_k T_hjk u_l^k / den_hj,
            # sum_{h,j} (w/den)_hj T_hjk = sum_h sum_i coef[h, i, k] G[h, i],  G[h, i] = sum_j (w/den)_hj xi_j^i
            c = al[None, :, None] * xd[:, None, :] + be[None, :, None]
            gcw = g * c
            w = torch.stack([g, gcw, gcw * out_c], -1) / den.unsqueeze(-1)           # (B, H, n, 3)
            bsz, heads, n, _ = w.shape
            big_g = torch.bmm(xi.transpose(1, 2), w.permute(0, 2, 1, 3).reshape(bsz, n, heads * 3))
            a_k = torch.einsum("bhik,bihc->bkc", coef, big_g.view(bsz, -1, heads, 3))   # (B, K, 3)
            s = torch.bmm(_powers(unit, a_k.shape[1], False), a_k)                 # (B, n, 3)
            gv = s[..., 0].to(dt) if ctx.needs_input_grad[4] else None
            gk = (vc * s[..., 1] - s[..., 2]).to(dt) if ctx.needs_input_grad[3] else None
        return gx, ga, gb, gk, gv, None, None


def moments_attention(xq: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
    """out[b,h,j] = sum_l softmax_l(c[b,h,j] k[b,l]) v[b,l] with c = alpha_h xq[b,j] + beta_h.

    xq, k, v: (B, n); alpha, beta: (H,).  Uses the affine one-bin path when its bound allows
    (see above), else forms c and calls :func:`moments_softmax_mix`.
    """
    with torch.no_grad():
        scale = float(xq.detach().abs().max().clamp_min(1e-300))
        kd = k.detach().double()
        rho = float((kd.amax(-1) - kd.amin(-1)).max()) / 2
        z = rho * float((alpha.detach().double().abs() * scale + beta.detach().double().abs()).max())
    if math.isfinite(z) and z <= AFFINE_Z:
        return _AffineMix.apply(xq, alpha, beta, k, v, scale, n_terms(z))
    c = xq[:, None, :] * alpha[None, :, None] + beta[None, :, None]
    return moments_softmax_mix(c, k, v)
