"""Other fusion methods re-created as heads on the same frozen features (paper Table 1).

The paper compares SG-MFT with complete systems (mPLUG, BridgeTower: large pre-trained
vision-language models; UniS-MMC, BalanceMLA: training schemes; feature-level fusion CNNs
of Meng et al. 2017).  Here each method's *fusion idea* is re-created as a head on the
shared CLIP-like features, trained by the same trainer on the same data, so the table
compares fusion strategies and nothing else.  They are our re-creations, hence "-style":

``unis_mmc``        UniS-MMC-style: unimodal supervision (a classifier per modality, CE)
                    + prediction-guided multimodal contrastive loss between the text and
                    image projections (positives: same post / same class).
``balance_mla``     BalanceMLA-style: a classifier per modality and adaptive weighted
                    decision fusion (per-post weights from each head's confidence).
``mplug``           mPLUG-style: asymmetric co-attention layers (only the text stream is
                    updated; the image tokens skip them) followed by a connected layer
                    (merge self-attention over both) -- "asymmetric co-attention with
                    skip connections".
``bridgetower``     BridgeTower-style: co-attention layers whose input is, at every layer,
                    bridged (added + LayerNorm) to a learned map of the unimodal features.
``feature_fusion``  feature-level fusion (Meng et al. 2017): concatenated text and image
                    features -> fully connected layer -> softmax (a shallow head).
``mm_gate``         MM-Gate (Sanchez Villegas & Aletras 2021), a gated multimodal unit:
                    z = sigmoid(W_z [t; i]); h = z * tanh(W_t t) + (1 - z) * tanh(W_i i).
``mm_xatt``         MM-XAtt (same paper): two cross-attentions, text -> image and
                    image -> text, each with residual + LayerNorm, added.

Auxiliary losses that need the labels (UniS-MMC, BalanceMLA) are computed by the model's
``aux_loss_fn(out, labels)``; the extra tensors they need travel in
:class:`HeadOutput.extras`.  Each head declares what it reads (models/options.py): ``reads``, the
flat ModelConfig fields, and ``Options``, its typed options kept in ``ModelConfig.extra``
(unknown names and bad values are errors; defaults and meanings in each class and in the
generated table of docs/training.md).
"""

from __future__ import annotations

from sgmft.errors import ConfigError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.blocks import Attention, TransformerSublayers
from sgmft.models.blocks import Classifier, ModalityInput, TokenNorm
from sgmft.models.options import (ATTENTION_FIELDS, CLASSIFIER_FIELDS, TOKEN_FIELDS, ArchOptions, NoOptions,
                                  PositiveInt, option, validate_options)
from sgmft.models.output import ModelOutput
from sgmft.models.registry import MODELS

__all__ = ["HeadOutput", "UniSMMC", "BalanceMLA", "MPLUGStyle", "BridgeTowerStyle", "FeatureFusion",
           "MMGate", "MMXAtt", "head_options"]


@dataclass
class HeadOutput(ModelOutput):
    """:class:`ModelOutput` plus named extra tensors (unimodal logits, gates, projections)."""

    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def head_options(cfg: ModelConfig, options: type[ArchOptions] | dict[str, Any]) -> dict[str, Any]:
    """``cfg.extra`` checked against the arch's typed ``options`` (models/options.py) and merged over
    their defaults; an unknown name or a bad value is a ConfigError. A plain ``dict`` of defaults
    (an architecture registered before typed options) is still taken: unknown keys are errors."""
    if isinstance(options, dict):
        unknown = set(cfg.extra) - set(options)
        if unknown:
            raise ConfigError(f"model config: arch {cfg.arch!r} does not know extra option(s) "
                              f"{sorted(unknown)}; known: {sorted(options)}")
        return {**options, **cfg.extra}
    return validate_options(cfg.arch, options, cfg.extra)


