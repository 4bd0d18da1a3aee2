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

import functools
import math

import torch

from sgmft.models.rank1 import rank1_softmax_mix

Z0 = 3.0  # bound on |c_j (x_l - m_b)| inside a bin (and on |delta_j y_l| in the backward)
EPS = 2.0 ** -53  # float64 unit roundoff: the truncation target
SEGMENTS, SEGMENT = 8, 256  # queries sorted by |c| are answered in SEGMENTS parts (>= SEGMENT each)
SORT_STEPS = 8  # resolution of the sort key |c| * half-range
TOKEN_CHUNKS = 16  # chunks per head when queries are grouped through their token (_order_by_token)
SAMPLE_CHUNK = 64  # samples per kernel call: a call's bins and series length are set by its worst sample,
                   # so big inference batches (512) are split (measured 16.6 s -> 6.4 s on 3,400 posts)


def n_terms(z0: float, eps: float = EPS) -> int:
    """Smallest K with z0^K / K! * e^{2 z0} <= eps (truncation below float64 rounding)."""
    k, term = 0, math.exp(2 * z0)
    while term > eps:
        k += 1
        term *= z0 / k
    return max(k, 1)


K = n_terms(Z0)  # 31 terms for Z0 = 3 (fewer where the actual bound is smaller)


