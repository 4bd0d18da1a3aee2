"""Alternative fusion modules for the SG-MFT fusion slot (paper Table 3, Fig. 6).

Each module maps the two token sequences (B, n, d) that leave SIM (F^S_text, F^S_image)
to M_fuse (B, out_dim), like :class:`sgmft.models.fusion.SFM`, so switching the model
config's ``fusion`` swaps *only* the fusion while SIM and the classifier stay the same:

``asym_coattn``  asymmetric co-attention (mPLUG's cross-modal skip-connected layer, here
                 one layer): only the text stream is updated (self-attention, then
                 cross-attention to the image tokens, then an FFN); the image tokens
                 skip the layer.  M_fuse = [text stream ; image tokens] in R^{2D}.
``merge_attn``   merge-attention: both sequences concatenated into one of 2n tokens (plus
                 a learned modality-type embedding, so the shared attention can tell the
                 modalities apart), one self-attention + FFN block with a single set of
                 parameters.  M_fuse = the 2n output tokens flattened, R^{2D}.
``coattn``       co-attention (symmetric, METER/ViLBERT-style): two streams, each a
                 self-attention, then a cross-attention to the other stream, then an FFN.
                 M_fuse = [text stream ; image stream] in R^{2D}.
``sfm``          (in :mod:`sgmft.models.fusion`) eq 17: CA(t -> i) + CA(i -> t), R^D.

Blocks are post-LayerNorm transformer blocks (x = LN(x + sublayer(x))), with the same
normalisation (``norm_mode``), attention width, heads, attention kernel and FFN
(``ffn_mode``, ``ffn_hidden``) as SIM, so they run at both the recommended (n = 16) and
the paper-literal (n = D, d = 1) token views.
"""

from __future__ import annotations

import torch
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.fusion import CrossAttention
from sgmft.models.layers import FFN, TokenNorm
from sgmft.models.registry import FUSIONS

__all__ = ["Attention", "TransformerSublayers", "AsymmetricCoAttention", "MergeAttention", "CoAttention"]


# Multi-head attention with its own W^Q, W^K, W^V and W^out (self- or cross-): the SFM's block.
Attention = CrossAttention


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


@FUSIONS.register("asym_coattn")
class AsymmetricCoAttention(nn.Module):
    """mPLUG-style asymmetric co-attention: text attends to itself and to the image; the
    image tokens are passed through unchanged (the skip), and both are concatenated."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.text = TransformerSublayers(cfg, cfg.n_tokens)
        self.out_dim = 2 * cfg.dim

    def forward(self, xt: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.text(xt, xi).flatten(1), xi.flatten(1)], dim=1)


@FUSIONS.register("merge_attn")
class MergeAttention(nn.Module):
    """Merge-attention: self-attention over the concatenation of both token sequences,
    one set of parameters for both modalities."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.token_dim
        self.type_emb = nn.Parameter(torch.zeros(2, d))   # learned modality-type embedding
        self.block = TransformerSublayers(cfg, 2 * cfg.n_tokens, self_attn=True, cross_attn=False)
        self.out_dim = 2 * cfg.dim

    def forward(self, xt: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        z = torch.cat([xt + self.type_emb[0], xi + self.type_emb[1]], dim=1)   # (B, 2n, d)
        return self.block(z).flatten(1)


@FUSIONS.register("coattn")
class CoAttention(nn.Module):
    """Symmetric co-attention: each stream self-attends, then cross-attends to the other
    stream (both cross-attentions read the *self-attended* streams), then an FFN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.text = TransformerSublayers(cfg, cfg.n_tokens)
        self.image = TransformerSublayers(cfg, cfg.n_tokens)
        self.out_dim = 2 * cfg.dim

    def forward(self, xt: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        t, i = self.text.self_part(xt), self.image.self_part(xi)
        t, i = self.text.cross_part(t, i), self.image.cross_part(i, t)
        return torch.cat([self.text.ffn_part(t).flatten(1), self.image.ffn_part(i).flatten(1)], dim=1)