class _Head(nn.Module):
    """Scaled inputs with learned placeholders for absent modalities (as in every model)."""

    reads: tuple[str, ...] = ()                 # flat ModelConfig fields beyond the shared ones
    Options: type[ArchOptions] = NoOptions

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.opt = head_options(cfg, self.Options)
        scale = cfg.resolved_input_scale()
        self.text_in, self.image_in = ModalityInput(cfg.dim, scale, "text"), ModalityInput(cfg.dim, scale, "image")

    def inputs(self, text, image, text_mask, image_mask):
        return self.text_in(text, text_mask), self.image_in(image, image_mask)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.cfg.n_tokens, self.cfg.token_dim)


def _encoder(dim: int, hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))


# --------------------------------------------------------------------------- UniS-MMC
@MODELS.register("unis_mmc")
class UniSMMC(_Head):
    """UniS-MMC-style head (Zou et al. 2023, re-created on frozen features).

    Per modality an encoder (D -> ``hidden``) and a unimodal classifier; the fused
    representation [z_t ; z_i] goes to the shared 5-layer classifier.  Training adds
    ``uni_weight * (CE(text logits) + CE(image logits))`` and ``con_weight`` times a
    prediction-guided cross-modal supervised contrastive loss on L2-normalised
    projections (width ``proj_dim``, temperature ``temperature``): an anchor of one
    modality is pulled towards the other modality's projections of the same post and of
    same-class posts in the batch (the keys are detached targets), and only where that
    other modality's unimodal prediction is correct -- UniS-MMC's rule that the modality
    that is right supervises the one that is not.
    """

    reads = CLASSIFIER_FIELDS

    class Options(ArchOptions):
        hidden: PositiveInt = option(512, "encoder width per modality")
        proj_dim: PositiveInt = option(128, "width of the contrastive projections")
        temperature: float = option(0.1, "temperature of the contrastive loss", gt=0)
        uni_weight: float = option(1.0, "weight of the unimodal CE terms", ge=0)
        con_weight: float = option(0.5, "weight of the cross-modal contrastive loss", ge=0)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        h, k, o = self.opt["hidden"], cfg.num_classes, self.opt
        self.enc_t, self.enc_i = _encoder(cfg.dim, h, cfg.dropout), _encoder(cfg.dim, h, cfg.dropout)
        self.cls_t, self.cls_i = nn.Linear(h, k), nn.Linear(h, k)
        self.proj_t, self.proj_i = nn.Linear(h, o["proj_dim"]), nn.Linear(h, o["proj_dim"])
        self.classifier = Classifier(2 * h, cfg.classifier_hidden, k, cfg.dropout)

    def forward(self, text, image, text_mask=None, image_mask=None) -> HeadOutput:
        t, i = self.inputs(text, image, text_mask, image_mask)
        zt, zi = self.enc_t(t), self.enc_i(i)
        fused = torch.cat([zt, zi], dim=1)
        return HeadOutput(logits=self.classifier(fused), fused=fused, extras={
            "logits_text": self.cls_t(zt), "logits_image": self.cls_i(zi),
            "proj_text": F.normalize(self.proj_t(zt), dim=-1),
            "proj_image": F.normalize(self.proj_i(zi), dim=-1)})

    def contrastive_loss(self, out: HeadOutput, labels: torch.Tensor) -> torch.Tensor:
        e = out.extras
        same = (labels[:, None] == labels[None, :]).float()           # positives: same class (incl. self)
        right = {"text": (e["logits_text"].argmax(-1) == labels).float(),
                 "image": (e["logits_image"].argmax(-1) == labels).float()}
        total, count = out.logits.new_zeros(()), out.logits.new_zeros(())
        for anchor, key in (("text", "image"), ("image", "text")):
            sim = e[f"proj_{anchor}"] @ e[f"proj_{key}"].detach().T / self.opt["temperature"]
            logp = torch.log_softmax(sim, dim=-1)
            per_anchor = -(logp * same).sum(-1) / same.sum(-1)
            w = right[key]                                               # the key modality is right
            total = total + (w * per_anchor).sum()
            count = count + w.sum()
        return total / count.clamp_min(1.0)

    def aux_loss_fn(self, out: HeadOutput, labels: torch.Tensor) -> torch.Tensor:
        e = out.extras
        uni = F.cross_entropy(e["logits_text"], labels) + F.cross_entropy(e["logits_image"], labels)
        return self.opt["uni_weight"] * uni + self.opt["con_weight"] * self.contrastive_loss(out, labels)