def _powers(t: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k, m) tensor of t^i, i = 0..k-1, for t (B, m), by doubling: rows [h, 2h) are rows
    [0, h) times t^h (log2(k) tensor ops).  The power index is the middle axis so every op
    writes contiguous blocks; ``.transpose(1, 2)`` gives the (B, m, k) view."""
    out = t.new_empty(t.shape[0], k, t.shape[1])
    out[:, 0].fill_(1)
    h, th = 1, t.unsqueeze(1)                                                     # th = t^h
    while h < k:
        w = min(h, k - h)
        torch.mul(out[:, :w], th, out=out[:, h:h + w])
        h, th = 2 * h, (th * th if 2 * h < k else None)
    return out


def _inv_factorial(k: int, like: torch.Tensor) -> torch.Tensor:
    """(k,) tensor of 1 / i!, i = 0..k-1."""
    if k > 2 * K:
        return torch.exp(-torch.lgamma(torch.arange(1, k + 1, dtype=like.dtype, device=like.device)))
    return _INV_FACTORIAL(like.dtype, like.device)[:k]


@functools.lru_cache(maxsize=None)
def _INV_FACTORIAL(dtype, device) -> torch.Tensor:   # noqa: N802  (a cached constant table)
    return torch.exp(-torch.lgamma(torch.arange(1, 2 * K + 1, dtype=dtype, device=device)))


class _Bins:
    """Equal-width bins over the last axis of ``x`` (B, n), nb bins per row, empty ones dropped.

    Bin b of a row has centre lo + (b + 1/2) width; a key's unit offset u = (x - centre) /
    (width / 2) is in [-1, 1].  Bins holding no key contribute nothing to any sum, so only the
    occupied ones are kept (``nb`` becomes the largest occupied count of the batch; a row with
    fewer repeats its last centre, with zero moments).  Trained weights spread the keys with
    a few outliers (key range ~30 where most keys lie within a few units), where most
    equal-width bins are empty; the centres and offsets, hence the series and its error
    bound, are those of the equal-width layout.  The first and the last bin are always
    occupied (they hold the smallest and the largest key), which :func:`_forward` relies on.
    """

    def __init__(self, x: torch.Tensor, nb: int):
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        width = (hi - lo) / nb
        safe = torch.where(width > 0, width, torch.ones_like(width))
        idx = ((x - lo) / safe).floor().clamp_(0, nb - 1).long()                  # (B, n)
        centres = lo + (torch.arange(nb, dtype=x.dtype, device=x.device) + 0.5) * width  # (B, nb)
        self.half = width / 2                                                     # (B, 1)
        self.unit = (x - centres.gather(1, idx)) / (safe / 2)                     # in [-1, 1]
        if nb > 2:
            occ = torch.zeros(x.shape[0], nb, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
            kept = int(occ.sum(1).max())
            if kept < nb:
                rank = occ.long().cumsum(1) - 1                                   # compact index of a bin
                idx = rank.gather(1, idx)
                buf = centres[:, -1:].expand(-1, kept + 1).clone()                # padding: the last centre
                buf.scatter_(1, torch.where(occ, rank, kept), centres)           # column `kept`: discarded
                centres, nb = buf[:, :kept], kept
        self.nb = nb
        self.idx = idx
        self.centres = centres

    def moments(self, vals: torch.Tensor, k: int) -> torch.Tensor:
        """M[b, c*nb + bin, i] = sum_{l in bin} unit_l^i vals[b, c, l] / i!  -> (B, ch*nb, k).

        ``vals`` is (B, ch, n); the 1/i! of the series is folded in here (a small table)."""
        b, ch, n = vals.shape
        if self.nb == 1:
            spread = vals
        else:   # vals placed in their bin's rows: (B, ch, nb, n), zero elsewhere
            spread = vals.new_zeros(b, ch, self.nb, n)
            spread.scatter_(2, self.idx[:, None, None, :].expand(b, ch, 1, n), vals.unsqueeze(2))
        mom = torch.bmm(spread.reshape(b, -1, n), _powers(self.unit, k).transpose(1, 2))
        return mom * _inv_factorial(k, mom)


def _order_by_token(cd: torch.Tensor, xq: torch.Tensor, half_span: torch.Tensor) -> torch.Tensor:
    """A query order grouping similar |c| for c[b, h*n + j] = alpha_h xq[b, j] + beta_h, without
    sorting all H*n queries: sort the n tokens once; along the sorted tokens each head's c is
    monotone, so every chunk of TOKEN_CHUNKS consecutive tokens has its largest |c| at an end.
    Chunks (the same for the whole batch) are then ordered by that bound (max over the batch).
    Any order gives the same result; this one only decides how well segments are packed."""
    bsz, q = cd.shape
    n = xq.shape[1]
    heads = q // n
    xs = xq.argsort(-1)                                                           # (B, n)
    idx = (xs.unsqueeze(1) + n * torch.arange(heads, device=xs.device).view(1, -1, 1)).view(bsz, q)
    ends = sorted({i * n // TOKEN_CHUNKS for i in range(TOKEN_CHUNKS + 1)})       # python ints
    first, last = torch.tensor(ends[:-1]), torch.tensor(ends[1:]) - 1
    csort = cd.gather(1, idx).view(bsz, heads, n).abs()
    bound = torch.maximum(csort[:, :, first], csort[:, :, last])                  # (B, H, chunks)
    bound = (bound * half_span.view(-1, 1, 1)).amax(0).flatten()                  # (H * chunks,)
    start = (first + n * torch.arange(heads).view(-1, 1)).flatten()               # chunk starts in idx
    size = (last + 1 - first).repeat(heads)
    perm = bound.argsort().cpu()
    start, size = start[perm], size[perm]
    # column p of the new order is start[c] + (p - offset[c]) for the chunk c it falls in
    cols = torch.arange(q) + torch.repeat_interleave(start - (size.cumsum(0) - size), size)
    return idx[:, cols.to(idx.device)]


def _forward(cd, xd, vd, need_dc: bool, keep: bool, hint=None):
    """Forward for c (B, Q), keys x and values v (B, n), all float64.

    Queries are sorted by the integer number of bins they need and answered in segments,
    each with the fewest bins its own largest |c| allows (most |c| are far below the max).
    Everything per query is kept in that sorted order (planar: channel-major), and only the
    results are put back in the queries' order.  Returns out, d out/d c (or None), and for
    the backward: the order (or None), the sorted c, out' (centred), den, v', and (if
    ``keep``) per segment (slice, bins, powers T (B, k, Qs), bin weights E (B, nb, Qs)).
    """
    vbar = vd.mean(-1, keepdim=True)
    vc = vd - vbar
    chans = [torch.ones_like(vc), vc]
    if need_dc:  # E_j[y] and E_j[y v'] for d out / d c (y centred on the keys' mid-range)
        y = xd - (xd.amin(-1, keepdim=True) + xd.amax(-1, keepdim=True)) / 2
        chans += [y, y * vc]
    vals = torch.stack(chans, 1)                                                  # (B, ch, n)
    ch = vals.shape[1]
    half_span = (xd.amax(-1) - xd.amin(-1)) / 2                                   # (B,)
    bsz, q = cd.shape
    sort = float((cd.abs().amax(-1) * half_span).max()) > 2 * Z0                 # > 2 bins somewhere
    # sort by |c_j| * half-range in steps of 1/SORT_STEPS (an integer sort is ~4x cheaper than a
    # float one): it sets both the bins (z / Z0) and the terms (n_terms) a segment needs
    if not sort:
        order = None
    elif hint is not None:   # c affine in one token per head: cheaper grouping (_order_by_token)
        order = _order_by_token(cd, hint, half_span)
    else:
        order = (cd.abs() * (half_span * SORT_STEPS).unsqueeze(-1)).ceil().long().argsort(-1)
    cs = cd.gather(1, order) if sort else cd
    seg = max(SEGMENT, -(-q // SEGMENTS)) if sort else q
    sums = cd.new_empty(bsz, ch, q)                 # e^{-s_j} sum_l e^{c_j x_l} vals_l, sorted order
    # plan: per segment the bins (half-width rho = half-range / nb) and the series length
    plan = []
    for i in range(0, q, seg):
        zmax = float((cs[:, i:i + seg].abs().amax(-1) * half_span).max())         # max |c| * half-range
        nb = max(1, int(math.ceil(zmax / Z0)))
        zb = float((cs[:, i:i + seg].abs().amax(-1) * (half_span / nb)).max())   # max |c| * rho
        plan.append((i, nb, n_terms(zb)))
    need = {}
    for _, nb, k in plan:
        need[nb] = max(need.get(nb, 0), k)
    tables = {}
    for nb, k in need.items():      # one moment table per bin layout, as long as its longest series
        kb = _Bins(xd, nb)
        tables[nb] = (kb, kb.moments(vals, k))
    segments = []
    for i, nb, k in plan:
        cq = cs[:, i:i + seg]
        kb, mom = tables[nb]
        tp = _powers(cq * kb.half, k)                                             # (B, k, Qs)
        series = torch.bmm(mom[:, :, :k], tp)                                     # (B, ch*kb.nb, Qs)
        if nb == 1:
            weight = None
            sums[:, :, i:i + seg] = series
        else:
            # bin weights e^{c m_b - s}, s = max_b c m_b: first or last bin (both non-empty)
            cm = kb.centres.unsqueeze(-1) * cq.unsqueeze(1)                        # (B, nb, Qs)
            weight = torch.exp(cm - torch.maximum(cm[:, :1], cm[:, -1:]))          # <= 1
            torch.sum(series.view(bsz, ch, kb.nb, -1).mul_(weight.unsqueeze(1)), 2, out=sums[:, :, i:i + seg])
        if keep:
            segments.append((slice(i, i + seg), kb, tp, weight))
    den = sums[:, 0]
    out_c = sums[:, 1] / den
    dc = (sums[:, 3] - out_c * sums[:, 2]) / den if need_dc else None
    out = out_c + vbar
    if sort:   # back to the queries' order
        out = torch.empty_like(out).scatter_(1, order, out)
        dc = None if dc is None else torch.empty_like(dc).scatter_(1, order, dc)
    return out, dc, (order, cs, out_c, den, vc, segments)


def _key_sums(w, state, n: int):
    """S_l = sum_j w_j p_jl for every key l and weight channel (w: (B, ch, Q) in the forward's
    sorted order) -> (B, ch, n).

    With the forward's expansion, p_jl = E_jb / den_j * sum_i T_ji u_l^i / i! for l in bin b,
    so S_l = sum_i u_l^i / i! A_{b,i} with A_{b,i} = sum_j (w_j / den_j) E_jb T_ji: one matrix
    product over the queries per segment, then a short series at each key.
    E_jb / den_j = exp(c_j m_b - log sum_l e^{c_j x_l}) <= 1, and the truncation error
    relative to sum_j |w_j| p_jl is again <= Z0^K / K! e^{2 Z0}.
    """
    _, _, _, den, _, segments = state
    wd = w / den.unsqueeze(1)
    b, ch, _ = wd.shape
    tables: dict[int, list] = {}                            # per bin layout (id): [bins, A (B, ch*nb, K), used]
    for sl, kb, tp, weight in segments:
        ws = wd[:, :, sl]                                                         # (B, ch, Qs)
        x = ws if weight is None else (weight.unsqueeze(1) * ws.unsqueeze(2)).view(b, -1, ws.shape[-1])
        k = tp.shape[1]
        part = torch.bmm(x, tp.transpose(1, 2))                                   # (B, ch*nb, k)
        entry = tables.get(id(kb))  # one table per bin layout (layouts may share a compacted nb)
        if entry is None:
            entry = tables[id(kb)] = [kb, part.new_zeros(b, part.shape[1], K), 0]
        entry[1][:, :, :k] += part
        entry[2] = max(entry[2], k)
    out = wd.new_zeros(b, ch, n)
    for kb, table, used in tables.values():
        table = table[:, :, :used] * _inv_factorial(used, table)                 # T's 1/i!
        at_keys = torch.bmm(table, _powers(kb.unit, used))                       # (B, ch*nb, n)
        if kb.nb == 1:
            out += at_keys
        else:
            out += at_keys.view(b, ch, kb.nb, n).gather(2, kb.idx[:, None, None, :].expand(b, ch, 1, n)).squeeze(2)
    return out


class _MomentsMix(torch.autograd.Function):
    """out[b, j] = sum_l softmax_l(c[b, j] k[b, l]) v[b, l] for c (B, Q), k, v (B, n)."""

    @staticmethod
    def forward(ctx, c, k, v, hint=None):
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        out, dc, state = _forward(c.double(), k.double(), v.double(),
                                  need_dc=ctx.needs_input_grad[0], keep=need_kv, hint=hint)
        if any(ctx.needs_input_grad):
            ctx.state = state
            ctx.save_for_backward(dc)
        return out.to(c.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (dc,) = ctx.saved_tensors
        g = grad_out.double()
        dt = grad_out.dtype
        gc = (g * dc).to(dt) if ctx.needs_input_grad[0] else None                # d out_j / d c_j
        gk = gv = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            order, cs, out_c, _, vc, _ = ctx.state
            gs = g if order is None else g.gather(1, order)                      # sorted order
            gcw = gs * cs
            # d out_j / d v_l = p_jl;  d out_j / d x_l = c_j p_jl (v'_l - out'_j)
            s = _key_sums(torch.stack([gs, gcw, gcw * out_c], 1), ctx.state, vc.shape[-1])
            gv = s[:, 0].to(dt) if ctx.needs_input_grad[2] else None
            gk = (vc * s[:, 1] - s[:, 2]).to(dt) if ctx.needs_input_grad[1] else None
        ctx.state = None
        return gc, gk, gv, None


def bins_needed(c: torch.Tensor, k: torch.Tensor, z0: float = Z0) -> torch.Tensor:
    """Per sample, the number of key bins that keeps |c_j (x_l - m_b)| <= z0. (B,) float."""
    with torch.no_grad():
        cmax = c.detach().double().abs().flatten(1).amax(-1)
        span = (k.detach().double().amax(-1) - k.detach().double().amin(-1))
        need = (cmax * span / (2 * z0)).ceil().clamp_min(1)
        return torch.where(torch.isfinite(need), need, torch.full_like(need, math.inf))


def default_max_bins(n_keys: int) -> int:
    """Equal-width bins above which a sample goes to the fused kernel: 4 n / K.

    A query costs O(nb K) multiply-adds here against O(n) exps there, and an exp costs
    several multiply-adds; empty bins are dropped (:class:`_Bins`), so the occupied count is
    usually well below nb.  Measured on the paper preset with the epoch-30 weights of the
    paper-schedule run (real SimFeat batches, up to 65 equal-width bins, ~20 occupied): a
    training step took 0.29 s with the old limit n / K (every such sample on the fused
    kernel) and 0.125 s with this one."""
    return max(1, 4 * n_keys // K)


def moments_softmax_mix(c: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        max_bins: int | None = None, token: torch.Tensor | None = None) -> torch.Tensor:
    """out[b,h,j] = sum_l softmax_l(c[b,h,j] * k[b,l]) * v[b,l]; same contract as rank1_softmax_mix.

    Samples whose bound needs more than ``max_bins`` bins go to the fused kernel.  ``token``
    (B, nq), optional: a scalar per query token such that every head's c[b, h, :] is monotone
    in it (c = alpha_h token + beta_h); it only speeds up the grouping of queries.
    """
    if c.dim() != 3 or k.dim() != 2 or v.shape != k.shape or c.shape[0] != k.shape[0]:
        raise ValueError(f"moments_softmax_mix: bad shapes c={tuple(c.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    b, h, nq = c.shape
    if b > SAMPLE_CHUNK:   # the plan (bins, series length) follows each chunk's own largest |c|
        return torch.cat([moments_softmax_mix(c[s:s + SAMPLE_CHUNK], k[s:s + SAMPLE_CHUNK], v[s:s + SAMPLE_CHUNK],
                                              max_bins, None if token is None else token[s:s + SAMPLE_CHUNK])
                          for s in range(0, b, SAMPLE_CHUNK)])
    limit = default_max_bins(k.shape[-1]) if max_bins is None else max_bins
    need = bins_needed(c, k)
    ok = need <= limit
    if not bool(ok.any()):
        return rank1_softmax_mix(c, k, v)
    if bool(ok.all()):
        return _MomentsMix.apply(c.reshape(b, h * nq), k, v, token).view(b, h, nq)
    i_ok, i_fb = ok.nonzero().squeeze(1), (~ok).nonzero().squeeze(1)
    fast = _MomentsMix.apply(c[i_ok].reshape(-1, h * nq), k[i_ok], v[i_ok],
                             None if token is None else token[i_ok]).view(-1, h, nq)
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
        vals = torch.stack([torch.ones_like(vc), vc] + ([y, y * vc] if need_c else []), 1)   # (B, ch, n)
        mom = torch.bmm(vals, _powers(unit, nterms).transpose(1, 2))              # (B, ch, K)
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
        r = torch.einsum("bhik,bck->bhci", coef, mom)                              # R: (B, H, ch, K)
        xi = _powers(xd / scale, nterms)                                           # (B, K, n)
        sums = torch.bmm(r.reshape(bsz, -1, nterms), xi).view(bsz, heads, -1, n)   # (B, H, ch, n)
        den = sums[:, :, 0]                                                        # sum_l e^{c (x_l - centre)}
        out_c = sums[:, :, 1] / den
        dc = (sums[:, :, 3] - out_c * sums[:, :, 2]) / den if need_c else None
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
            w = torch.stack([g, gcw, gcw * out_c], 2) / den.unsqueeze(2)             # (B, H, 3, n)
            bsz, heads, _, n = w.shape
            big_g = torch.bmm(w.view(bsz, heads * 3, n), xi.transpose(1, 2))         # G: (B, H*3, K)
            a_k = torch.einsum("bhik,bhci->bck", coef, big_g.view(bsz, heads, 3, -1))   # (B, 3, K)
            s = torch.bmm(a_k, _powers(unit, a_k.shape[-1]))                        # (B, 3, n)
            gv = s[:, 0].to(dt) if ctx.needs_input_grad[4] else None
            gk = (vc * s[:, 1] - s[:, 2]).to(dt) if ctx.needs_input_grad[3] else None
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
    return moments_softmax_mix(c, k, v, token=xq.detach())
