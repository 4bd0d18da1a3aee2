"""SG-MFT: SG-Encoder (SIM + SFM) and the multimodal classifier (section 3).

Tokens: each D-vector is viewed as n tokens of width d = D / n (SPEC "The token view");
the ``paper`` preset is n = D, d = 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.blocks import (FFN, QKV, Classifier, ModalityInput, TokenNorm,
                                 multi_head_attention, resolve_attn_impl)
from sgmft.models.options import SGMFT_FIELDS, NoOptions
from sgmft.models.output import ModelOutput
from sgmft.models.moments import moments_softmax_mix
from sgmft.models.rank1 import rank1_softmax_mix
from sgmft.models.registry import FUSIONS, MODELS


class SIM(nn.Module):
    """Similarity-guided interaction module (section 3.2.1, eqs 1-16)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, d, dm = cfg.n_tokens, cfg.token_dim, cfg.attn_dim
        norm = cfg.resolved_norm_mode()
        self.cfg = cfg
        self.impl, self.heads = resolve_attn_impl(cfg), cfg.heads
        self.proj_t, self.proj_i = QKV(d, dm), QKV(d, dm)                  # eqs 6, 7
        self.out_sa_t, self.out_ca_t = nn.Linear(dm, d), nn.Linear(dm, d)  # W^s, W^c (text side)
        self.out_sa_i, self.out_ca_i = nn.Linear(dm, d), nn.Linear(dm, d)  # W^s, W^c (image side)
        self.norm_att_t, self.norm_att_i = TokenNorm(n, d, norm), TokenNorm(n, d, norm)
        self.ffn_sim = FFN(n, d, cfg.ffn_hidden, cfg.ffn_mode, similarity=True, dropout=cfg.dropout)
        self.ffn_plain = FFN(n, d, cfg.ffn_hidden, cfg.ffn_mode, similarity=False, dropout=cfg.dropout)
        self.norm_ffn_t, self.norm_ffn_i = TokenNorm(n, d, norm), TokenNorm(n, d, norm)
        self.drop = nn.Dropout(cfg.dropout)

    # -- similarity-aware feature polymerizer ---------------------------------------
    def modality_similarity(self, xt: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        """P^m (eqs 1, 3): per-position similarity, normalised over the n positions. (B, n)."""
        s_m = (xt * xi).sum(-1)                                   # eq 1, summed over token width
        if self.cfg.pm_norm == "sigmoid":
            return torch.sigmoid(s_m)
        return torch.softmax(s_m, dim=-1)                         # eq 3

    def element_interaction(self, xa: torch.Tensor, xb: torch.Tensor, xb_c: torch.Tensor) -> torch.Tensor:
        """X_inter = P^e X^C_b with P^e = row-softmax(X_a X_b^T) (eqs 2, 4, 5, 14). (B, n, d)."""
        d = xa.shape[-1]
        if d == 1 and self.impl in ("rank1", "moments"):
            mix = moments_softmax_mix if self.impl == "moments" else rank1_softmax_mix
            return mix(xa[..., 0].unsqueeze(1), xb[..., 0], xb_c[..., 0]).squeeze(1).unsqueeze(-1)
        s_e = xa @ xb.transpose(-1, -2)                           # eq 2
        if self.cfg.pe_scale == "sqrt_d":
            s_e = s_e / math.sqrt(d)
        p_e = torch.softmax(s_e, dim=-1)                          # eqs 4-5
        return p_e @ xb_c                                         # eq 14

    def element_similarity(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """P^e itself (B, n, n); for inspection and tests only (the forward never forms it for d = 1)."""
        s_e = xa @ xb.transpose(-1, -2)
        if self.cfg.pe_scale == "sqrt_d":
            s_e = s_e / math.sqrt(xa.shape[-1])
        return torch.softmax(s_e, dim=-1)

    def _mha(self, x_q, x_kv, proj_q, proj_kv, out):
        return multi_head_attention(x_q, x_kv, proj_q, proj_kv, out, self.heads, self.impl)

    # -- forward ------------------------------------------------------------------------
    def forward(self, xt: torch.Tensor, xi: torch.Tensor,
                stages: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(X_t, X_i) -> (F^S_text, F^S_image).  If ``stages`` is a dict, every intermediate is
        also stored in it under the names listed in :data:`SIM_STAGES` (for the equation tests,
        ``tests/reference_sgmft.py``); the computation is the same either way."""
        p_m = self.modality_similarity(xt, xi).unsqueeze(-1)      # broadcast over width
        # Image side (eqs 8-13): SA from image Q,K,V; CA from text Q with image K,V.
        sa_i = self._mha(xi, xi, self.proj_i, self.proj_i, self.out_sa_i)   # eqs 8, 10
        ca_i = self._mha(xt, xi, self.proj_t, self.proj_i, self.out_ca_i)   # eqs 9, 11
        x_image = ca_i * p_m + sa_i * (1 - p_m)                               # eq 12
        xc_i = self.norm_att_i(self.drop(x_image) + xi)                       # eq 13
        # Text side: the same with the modalities swapped.
        sa_t = self._mha(xt, xt, self.proj_t, self.proj_t, self.out_sa_t)
        ca_t = self._mha(xi, xt, self.proj_i, self.proj_t, self.out_ca_t)
        x_text = ca_t * p_m + sa_t * (1 - p_m)
        xc_t = self.norm_att_t(self.drop(x_text) + xt)
        # Similarity-aware FFN on one side (eqs 14-16), ordinary FFN on the other (Table 4).
        if self.cfg.ffn_side == "text":
            x_inter = self.element_interaction(xt, xi, xc_i)                  # eq 14
            ffn_t, ffn_i = self.ffn_sim(xc_t, x_inter), self.ffn_plain(xc_i)  # eq 15; plain FFN
        else:
            x_inter = self.element_interaction(xi, xt, xc_t)
            ffn_i, ffn_t = self.ffn_sim(xc_i, x_inter), self.ffn_plain(xc_t)
        fs_t = self.norm_ffn_t(self.drop(ffn_t) + xc_t)                       # eq 16
        fs_i = self.norm_ffn_i(self.drop(ffn_i) + xc_i)
        if stages is not None:
            stages.update(p_m=p_m.squeeze(-1), sa_i=sa_i, ca_i=ca_i, x_image=x_image, xc_i=xc_i,
                          sa_t=sa_t, ca_t=ca_t, x_text=x_text, xc_t=xc_t, x_inter=x_inter,
                          ffn_t=ffn_t, ffn_i=ffn_i, fs_t=fs_t, fs_i=fs_i)
        return fs_t, fs_i


# Names under which SIM.forward / SGMFT.forward store intermediates when given ``stages``.
SIM_STAGES = ("p_m", "sa_i", "ca_i", "x_image", "xc_i", "sa_t", "ca_t", "x_text", "xc_t",
              "x_inter", "ffn_t", "ffn_i", "fs_t", "fs_i")
MODEL_STAGES = ("xt", "xi") + SIM_STAGES + ("fused", "logits")


@MODELS.register("sgmft")
class SGMFT(nn.Module):
    """SG-Encoder (SIM -> fusion) -> multimodal classifier (eq 18); train with CE (eq 19)."""

    reads = SGMFT_FIELDS            # every flat SG-MFT field (models/options.py); no options of its own
    Options = NoOptions

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        scale = cfg.resolved_input_scale()
        self.text_in, self.image_in = ModalityInput(cfg.dim, scale, "text"), ModalityInput(cfg.dim, scale, "image")
        self.sim = SIM(cfg) if cfg.use_sim else None
        self.fusion = FUSIONS.get(cfg.fusion)(cfg)
        self.classifier = Classifier(self.fusion.out_dim, cfg.classifier_hidden, cfg.num_classes, cfg.dropout)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.cfg.n_tokens, self.cfg.token_dim)

    def forward(self, text, image, text_mask=None, image_mask=None, *,
                stages: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        """``stages``: optional dict that receives the intermediates named in MODEL_STAGES
        (the SIM ones only when SIM is on); used by the equation tests, no effect on the maths."""
        xt = self.tokens(self.text_in(text, text_mask))
        xi = self.tokens(self.image_in(image, image_mask))
        if stages is not None:
            stages.update(xt=xt, xi=xi)
        if self.sim is not None:
            xt, xi = self.sim(xt, xi, stages)
        fused = self.fusion(xt, xi)                                            # M_fuse (eq 17)
        logits = self.classifier(fused)                                        # eq 18
        if stages is not None:
            stages.update(fused=fused, logits=logits)
        return ModelOutput(logits=logits, fused=fused)
