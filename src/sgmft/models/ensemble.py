"""An ensemble of trained runs: the pool of their calibrated probabilities (eqs E1, E1').

    p(y | x) = sum_i w_i p_i(y | x),    p_i = (1 - eps_i) softmax(z_i / T_i) + eps_i / K   (eq E1, pool: mean)
    log p(y | x) = sum_i w_i log p_i(y | x) - log Z(x)                                    (eq E1', pool: log_mean)

with z_i member i's logits, (T_i, eps_i) its own post-hoc calibration (train/calibrate.py), so a
member with sharp raw probabilities (LDA's) does not drown the other, weights w_i summing to
one (1 / M unless given: a fold committee gives each candidate of ``a+b`` half the weight, however
many fold models it has), and Z(x) the sum over y that makes eq E1' a distribution (the logarithmic
opinion pool). The ensemble's logits are log p, and its own calibration is fitted on top like any model's.
The mean of calibrated members is less confident than it is right: where they disagree, each
puts its mass on another place. The logarithmic pool keeps a place both members find likely as
sharp as they do, and on the 29 validation-path runs of docs/design.md item 15 its calibrated
negative log-likelihood on the validation split was lower in 29 of 29 (``trust+trust_mda``), so
the candidates ``auto`` assembles use it; a fold committee keeps the mean (bagging). A checkpoint
written before the option reads ``mean``, as it was made.
It is not trained: a selecting preset assembles it from candidates it has trained (``auto``'s
candidates ``trust_lda+lda`` and ``trust+trust_mda``, train/select.py; docs/design.md, "The default
model", item 10), or, after cross-validation on a small store, from the chosen candidate's fold
models (the fold committee, with weights; item 11). On
small stores the two disagree where each is unsure, and the mean of a TrustMix that starts from
LDA and the joint LDA itself was 0-3 points more accurate than the better of them on family C at
2,500 posts. Each member keeps its own input normalisation (buffers), so the ensemble reads the raw
features like any model, and predict, serve and export need nothing new.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from sgmft.config import ConfigError, ModelConfig
from sgmft.models.comparisons import HeadOutput, head_options
from sgmft.models.options import ArchOptions, option
from sgmft.models.output import calibrated_probs
from sgmft.models.registry import MODELS

__all__ = ["Ensemble", "ensemble_config", "pooled_logits"]


def pooled_logits(probs: list[torch.Tensor], weights: list[float] | None = None,
                  pool: str = "mean") -> torch.Tensor:
    """The ensemble's logits, log p(y | x), from the members' calibrated probabilities ``probs`` and
    their (weighted) pool: eq E1 (``mean``) or eq E1' (``log_mean``, normalised over the places)."""
    stacked = torch.stack(probs)
    w = None if not weights else \
        torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if pool == "log_mean":                                                                         # eq E1'
        logs = stacked.clamp_min(1e-30).log()
        return torch.log_softmax(logs.mean(0) if w is None else (w * logs).sum(0), dim=-1)
    return (stacked.mean(0) if w is None else (w * stacked).sum(0)).clamp_min(1e-30).log()        # eq E1


@MODELS.register("ensemble")
class Ensemble(nn.Module):
    """The pool of the calibrated probabilities of trained members (eqs E1, E1' above)."""

    reads: tuple[str, ...] = ()
    assembled = True        # built from trained runs by a selecting preset; no preset, no gradient steps

    class Options(ArchOptions):
        members: list[dict[str, Any]] = option(
            [], "the members' model configs, as each checkpoint's config.json `model` (written by the selecting "
            "preset that assembles the ensemble)")
        names: list[str] = option([], "the members' preset names, in order")
        calibrations: list[dict[str, float]] = option(
            [], "each member's post-hoc calibration: `temperature` and `uniform_weight` (eqs E1, E1')")
        weights: list[float] = option(
            [], "each member's weight w_i in eqs E1, E1', summing to one; empty: equal weights")
        pool: Literal["mean", "log_mean"] = option(
            "mean", "how the members' calibrated probabilities are pooled: `mean` (eq E1) or `log_mean`, the "
            "weighted mean of their logarithms, normalised (eq E1', the logarithmic opinion pool)")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from sgmft.config import model_config_from_dict
        from sgmft.models.registry import build_model

        o = head_options(cfg, self.Options)
        members, cals = o["members"], o["calibrations"]
        if len(members) < 2 or len(cals) != len(members) or len(o["names"]) != len(members):
            raise ConfigError("model config: arch 'ensemble' needs two or more members, each with a name and a "
                              "calibration; it is assembled from trained runs by a selecting preset (candidates "
                              "such as `trust_lda+lda` in auto.yaml), not trained on its own")
        built = []
        for i, m in enumerate(members):
            mc = model_config_from_dict(m, f"model config: ensemble member {i}")
            if (mc.dim, mc.num_classes) != (cfg.dim, cfg.num_classes):
                raise ConfigError(f"model config: ensemble member {i} has dim {mc.dim} and {mc.num_classes} "
                                  f"classes; the ensemble has {cfg.dim} and {cfg.num_classes}")
            built.append(build_model(mc))
        w = [float(x) for x in o["weights"]]
        if w and (len(w) != len(members) or min(w) < 0 or abs(sum(w) - 1.0) > 1e-6):
            raise ConfigError(f"model config: ensemble weights {w} must be one non-negative weight per member "
                              f"({len(members)}) summing to one")
        self.weights = w
        self.pool = o["pool"]
        self.members = nn.ModuleList(built)
        self.cal = [(float(c.get("temperature", 1.0)), float(c.get("uniform_weight", 0.0))) for c in cals]

    def forward(self, text, image, text_mask=None, image_mask=None) -> HeadOutput:
        probs, fused = [], []
        for m, (t, eps) in zip(self.members, self.cal):
            out = m(text, image, text_mask, image_mask)
            probs.append(calibrated_probs(out.logits, t, eps))
            fused.append(out.fused)
        return HeadOutput(logits=pooled_logits(probs, self.weights, self.pool), fused=torch.cat(fused, -1))


def ensemble_config(dim: int, num_classes: int, names: list[str], member_cfgs: list[ModelConfig],
                    calibrations: list[dict], weights: list[float] | None = None,
                    pool: str = "mean") -> ModelConfig:
    """The ensemble's config from its members' names, configs, calibration records, weights and pool."""
    from sgmft.models.registry import model_view

    return ModelConfig(arch="ensemble", dim=dim, num_classes=num_classes,
                       extra={"members": [model_view(c) for c in member_cfgs], "names": list(names),
                              "calibrations": [{"temperature": float(c.get("temperature", 1.0)),
                                                "uniform_weight": float(c.get("uniform_weight", 0.0))}
                                               for c in calibrations],
                              **({"weights": [float(w) for w in weights]} if weights else {}),
                              "pool": pool})
