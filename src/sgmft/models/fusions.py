"""Fusion modules for the SG-MFT fusion slot (section 3.2.2, paper Table 3, Fig. 6).

Each module maps the two token sequences (B, n, d) that leave SIM (F^S_text, F^S_image)
to M_fuse (B, out_dim), so switching the model config's ``fusion`` swaps *only* the fusion
while SIM and the classifier stay the same:

``sfm``          the paper's similarity-aware fusion module, eq 17: CA(t -> i) + CA(i -> t), R^D.
``concat``       [F^S_text ; F^S_image] in R^{2D}: what M_fuse becomes when SFM is switched off
                 (ablation, Table 2); the default there because it is exactly the "+ CLIP"
                 baseline's fusion, so "+ CLIP + SIM" differs from "+ CLIP" by SIM alone.
``sum``          F^S_text + F^S_image in R^D (eq 17 without its cross-attentions).
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

The transformer blocks (:class:`sgmft.models.blocks.TransformerSublayers`) are post-LayerNorm
(x = LN(x + sublayer(x))), with the same normalisation (``norm_mode``), attention width,
heads, attention kernel and FFN (``ffn_mode``, ``ffn_hidden``) as SIM, so they run at both
the recommended (n = 16) and the paper-literal (n = D, d = 1) token views.
"""

from __future__ import annotations

import torch
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.blocks import Attention, TransformerSublayers
from sgmft.models.registry import FUSIONS

__all__ = ["SFM", "ConcatFusion", "SumFusion", "AsymmetricCoAttention", "MergeAttention", "CoAttention"]


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
        self.ca_text = Attention(cfg)
        self.ca_image = Attention(cfg)
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
