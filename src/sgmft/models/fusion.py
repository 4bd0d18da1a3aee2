"""Fusion modules for the SG-MFT fusion slot (section 3.2.2).

``sfm`` is the paper's similarity-aware fusion module (eq 17).  ``concat`` and ``sum`` are
what M_fuse becomes when SFM is switched off (ablation, Table 2): ``concat`` is the
default there because it is exactly the "+ CLIP" baseline's fusion, so "+ CLIP + SIM"
differs from "+ CLIP" by SIM alone.
"""

from __future__ import annotations

import torch
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.layers import QKV, multi_head_attention, resolve_attn_impl
from sgmft.models.registry import FUSIONS


class CrossAttention(nn.Module):
    """One multi-head cross-attention in the form of eq 11, with its own projections."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.token_dim
        self.proj_q, self.proj_kv = QKV(d, cfg.attn_dim), QKV(d, cfg.attn_dim)
        self.out = nn.Linear(cfg.attn_dim, d)
        self.heads, self.impl, self.chunk = cfg.heads, resolve_attn_impl(cfg), cfg.rank1_chunk

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        return multi_head_attention(x_q, x_kv, self.proj_q, self.proj_kv, self.out,
                                    self.heads, self.impl, self.chunk)


@FUSIONS.register("sfm")
class SFM(nn.Module):
    """Eq 17: M_fuse = CA(query F^S_text, kv F^S_image) + CA(query F^S_image, kv F^S_text).

    Literally, each CA output is a mixture of the *other* modality's value tokens, so the
    query's own content survives only through the attention weights.  ``sfm_residual``
    reads "a layer of cross-attention" as a transformer layer, adding the query back:
    M_fuse = (CA(t, i) + F^S_text) + (CA(i, t) + F^S_image).  ``sfm_merge: concat`` keeps the
    two cross-attention layers' outputs side by side (R^{2D}) instead of adding them.
    See docs/design.md.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ca_text = CrossAttention(cfg)
        self.ca_image = CrossAttention(cfg)
        self.residual, self.merge = cfg.sfm_residual, cfg.sfm_merge
        self.out_dim = cfg.dim * (2 if self.merge == "concat" else 1)

    def forward(self, xt: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        a, b = self.ca_text(xt, xi), self.ca_image(xi, xt)
        if self.residual:
            a, b = a + xt, b + xi
        if self.merge == "concat":
            return torch.cat([a.flatten(1), b.flatten(1)], dim=1)
        return (a + b).flatten(1)


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """M_fuse = [F^S_text ; F^S_image] in R^{2D}."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.out_dim = 2 * cfg.dim

    def forward(self, xt, xi):
        return torch.cat([xt.flatten(1), xi.flatten(1)], dim=1)


@FUSIONS.register("sum")
class SumFusion(nn.Module):
    """M_fuse = F^S_text + F^S_image in R^D (eq 17 without its cross-attentions)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.out_dim = cfg.dim

    def forward(self, xt, xi):
        return (xt + xi).flatten(1)
