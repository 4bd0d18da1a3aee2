"""Exported model checkpoints: a directory that loads safely and predicts identically.

Layout (``<run>/model/``):
  config.json       model config, train config, preset name
  labels.json       label names in index order
  features.json     what the features must look like (backbone, D, normalisation)
  model.safetensors the weights (safetensors: no pickle, safe for untrusted files)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sgmft.config import ModelConfig, TrainConfig, model_config_from_dict
from sgmft.models import build_model

FILES = ("config.json", "labels.json", "features.json", "model.safetensors")


class CheckpointError(ValueError):
    pass


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True), encoding="utf-8")


def save_checkpoint(out_dir, model: torch.nn.Module, model_cfg: ModelConfig, label_names,
                    feature_meta: dict, train_cfg: TrainConfig | None = None, preset: str = "") -> Path:
    """Write the checkpoint directory atomically (temp dir, then rename)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    _write_json(tmp / "config.json", {"format": "sgmft-checkpoint", "version": 1, "preset": preset,
                                      "model": asdict(model_cfg),
                                      "train": asdict(train_cfg) if train_cfg else None})
    _write_json(tmp / "labels.json", list(label_names))
    _write_json(tmp / "features.json", {k: feature_meta.get(k) for k in ("backbone", "dim", "normalization")})
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, out)
    return out


def load_checkpoint(path, map_location: str = "cpu"):
    """Return ``(model in eval mode, info dict)``; info has model_cfg, label_names, features."""
    p = Path(path)
    if (p / "model").is_dir() and not (p / "model.safetensors").exists():
        p = p / "model"
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
