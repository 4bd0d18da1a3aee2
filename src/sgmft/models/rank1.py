"""Exact fast path for attention over width-1 tokens (the ``paper`` preset, n = D, d = 1).

With d = 1 every token is a scalar x_l.  A head's query and key are affine in it,
q_j = x_j w_q + b_q and k_l = x_l w_k + b_k, so its logit is

    q_j . k_l / sqrt(d_h) = x_l * c_j + (terms constant in l),
    c_j = (x_j (w_q . w_k) + b_q . w_k) / sqrt(d_h),

and the terms constant in l cancel in the softmax over l.  The head's output is then
``(sum_l softmax_l(c_j k_l) v_l) w_v + b_v``: one scalar mixture per query.  This module
computes that mixture as a head-width-1 attention on torch's fused kernel, never storing
the n x n attention matrix (memory O(n), no d_h factor in the flops).  It is exact: the
same numbers as softmax(QK^T / sqrt(d_h)) V up to float rounding (tests check 1e-5).

The same function serves eqs 4 and 14 (P^e rows are softmax_l(t_j i_l) and
X_inter = P^e X^C_image), with c = t, k = i and v = X^C_image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rank1_softmax_mix(c: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      chunk_elems: int | None = None) -> torch.Tensor:
    """out[b,h,j] = sum_l softmax_l(c[b,h,j] * k[b,l]) * v[b,l].

    c: (B, H, n_q) per-head query coefficients; k, v: (B, n_k) scalar keys and values
    shared by all heads.  This is attention with head width 1 and scale 1, so it runs on
    torch's fused (flash) scaled-dot-product kernel: exact, O(n) memory, and per logit one
    multiply-add and one exp instead of the 2 d_h multiply-adds of the textbook form.
    ``chunk_elems`` is accepted for API stability and ignored.
    """
    if c.dim() != 3 or k.dim() != 2 or v.shape != k.shape or c.shape[0] != k.shape[0]:
        raise ValueError(f"rank1_softmax_mix: bad shapes c={tuple(c.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    b, h, _ = c.shape
    kk = k[:, None, :, None].expand(b, h, k.shape[-1], 1)
    vv = v[:, None, :, None].expand(b, h, v.shape[-1], 1)
    return F.scaled_dot_product_attention(c.unsqueeze(-1), kk, vv, scale=1.0).squeeze(-1)


def rank1_softmax_mix_reference(c: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain autograd version (stores the full matrix); for tests."""
    p = torch.softmax(c.unsqueeze(-1) * k[:, None, None, :], dim=-1)
    return (p * v[:, None, None, :]).sum(-1)
