"""``zeroshot``: CLIP zero-shot classification as an ordinary head (``sgmft zero-shot``, docs/backbones.md).

Each place ``k`` has a class embedding ``c_k`` (``class_emb``, K x D): the L2-normalised mean of
the normalised text-tower embeddings of its prompts (templates x names; CLIP's prompt
ensembling). A post's logits are CLIP's scaled cosines, combined over the modalities present::

    s_t = t . c_k,   s_v = v . c_k            (t, v the post's L2-normalised text / image features)
    logits_k = scale * (w_t m_t s_t + w_v m_v s_v) / (w_t m_t + w_v m_v)

``scale`` is the ``logit_scale`` option, ``w_t = text_weight``, ``w_v = 1 - text_weight``, ``m``
the masks (a missing modality drops out; a post with neither gets uniform probabilities).
``sgmft zero-shot`` writes ``scale = 1`` and puts CLIP's temperature ``exp(logit_scale)`` in the
checkpoint's calibration record (``T = 1 / exp(logit_scale)``), so the probabilities are
``softmax(exp(logit_scale) * score)``: with one modality exactly CLIP's zero-shot classifier,
while the logits stay of order 1. Trained with the ``zeroshot`` preset (default ``scale`` 10)
it is a cosine classifier with learned class embeddings. ``class_emb`` is a parameter,
saved in ``model.safetensors`` like any head's weights, so the model predicts, serves,
evaluates and exports as every registered model does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.comparisons import head_options
from sgmft.models.options import ArchOptions, option
from sgmft.models.output import ModelOutput
from sgmft.models.registry import MODELS

__all__ = ["ZeroShotHead"]


@MODELS.register("zeroshot")
class ZeroShotHead(nn.Module):
    reads: tuple[str, ...] = ()

    class Options(ArchOptions):
        text_weight: float = option(0.5, "w_t, the text's weight (the image's is 1 - w_t)", ge=0.0, le=1.0)
        logit_scale: float = option(10.0, "scale of the cosines (`sgmft zero-shot` writes 1 and calibrates)")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.opt = head_options(cfg, self.Options)
        w = float(self.opt["text_weight"])
        self.text_weight, self.scale = w, float(self.opt["logit_scale"])
        # random start for training with the preset; `sgmft zero-shot` writes the prompt embeddings
        self.class_emb = nn.Parameter(0.02 * torch.randn(cfg.num_classes, cfg.dim))

    def forward(self, text, image, text_mask=None, image_mask=None) -> ModelOutput:
        B = text.shape[0]
        tm = torch.ones(B, dtype=text.dtype, device=text.device) if text_mask is None else text_mask.to(text.dtype)
        im = torch.ones(B, dtype=text.dtype, device=text.device) if image_mask is None else image_mask.to(text.dtype)
        c = F.normalize(self.class_emb, dim=-1)
        t, v = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
        wt, wv = self.text_weight * tm, (1.0 - self.text_weight) * im
        total = (wt + wv).clamp_min(1e-12)
        logits = self.scale * ((wt / total)[:, None] * (t @ c.T) + (wv / total)[:, None] * (v @ c.T))
        return ModelOutput(logits=logits, fused=torch.cat([t, v], dim=-1))
