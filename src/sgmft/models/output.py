"""What every registered model returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor                 # (B, num_classes), pre-softmax (eq 18 applies softmax)
    fused: torch.Tensor                  # (B, F): the representation fed to the classifier (M_fuse)
    aux_loss: torch.Tensor | None = None  # extra training loss (e.g. unimodal supervision), added to CE


def calibrated_probs(logits: torch.Tensor, temperature=1.0, uniform_weight=0.0) -> torch.Tensor:
    """The probabilities a calibration record gives ``logits`` (..., K): ``(1 - eps)
    softmax(logits / T) + eps / K`` with eps = ``uniform_weight`` (fitted by
    :mod:`sgmft.train.calibrate`; applied by predict, serve and export). Both maps increase
    with each logit, so the argmax is that of ``logits``."""
    p = torch.softmax(logits / temperature, -1)
    if uniform_weight:
        p = (1.0 - uniform_weight) * p + uniform_weight / logits.shape[-1]
    return p