# --------------------------------------------------------------------------- BalanceMLA
@MODELS.register("balance_mla")
class BalanceMLA(_Head):
    """BalanceMLA-style head: per-modality classifiers + adaptive weighted decision fusion.

    Each modality has an encoder (D -> ``hidden``) and its own classifier.  Per post the
    decision is p = w_t p_t + w_i p_i (logits = log p), with weights from each head's
    confidence: ``weighting: learned`` (default) feeds [max p, entropy] of both heads to a
    small MLP whose softmax gives (w_t, w_i); ``weighting: confidence`` uses
    softmax(-entropy / ``temperature``) with no parameters.  Training adds
    ``uni_weight * (CE_t + CE_i)`` so that each modality is learnt on its own (the
    "balanced" part: the weaker modality is not starved by the stronger one).
    """

    reads = CLASSIFIER_FIELDS

    class Options(ArchOptions):
        hidden: PositiveInt = option(512, "encoder width per modality")
        weighting: Literal["learned", "confidence"] = option(
            "learned", "per-post weights: a small MLP on both heads' confidence, or softmax(-entropy / temperature)")
        temperature: float = option(1.0, "temperature of `weighting: confidence`", gt=0)
        uni_weight: float = option(1.0, "weight of the unimodal CE terms", ge=0)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        h, k = self.opt["hidden"], cfg.num_classes
        self.enc_t, self.enc_i = _encoder(cfg.dim, h, cfg.dropout), _encoder(cfg.dim, h, cfg.dropout)
        self.cls_t = Classifier(h, cfg.classifier_hidden[1:], k, cfg.dropout)
        self.cls_i = Classifier(h, cfg.classifier_hidden[1:], k, cfg.dropout)
        self.gate = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

    @staticmethod
    def _confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = torch.softmax(logits, -1)
        ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
        return p, p.amax(-1), ent

    def forward(self, text, image, text_mask=None, image_mask=None) -> HeadOutput:
        t, i = self.inputs(text, image, text_mask, image_mask)
        zt, zi = self.enc_t(t), self.enc_i(i)
        lt, li = self.cls_t(zt), self.cls_i(zi)
        pt, mt, et = self._confidence(lt)
        pi, mi, ei = self._confidence(li)
        if self.opt["weighting"] == "learned":
            stats = torch.stack([mt, mi, et, ei], dim=-1).detach()
            w = torch.softmax(self.gate(stats), dim=-1)
        else:
            w = torch.softmax(-torch.stack([et, ei], dim=-1) / self.opt["temperature"], dim=-1)
        p = w[:, :1] * pt + w[:, 1:] * pi
        fused = torch.cat([w[:, :1] * zt, w[:, 1:] * zi], dim=1)
        return HeadOutput(logits=torch.log(p.clamp_min(1e-12)), fused=fused,
                          extras={"logits_text": lt, "logits_image": li, "weights": w})

    def aux_loss_fn(self, out: HeadOutput, labels: torch.Tensor) -> torch.Tensor:
        e = out.extras
        return self.opt["uni_weight"] * (F.cross_entropy(e["logits_text"], labels)
                                         + F.cross_entropy(e["logits_image"], labels))


