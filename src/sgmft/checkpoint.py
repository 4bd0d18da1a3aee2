"""Exported model checkpoints: a folder that loads safely and predicts identically.

Layout (``<run>/model/``, see :mod:`sgmft.runs` for the rest of the run folder):
  config.json       model config, train config, preset name
  labels.json       label names in index order
  features.json     the feature contract: what the model's inputs must be (below)
  model.safetensors the weights (safetensors: no pickle, safe for untrusted files)

``features.json`` holds ``backbone`` (the spec), ``dim`` and ``normalization`` and, under
``extraction``, how raw posts were turned into the training features, copied from the
training store's metadata when training: ``backbone_fingerprint`` (weights, tokenizer,
preprocessing, precision), ``backbone_precision``, ``clean_config`` + ``clean_fingerprint``
(text cleaning) and ``image_choice``. So a model folder alone is enough to predict raw posts
(like open_clip's ``preprocess_cfg`` beside its ``model_cfg``). ``extraction`` is ``null``
for features that ``sgmft extract`` did not make (SimFeat, the user's own); checkpoints
written before the contract existed have no ``extraction`` key at all.

Reading needs neither Lightning nor the training code.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sgmft.atomic import atomic_dir
from sgmft.config import ModelConfig, TrainConfig, model_config_from_dict
from sgmft.models import build_model
from sgmft.runs import locate

FILES = ("config.json", "labels.json", "features.json", "model.safetensors")
# the store-metadata keys (meta["extra"], written by sgmft extract) that make up the contract
EXTRACTION_KEYS = ("backbone_fingerprint", "backbone_precision", "clean_config", "clean_fingerprint",
                   "image_choice")


class CheckpointError(ValueError):
    pass


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True), encoding="utf-8")


def feature_contract(store_meta: dict) -> dict:
    """``features.json`` for a model trained on a store with metadata ``store_meta``."""
    extra = store_meta.get("extra") or {}
    contract = {k: store_meta.get(k) for k in ("backbone", "dim", "normalization")}
    contract["extraction"] = ({k: extra.get(k) for k in EXTRACTION_KEYS if k in extra}
                              if "clean_config" in extra else None)
    return contract


def save_checkpoint(out_dir, model: torch.nn.Module, model_cfg: ModelConfig, label_names,
                    feature_meta: dict, train_cfg: TrainConfig | None = None, preset: str = "") -> Path:
    """Write the checkpoint folder atomically. ``feature_meta``: the training store's metadata."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        _write_json(tmp / "config.json", {"format": "sgmft-checkpoint", "version": 1, "preset": preset,
                                          "model": asdict(model_cfg),
                                          "train": asdict(train_cfg) if train_cfg else None})
        _write_json(tmp / "labels.json", list(label_names))
        _write_json(tmp / "features.json", feature_contract(feature_meta))
    return out


def load_checkpoint(path, map_location: str = "cpu"):
    """Return ``(model in eval mode, info dict)``; info has model_cfg, label_names, features."""
    p, _ = locate(path)
    missing = [f for f in FILES if not (p / f).exists()]
    if missing:
        raise CheckpointError(f"{p}: not an sgmft checkpoint (missing {', '.join(missing)})")
    try:
        cfg_data = json.loads((p / "config.json").read_text(encoding="utf-8"))
        labels = json.loads((p / "labels.json").read_text(encoding="utf-8"))
        features = json.loads((p / "features.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: corrupt JSON ({e})") from None
    if cfg_data.get("format") != "sgmft-checkpoint":
        raise CheckpointError(f"{p / 'config.json'}: format is {cfg_data.get('format')!r}, expected 'sgmft-checkpoint'")
    model_cfg = model_config_from_dict(cfg_data["model"], f"{p / 'config.json'}: model")
    model = build_model(model_cfg)
    state = load_file(str(p / "model.safetensors"), device=map_location)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{p / 'model.safetensors'}: weights do not match the config ({e})") from None
    model.eval()
    return model, {"model_cfg": model_cfg, "label_names": list(labels), "features": features,
                   "preset": cfg_data.get("preset", ""), "train": cfg_data.get("train"), "path": p}
