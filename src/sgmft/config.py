"""Configuration dataclasses and named presets.

A *preset* is a YAML file in ``sgmft/configs/models/`` with a ``model`` section (a
:class:`ModelConfig`) and an optional ``train`` section (a :class:`TrainConfig`).
Users may also pass a path to their own YAML file wherever a preset name is accepted.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    """Every option of SG-MFT that SPEC.md names, plus the baselines' knobs.

    ``dim`` and ``num_classes`` are normally filled in from the feature store.
    """

    arch: str = "sgmft"
    dim: int = 1024                 # D, the backbone's feature width
    num_classes: int = 8
    # -- token view (SPEC "The token view"): the D-vector is n tokens of width d = D / n
    n_tokens: int = 16              # n
    attn_dim: int = 128             # d_model of every multi-head attention (divisible by heads)
    heads: int = 8                  # h
    input_scale: float | str = "sqrt_dim"  # multiply features by this; "sqrt_dim" = sqrt(D)
    # -- SIM (section 3.2.1)
    use_sim: bool = True
    pm_norm: str = "softmax"        # eq 3: "softmax" over the n positions (paper) or "sigmoid"
    pe_scale: str = "none"          # eq 2/4 logits: "none" (paper) or "sqrt_d" (divide by sqrt(d))
    ffn_mode: str = "vector"        # eq 15: "vector" (whole D-vector, W1 in R^{D x d_h}) or "token"
    ffn_hidden: int = 1024          # d_h
    ffn_side: str = "text"          # which modality gets the similarity-aware FFN (Table 4)
    norm_mode: str = "auto"         # LayerNorm over "token" width d, the whole "vector", or "auto"
    # -- fusion (section 3.2.2); "sfm" is eq 17, others come from the fusion registry
    fusion: str = "sfm"
    sfm_residual: bool = False      # eq 17 literal (False) or each cross-attention "layer" with its
                                    # query's residual: CA(t,i) + F^S_text + CA(i,t) + F^S_image
    sfm_merge: str = "sum"          # eq 17's (+): element-wise "sum" (paper) or "concat" (R^{2D})
    # -- classifier (eq 18): 5 linear layers = 4 hidden widths + the output layer
    classifier_hidden: list[int] = field(default_factory=lambda: [512, 256, 128, 64])
    dropout: float = 0.1
    # -- speed
    attn_impl: str = "auto"         # "auto" (exact rank-one kernel when d == 1, else sdpa), "sdpa", "naive"
    # -- extra options for registered variants (issue 4 heads put theirs here)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def token_dim(self) -> int:
        return self.dim // self.n_tokens

    def resolved_norm_mode(self) -> str:
        if self.norm_mode == "auto":
            return "vector" if self.token_dim < 16 else "token"
        return self.norm_mode

    def resolved_input_scale(self) -> float:
        if self.input_scale == "sqrt_dim":
            return float(self.dim) ** 0.5
        return float(self.input_scale)

    def validate(self) -> "ModelConfig":
        def bad(msg: str) -> None:
            raise ValueError(f"model config: {msg}")

        if self.dim <= 0 or self.n_tokens <= 0:
            bad("dim and n_tokens must be positive")
        if self.dim % self.n_tokens:
            bad(f"n_tokens={self.n_tokens} must divide dim={self.dim} (token width d = D / n)")
        if self.attn_dim % self.heads:
            bad(f"attn_dim={self.attn_dim} must be divisible by heads={self.heads}")
        for name, allowed in [
            ("pm_norm", {"softmax", "sigmoid"}),
            ("pe_scale", {"none", "sqrt_d"}),
            ("ffn_mode", {"vector", "token"}),
            ("ffn_side", {"text", "image"}),
            ("norm_mode", {"auto", "token", "vector"}),
            ("attn_impl", {"auto", "sdpa", "naive", "rank1"}),
            ("sfm_merge", {"sum", "concat"}),
        ]:
            if getattr(self, name) not in allowed:
                bad(f"{name}={getattr(self, name)!r} not in {sorted(allowed)}")
        if self.attn_impl == "rank1" and self.token_dim != 1:
            bad("attn_impl='rank1' needs token width d = 1 (n_tokens == dim)")
        if len(self.classifier_hidden) < 1:
            bad("classifier_hidden needs at least one width")
        return self


@dataclass
class TrainConfig:
    """Optimisation and run settings; defaults are the paper's (section 4.2)."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    batch_size: int = 20
    epochs: int = 30
    seed: int = 0
    val_fraction: float = 0.1       # of the training split, for model selection
    test_fraction: float = 0.2      # used when the store carries no split
    split: str = "stratified"       # "stratified" (paper) or "user" (user-disjoint)
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    progress: bool = True
    deterministic: bool = True
    max_steps: int = -1             # for smoke tests; -1 = run all epochs
    limit_train_batches: float | int = 1.0