# --------------------------------------------------------------------------- mPLUG
@MODELS.register("mplug")
class MPLUGStyle(_Head):
    """mPLUG-style cross-modal skip-connected network on the token view.

    ``layers`` asymmetric co-attention layers update the text tokens only (self-attention,
    cross-attention to the image tokens, FFN); the image tokens skip them and re-join in
    one connected layer: merge self-attention + FFN over [text ; image] (2n tokens, with a
    learned modality-type embedding).  M_fuse = the 2n tokens flattened (R^{2D}).
    """

    reads = TOKEN_FIELDS + CLASSIFIER_FIELDS

    class Options(ArchOptions):
        layers: PositiveInt = option(1, "asymmetric co-attention layers (text stream only)")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        n, d = cfg.n_tokens, cfg.token_dim
        self.asym = nn.ModuleList(TransformerSublayers(cfg, n) for _ in range(int(self.opt["layers"])))
        self.type_emb = nn.Parameter(torch.zeros(2, d))
        self.connected = TransformerSublayers(cfg, 2 * n, self_attn=True, cross_attn=False)
        self.classifier = Classifier(2 * cfg.dim, cfg.classifier_hidden, cfg.num_classes, cfg.dropout)

    def forward(self, text, image, text_mask=None, image_mask=None) -> ModelOutput:
        t, i = self.inputs(text, image, text_mask, image_mask)
        xt, xi = self.tokens(t), self.tokens(i)
        for layer in self.asym:
            xt = layer(xt, xi)
        z = self.connected(torch.cat([xt + self.type_emb[0], xi + self.type_emb[1]], dim=1))
        fused = z.flatten(1)
        return ModelOutput(logits=self.classifier(fused), fused=fused)


# --------------------------------------------------------------------------- BridgeTower
@MODELS.register("bridgetower")
class BridgeTowerStyle(_Head):
    """BridgeTower-style head: ``layers`` co-attention layers with a bridge before each.

    BridgeTower connects the top unimodal encoder layers to each cross-modal layer.  With
    frozen final features there is one unimodal representation, so every cross-modal
    layer l gets its own bridge: x <- LN(x + B_l(unimodal tokens)), B_l a learned
    token-wise linear map.  Each layer is symmetric co-attention (self-, cross-attention,
    FFN per stream).  M_fuse = [text ; image] streams flattened (R^{2D}).
    """

    reads = TOKEN_FIELDS + CLASSIFIER_FIELDS

    class Options(ArchOptions):
        layers: PositiveInt = option(2, "bridged co-attention layers")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        n, d, L, norm = cfg.n_tokens, cfg.token_dim, int(self.opt["layers"]), cfg.resolved_norm_mode()
        self.bridge_t = nn.ModuleList(nn.Linear(d, d) for _ in range(L))
        self.bridge_i = nn.ModuleList(nn.Linear(d, d) for _ in range(L))
        self.norm_t = nn.ModuleList(TokenNorm(n, d, norm) for _ in range(L))
        self.norm_i = nn.ModuleList(TokenNorm(n, d, norm) for _ in range(L))
        self.layer_t = nn.ModuleList(TransformerSublayers(cfg, n) for _ in range(L))
        self.layer_i = nn.ModuleList(TransformerSublayers(cfg, n) for _ in range(L))
        self.classifier = Classifier(2 * cfg.dim, cfg.classifier_hidden, cfg.num_classes, cfg.dropout)

    def forward(self, text, image, text_mask=None, image_mask=None) -> ModelOutput:
        t, i = self.inputs(text, image, text_mask, image_mask)
        ut, ui = self.tokens(t), self.tokens(i)
        xt, xi = torch.zeros_like(ut), torch.zeros_like(ui)
        for bt, bi, nt, ni, lt, li in zip(self.bridge_t, self.bridge_i, self.norm_t, self.norm_i,
                                          self.layer_t, self.layer_i):
            xt, xi = nt(xt + bt(ut)), ni(xi + bi(ui))                      # the bridges
            st, si = lt.self_part(xt), li.self_part(xi)
            ct, ci = lt.cross_part(st, si), li.cross_part(si, st)
            xt, xi = lt.ffn_part(ct), li.ffn_part(ci)
        fused = torch.cat([xt.flatten(1), xi.flatten(1)], dim=1)
        return ModelOutput(logits=self.classifier(fused), fused=fused)


