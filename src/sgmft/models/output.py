"""What every registered model returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor                 # (B, num_classes), pre-softmax (eq 18 applies softmax)
    fused: torch.Tensor                  # (B, F): the representation fed to the classifier (M_fuse)
    aux_loss: torch.Tensor | None = None  # extra training loss (e.g. unimodal supervision), added to CE