@dataclass
class Preset:
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "model": asdict(self.model), "train": asdict(self.train)}


# fields that older configs (run.json, checkpoints' config.json, YAML) may still hold: ignored
RETIRED_FIELDS = {"ModelConfig": {"rank1_chunk"}}


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS.get(cls.__name__, ())}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {sorted(unknown)}; "
                         f"known: {sorted(known)}")
    data = dict(data)
    if cls is TrainConfig and "betas" in data:
        data["betas"] = tuple(data["betas"])
    return cls(**data)


def model_config_from_dict(data: dict[str, Any], where: str = "model config") -> ModelConfig:
    return _build(ModelConfig, data, where)


def train_config_from_dict(data: dict[str, Any], where: str = "train config") -> TrainConfig:
    return _build(TrainConfig, data, where)


def _preset_dir():
    return resources.files("sgmft") / "configs" / "models"


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a packaged preset by name, or a user YAML file by path."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} and p.exists():
        text, name = p.read_text(encoding="utf-8"), p.stem
    else:
        res = _preset_dir() / f"{name_or_path}.yaml"
        if not res.is_file():
            raise KeyError(f"unknown preset {str(name_or_path)!r}; known: {', '.join(list_presets())} "
                           "(or give a path to a .yaml file)")
        text, name = res.read_text(encoding="utf-8"), str(name_or_path)
    data = yaml.safe_load(text) or {}
    unknown = set(data) - {"description", "model", "train"}
    if unknown:
        raise ValueError(f"preset {name}: unknown section(s) {sorted(unknown)}")
    return Preset(
        name=name,
        description=str(data.get("description", "")).strip(),
        model=model_config_from_dict(data.get("model") or {}, f"preset {name}: model"),
        train=train_config_from_dict(data.get("train") or {}, f"preset {name}: train"),
    )


def apply_overrides(obj, overrides: list[str] | None):
    """Apply ``key=value`` strings (value parsed as YAML) to a dataclass, returning a copy."""
    if not overrides:
        return obj
    changes: dict[str, Any] = {}
    known = {f.name for f in fields(obj)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in known:
            raise ValueError(f"override {item!r}: unknown field {key!r} of {type(obj).__name__}")
        changes[key] = _coerce(getattr(obj, key), yaml.safe_load(value), item)
    if "betas" in changes:
        changes["betas"] = tuple(changes["betas"])
    return dataclasses.replace(obj, **changes)


def _coerce(current, new, item: str):
    """Match the field's type: YAML reads ``1e-3`` as a string and ``3`` as an int."""
    try:
        if isinstance(current, bool) or current is None:
            return new
        if isinstance(current, float) and isinstance(new, (int, str)):
            return float(new)
        if isinstance(current, int) and isinstance(new, str):
            return int(new)
    except ValueError:
        raise ValueError(f"override {item!r}: expected a {type(current).__name__}") from None
    return new


def to_json(obj) -> str:
    return json.dumps(asdict(obj), indent=2, sort_keys=True)