# --------------------------------------------------------------------------- Meng et al.
@MODELS.register("feature_fusion")
class FeatureFusion(_Head):
    """Feature-level fusion (Meng et al. 2017): [text ; image] -> FC(``hidden``) -> ReLU -> FC.

    Their TextCNN and CaffeNet towers are replaced by the shared frozen features; what is
    kept is the fusion: plain concatenation followed by a shallow fully connected head
    (unlike the "+ CLIP" baseline, which uses SG-MFT's 5-layer classifier).
    """

    reads = ("dropout",)

    class Options(ArchOptions):
        hidden: PositiveInt = option(512, "width of the one hidden fully connected layer")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.classifier = Classifier(2 * cfg.dim, [int(self.opt["hidden"])], cfg.num_classes, cfg.dropout)

    def forward(self, text, image, text_mask=None, image_mask=None) -> ModelOutput:
        t, i = self.inputs(text, image, text_mask, image_mask)
        fused = torch.cat([t, i], dim=1)
        return ModelOutput(logits=self.classifier(fused), fused=fused)


# --------------------------------------------------------------------------- MM-Gate
@MODELS.register("mm_gate")
class MMGate(_Head):
    """MM-Gate: a gated multimodal unit of width ``hidden``, then the shared classifier.

    z = sigmoid(W_z [t; i]);  h = z * tanh(W_t t) + (1 - z) * tanh(W_i i).
    The gate z (per post and unit, in (0, 1)) is returned in ``extras["gate"]``.
    """

    reads = CLASSIFIER_FIELDS

    class Options(ArchOptions):
        hidden: PositiveInt = option(512, "width of the gated multimodal unit")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        h = int(self.opt["hidden"])
        self.w_t, self.w_i, self.w_z = nn.Linear(cfg.dim, h), nn.Linear(cfg.dim, h), nn.Linear(2 * cfg.dim, h)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = Classifier(h, cfg.classifier_hidden, cfg.num_classes, cfg.dropout)

    def forward(self, text, image, text_mask=None, image_mask=None) -> HeadOutput:
        t, i = self.inputs(text, image, text_mask, image_mask)
        z = torch.sigmoid(self.w_z(torch.cat([t, i], dim=1)))
        h = z * torch.tanh(self.w_t(t)) + (1 - z) * torch.tanh(self.w_i(i))
        return HeadOutput(logits=self.classifier(self.drop(h)), fused=h, extras={"gate": z})


# --------------------------------------------------------------------------- MM-XAtt
@MODELS.register("mm_xatt")
class MMXAtt(_Head):
    """MM-XAtt: LN(t + CA(t -> i)) + LN(i + CA(i -> t)) on the token view, flattened (R^D).

    Close to SFM (eq 17) applied directly to the features, without SIM; it differs from
    "+ CLIP + SFM" by the residual connections and LayerNorms around each cross-attention.
    """

    reads = ATTENTION_FIELDS + CLASSIFIER_FIELDS

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        n, d, norm = cfg.n_tokens, cfg.token_dim, cfg.resolved_norm_mode()
        self.ca_t, self.ca_i = Attention(cfg), Attention(cfg)
        self.norm_t, self.norm_i = TokenNorm(n, d, norm), TokenNorm(n, d, norm)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = Classifier(cfg.dim, cfg.classifier_hidden, cfg.num_classes, cfg.dropout)

    def forward(self, text, image, text_mask=None, image_mask=None) -> ModelOutput:
        t, i = self.inputs(text, image, text_mask, image_mask)
        xt, xi = self.tokens(t), self.tokens(i)
        a = self.norm_t(xt + self.drop(self.ca_t(xt, xi)))
        b = self.norm_i(xi + self.drop(self.ca_i(xi, xt)))
        fused = (a + b).flatten(1)
        return ModelOutput(logits=self.classifier(fused), fused=fused)
