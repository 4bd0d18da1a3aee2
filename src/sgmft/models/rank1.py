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
    """exp(c_r k_l - max_l c_r k_l) for query rows c (R,) and keys k (n,) -> (R, n).

    The row max of an outer product is known in closed form; one ``addmm`` writes the
    shifted logits and the exponential runs in place, so a chunk is written once.
    """
    shift = torch.where(c >= 0, c * kmax, c * kmin)
    return torch.addmm(-shift.unsqueeze(1), c.unsqueeze(1), k.unsqueeze(0)).exp_()


# Chunks are 2-D (one sample's query rows x its keys): on CPU, matrix-vector products on a
# 2-D chunk are several times faster than batched matmuls with 1-3 output columns.


class _Rank1Mix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, k, v, chunk_elems: int):
        b, h, nq = c.shape
        cr = c.reshape(b, h * nq)                    # heads folded into the query rows
        kmax, kmin = k.amax(-1), k.amin(-1)
        out = torch.empty_like(cr)
        step = max(1, chunk_elems // k.shape[-1])
        for i in range(b):
            for r0 in range(0, h * nq, step):
                e = _exp_logits(cr[i, r0:r0 + step], k[i], kmax[i], kmin[i])
                out[i, r0:r0 + step] = torch.mv(e, v[i]) / e.sum(1)
        ctx.save_for_backward(c, k, v, out)
        ctx.chunk_elems = chunk_elems
        return out.view(b, h, nq)

    @staticmethod
    def backward(ctx, g):
        c, k, v, m = ctx.saved_tensors
        b, h, nq = c.shape
        cr, gr, mr = c.reshape(b, h * nq), g.reshape(b, h * nq), m.reshape(b, h * nq)
        kmax, kmin = k.amax(-1), k.amin(-1)
        # For m_r = sum_l p_rl v_l with p_rl = softmax_l(c_r k_l):
        #   dm_r/dv_l = p_rl
        #   dm_r/dc_r = sum_l p_rl k_l v_l - (sum_l p_rl k_l) m_r
        #   dm_r/dk_l = c_r p_rl (v_l - m_r)
        kv = k * v
        grad_c = torch.empty_like(cr)
        grad_k = torch.empty_like(k)
        grad_v = torch.empty_like(v)
        step = max(1, ctx.chunk_elems // k.shape[-1])
        for i in range(b):
            acc = torch.zeros(3, k.shape[-1], dtype=c.dtype, device=c.device)
            for r0 in range(0, h * nq, step):
                sl = slice(r0, r0 + step)
                e = _exp_logits(cr[i, sl], k[i], kmax[i], kmin[i])     # unnormalised p
                z = e.sum(1)
                gz, cj, mj = gr[i, sl] / z, cr[i, sl], mr[i, sl]
                grad_c[i, sl] = gz * (torch.mv(e, kv[i]) - torch.mv(e, k[i]) * mj)
                gzc = gz * cj
                acc.addmm_(torch.stack([gz, gzc, gzc * mj]), e)        # 1/z folded into the rows
            grad_v[i] = acc[0]
            grad_k[i] = v[i] * acc[1] - acc[2]
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
