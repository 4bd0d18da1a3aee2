"""Exact fast path for attention over width-1 tokens (the ``paper`` preset, n = D, d = 1).

With d = 1 every token is a scalar x_l.  A head's query and key are affine in it,
q_j = x_j w_q + b_q and k_l = x_l w_k + b_k, so its logit is

    q_j . k_l / sqrt(d_h) = x_l * c_j + (terms constant in l),
    c_j = (x_j (w_q . w_k) + b_q . w_k) / sqrt(d_h),

and the terms constant in l cancel in the softmax over l.  The head's output is then
``(sum_l softmax_l(c_j k_l) v_l) w_v + b_v``: one scalar mixture per query.  This module
computes that mixture, and its gradient, in query chunks without ever storing the
n x n attention matrix (memory O(n), no d_h factor in the flops).  It is exact: the same
numbers as softmax(QK^T / sqrt(d_h)) V up to float rounding (tests check 1e-5).

The same function serves eqs 4 and 14 (P^e rows are softmax_l(t_j i_l) and
X_inter = P^e X^C_image), with c = t, k = i and v = X^C_image.
"""

from __future__ import annotations

import torch


def _exp_logits(c: torch.Tensor, k: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor) -> torch.Tensor:
    """exp(c_r k_l - max_l c_r k_l) for query rows c (B,R) and keys k (B,n) -> (B,R,n).

    The row max of an outer product is known in closed form, and one fused
    ``baddbmm`` writes the shifted logits, so the chunk is touched only three times
    (write, exp in place, one thin matmul).
    """
    shift = torch.where(c >= 0, c * kmax[:, None], c * kmin[:, None])
    e = torch.baddbmm(-shift.unsqueeze(-1), c.unsqueeze(-1), k.unsqueeze(1))
    return e.exp_()


def _rows_per_chunk(b: int, n: int, target: int) -> int:
    return max(1, target // max(1, b * n))


class _Rank1Mix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, k, v, chunk_elems: int):
        b, h, nq = c.shape
        cr = c.reshape(b, h * nq)                    # heads folded into the query rows
        kmax, kmin = k.amax(-1), k.amin(-1)
        ones_v = torch.stack([torch.ones_like(v), v], dim=-1)      # (B,n,2)
        out = torch.empty_like(cr)
        step = _rows_per_chunk(b, k.shape[-1], chunk_elems)
        for r0 in range(0, h * nq, step):
            e = _exp_logits(cr[:, r0:r0 + step], k, kmax, kmin)
            z, num = torch.bmm(e, ones_v).unbind(-1)
            out[:, r0:r0 + step] = num / z
        ctx.save_for_backward(c, k, v, out)
        ctx.chunk_elems = chunk_elems
        return out.view(b, h, nq)

    @staticmethod
    def backward(ctx, g):
        c, k, v, m = ctx.saved_tensors
        b, h, nq = c.shape
        cr, gr = c.reshape(b, h * nq), g.reshape(b, h * nq)
        kmax, kmin = k.amax(-1), k.amin(-1)
        # For m_r = sum_l p_rl v_l with p_rl = softmax_l(c_r k_l):
        #   dm_r/dv_l = p_rl
        #   dm_r/dc_r = sum_l p_rl k_l v_l - (sum_l p_rl k_l) m_r
        #   dm_r/dk_l = c_r p_rl (v_l - m_r)
        cols = torch.stack([torch.ones_like(k), k, k * v], dim=-1)  # (B,n,3)
        grad_c = torch.empty_like(cr)
        acc = torch.zeros(b, 3, k.shape[-1], dtype=c.dtype, device=c.device)
        step = _rows_per_chunk(b, k.shape[-1], ctx.chunk_elems)
        for r0 in range(0, h * nq, step):
            sl = slice(r0, r0 + step)
            e = _exp_logits(cr[:, sl], k, kmax, kmin)              # unnormalised p
            z, zk, zkv = torch.bmm(e, cols).unbind(-1)
            gz, cj, mj = gr[:, sl] / z, cr[:, sl], m[:, sl]
            grad_c[:, sl] = gr[:, sl] * (zkv - zk * mj) / z
            rows = torch.stack([gz, gz * cj, gz * cj * mj], dim=1)  # (B,3,R), 1/z folded in
            acc.baddbmm_(rows, e)
        grad_v = acc[:, 0]
        grad_k = v * acc[:, 1] - acc[:, 2]
        return grad_c.view(b, h, nq), grad_k, grad_v, None


def rank1_softmax_mix(c: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      chunk_elems: int = 1 << 19) -> torch.Tensor:
    """out[b,h,j] = sum_l softmax_l(c[b,h,j] * k[b,l]) * v[b,l].

    c: (B, H, n_q) per-head query coefficients; k, v: (B, n_k) scalar keys and values
    shared by all heads.  Exact; works on chunks of about ``chunk_elems`` logits, so the
    memory is O(chunk_elems) whatever n is.
    """
    if c.dim() != 3 or k.dim() != 2 or v.shape != k.shape or c.shape[0] != k.shape[0]:
        raise ValueError(f"rank1_softmax_mix: bad shapes c={tuple(c.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    return _Rank1Mix.apply(c, k, v, int(chunk_elems))


def rank1_softmax_mix_reference(c: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain autograd version (stores the full matrix); for tests."""
    p = torch.softmax(c.unsqueeze(-1) * k[:, None, None, :], dim=-1)
    return (p * v[:, None, None, :]).sum(-1)
