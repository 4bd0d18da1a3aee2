"""Building blocks shared by SG-MFT, its fusions and the baselines: input scaling with learned
placeholders, token norms, Q/K/V projections, multi-head attention (eqs 6-11), FFN (eq 15),
the multimodal classifier (eq 18) and one post-LN transformer stream for the fusion variants."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.moments import moments_attention
from sgmft.models.rank1 import rank1_softmax_mix


class Classifier(nn.Module):
    """Multimodal classifier MC (eq 18): len(hidden) + 1 linear layers (5 in the paper)."""

    def __init__(self, in_dim: int, hidden: list[int], num_classes: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = width
        layers.append(nn.Linear(in_dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ModalityInput(nn.Module):
    """Normalises and scales a modality's features and substitutes a *learned* placeholder for absent ones.

    A post without usable text (or image) carries ``mask = False`` in the feature store;
    its stored row is ignored and replaced by a trained vector, so "absent" is a state the
    model can recognise rather than a zero vector it cannot tell from a real feature.

    Input normalisation (``ModelConfig.input_norm``, docs/design.md "Input normalisation"):
    raw CLIP-like features are L2-normalised vectors in a narrow cone: a large mean (the
    modality gap) and a few dominant directions. With ``norm`` on, the features are first
    mapped to ``(x - mu) * s`` ("standardize": s = 1 / per-dimension std) or ``(x - mu) @ W``
    ("whiten": W = Sigma^{-1/2} of a Ledoit-Wolf shrinkage covariance), with mu, s, W fitted on
    the training split only (:func:`sgmft.models.input_norm.fit_input_norm`). They are buffers,
    so the checkpoint carries them and predict, serve and export apply them identically.
    """

    def __init__(self, dim: int, scale: float, modality: str | None = None):
        super().__init__()
        self.scale = scale
        self.modality = modality            # "text" / "image": whose training statistics it gets
        self.norm = "none"
        self.missing = nn.Parameter(torch.zeros(dim))

    def enable_norm(self, mode: str, modality: str) -> None:
        """Add the normalisation buffers (identity until fitted) for ``mode`` in standardize, whiten."""
        dim = self.missing.shape[0]
        self.norm, self.modality = mode, modality
        self.register_buffer("norm_mean", torch.zeros(dim))
        if mode == "standardize":
            self.register_buffer("norm_scale", torch.ones(dim))
        elif mode == "whiten":
            self.register_buffer("norm_matrix", torch.eye(dim))
        else:
            raise ValueError(f"unknown input normalisation {mode!r}")

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "none":
            return x
        x = x - self.norm_mean.to(x.dtype)
        if self.norm == "standardize":
            return x * self.norm_scale.to(x.dtype)
        return x @ self.norm_matrix.to(x.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.normalise(x) * self.scale
        if mask is not None:
            x = torch.where(mask.bool()[:, None], x, self.missing.to(x.dtype))
        return x


class TokenNorm(nn.Module):
    """LayerNorm over the token width d ("token") or over the whole n x d block ("vector").

    With d = 1 a per-token LayerNorm is identically zero, so the paper preset normalises
    the whole D-vector (SPEC: "LayerNorm over a width-1 token is degenerate").
    """

    def __init__(self, n: int, d: int, mode: str):
        super().__init__()
        self.norm = nn.LayerNorm((n, d) if mode == "vector" else d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class QKV(nn.Module):
    """One modality's projections W^Q, W^K, W^V (eqs 6-7), shared by its self- and cross-attention."""

    def __init__(self, d: int, d_model: int):
        super().__init__()
        self.q = nn.Linear(d, d_model)
        self.k = nn.Linear(d, d_model)
        self.v = nn.Linear(d, d_model)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, dm = x.shape
    return x.view(b, n, heads, dm // heads).transpose(1, 2)


def multi_head_attention(x_q: torch.Tensor, x_kv: torch.Tensor, proj_q: QKV, proj_kv: QKV,
                         out: nn.Linear, heads: int, impl: str = "sdpa") -> torch.Tensor:
    """concat_h softmax(Q K^T / sqrt(d_h)) V  W^out  (eqs 8-11), tokens (B, n, d) -> (B, n, d).

    Queries come from ``x_q`` through ``proj_q.q``; keys and values from ``x_kv`` through
    ``proj_kv.k`` / ``proj_kv.v``.  ``impl``: "sdpa" (torch's fused kernel), "naive" (the
    textbook per-head formula, kept as the benchmark's reference), "rank1" (exact
    closed form for d = 1 on the fused kernel, see :mod:`sgmft.models.rank1`) or "moments"
    (the same closed form through exact exponential moments, :mod:`sgmft.models.moments`).
    """
    if impl in ("rank1", "moments"):
        return _rank1_attention(x_q, x_kv, proj_q, proj_kv, out, heads, impl)
    q = _split_heads(proj_q.q(x_q), heads)
    k = _split_heads(proj_kv.k(x_kv), heads)
    v = _split_heads(proj_kv.v(x_kv), heads)
    if impl == "sdpa":
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        o = att @ v
    b, h, n, dh = o.shape
    return out(o.transpose(1, 2).reshape(b, n, h * dh))


def _rank1_attention(x_q, x_kv, proj_q: QKV, proj_kv: QKV, out: nn.Linear, heads: int,
                     impl: str = "rank1"):
    """Same numbers as the "naive" path for d = 1, without forming any n x n or d_model tensor."""
    dm = proj_q.q.out_features
    dh = dm // heads
    wq = proj_q.q.weight[:, 0].view(heads, dh)
    bq = proj_q.q.bias.view(heads, dh)
    wk = proj_kv.k.weight[:, 0].view(heads, dh)
    wv = proj_kv.v.weight[:, 0].view(heads, dh)
    bv = proj_kv.v.bias.view(heads, dh)
    wo = out.weight.view(out.out_features, heads, dh)          # (d=1, H, dh)
    alpha = (wq * wk).sum(-1) / math.sqrt(dh)                   # (H,)
    beta = (bq * wk).sum(-1) / math.sqrt(dh)                    # (H,)
    xq, xkv = x_q[..., 0], x_kv[..., 0]                         # (B, n)
    if impl == "moments":
        m = moments_attention(xq, alpha, beta, xkv, xkv)         # (B, H, n): sum_l p_jl x_l
    else:
        c = xq[:, None, :] * alpha[None, :, None] + beta[None, :, None]   # (B, H, n)
        m = rank1_softmax_mix(c, xkv, xkv)
    a = (wv[None] * wo).sum(-1)                                 # (1, H): w_v^h . W_out^h
    const = (bv[None] * wo).sum((-1, -2)) + out.bias            # (1,)
    return (torch.einsum("bhn,oh->bno", m, a) + const)


class FFN(nn.Module):
    """Feed-forward block, token-wise (d -> d_h -> d) or on the whole D-vector (D -> d_h -> D).

    With ``similarity=True`` it is eq 15: ReLU(X W1 + X_inter W3 + b1) W2 + b2.
    """

    def __init__(self, n: int, d: int, hidden: int, mode: str, similarity: bool, dropout: float):
        super().__init__()
        width = d if mode == "token" else n * d
        self.mode, self.n, self.d = mode, n, d
        self.w1 = nn.Linear(width, hidden)
        self.w3 = nn.Linear(width, hidden, bias=False) if similarity else None
        self.w2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, x_inter: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        if self.mode == "vector":
            x = x.flatten(1)
            x_inter = None if x_inter is None else x_inter.flatten(1)
        h = self.w1(x)
        if self.w3 is not None:
            h = h + self.w3(x_inter)
        return self.w2(self.drop(F.relu(h))).view(shape)


def resolve_attn_impl(cfg: ModelConfig) -> str:
    if cfg.attn_impl == "auto":
        return "moments" if cfg.token_dim == 1 else "sdpa"
    return cfg.attn_impl


class Attention(nn.Module):
    """Multi-head attention in the form of eq 11 with its own W^Q, W^K, W^V and W^out:
    cross-attention when ``x_q`` and ``x_kv`` differ, self-attention when they are the same."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.token_dim
        self.proj_q, self.proj_kv = QKV(d, cfg.attn_dim), QKV(d, cfg.attn_dim)
        self.out = nn.Linear(cfg.attn_dim, d)
        self.heads, self.impl = cfg.heads, resolve_attn_impl(cfg)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        return multi_head_attention(x_q, x_kv, self.proj_q, self.proj_kv, self.out,
                                    self.heads, self.impl)


class TransformerSublayers(nn.Module):
    """One stream of a fusion layer: [self-attention] -> [cross-attention] -> FFN, each
    wrapped as x = LN(x + dropout(sublayer(x)))."""

    def __init__(self, cfg: ModelConfig, n: int, self_attn: bool = True, cross_attn: bool = True):
        super().__init__()
        d, norm = cfg.token_dim, cfg.resolved_norm_mode()
        self.sa = Attention(cfg) if self_attn else None
        self.ca = Attention(cfg) if cross_attn else None
        self.norm_sa = TokenNorm(n, d, norm) if self_attn else None
        self.norm_ca = TokenNorm(n, d, norm) if cross_attn else None
        self.ffn = FFN(n, d, cfg.ffn_hidden, cfg.ffn_mode, similarity=False, dropout=cfg.dropout)
        self.norm_ffn = TokenNorm(n, d, norm)
        self.drop = nn.Dropout(cfg.dropout)

    def self_part(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.sa is None else self.norm_sa(x + self.drop(self.sa(x, x)))

    def cross_part(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return x if self.ca is None else self.norm_ca(x + self.drop(self.ca(x, other)))

    def ffn_part(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_ffn(x + self.drop(self.ffn(x)))

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        x = self.self_part(x)
        if other is not None:
            x = self.cross_part(x, other)
        return self.ffn_part(x)
