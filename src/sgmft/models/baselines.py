"""Baselines needing no extra machinery: one modality, or concatenation ("+ CLIP", Table 2).

All use the same 5-layer classifier as SG-MFT, so only the fusion differs.
"""

from __future__ import annotations

import torch
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.blocks import Classifier, ModalityInput
from sgmft.models.options import CLASSIFIER_FIELDS, NoOptions
from sgmft.models.output import ModelOutput
from sgmft.models.registry import MODELS


class _FeatureBaseline(nn.Module):
    uses = ("text", "image")
    reads = CLASSIFIER_FIELDS       # flat ModelConfig fields beyond the shared ones (models/options.py)
    Options = NoOptions

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        scale = cfg.resolved_input_scale()
        self.inputs = nn.ModuleDict({m: ModalityInput(cfg.dim, scale, m) for m in self.uses})
        self.classifier = Classifier(cfg.dim * len(self.uses), cfg.classifier_hidden,
                                     cfg.num_classes, cfg.dropout)

    def forward(self, text, image, text_mask=None, image_mask=None) -> ModelOutput:
        given = {"text": (text, text_mask), "image": (image, image_mask)}
        fused = torch.cat([self.inputs[m](*given[m]) for m in self.uses], dim=1)
        return ModelOutput(logits=self.classifier(fused), fused=fused)


@MODELS.register("text_only")
class TextOnly(_FeatureBaseline):
    uses = ("text",)


@MODELS.register("image_only")
class ImageOnly(_FeatureBaseline):
    uses = ("image",)


@MODELS.register("concat")
class Concat(_FeatureBaseline):
    """Feature concatenation + classifier: the "+ CLIP" row of Table 2."""

    uses = ("text", "image")
