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
    return write_model_folder(out_dir, model, model_cfg, label_names, feature_contract(feature_meta),
                              asdict(train_cfg) if train_cfg else None, preset)


def write_model_folder(out_dir, model: torch.nn.Module, model_cfg: ModelConfig, label_names, contract: dict,
                       train: dict | None = None, preset: str = "", extra_files: dict[str, str] | None = None) -> Path:
    """Write the checkpoint folder atomically from its parts (``contract``: features.json);
    ``extra_files``: more text files (name -> content), e.g. the model card README.md."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        _write_json(tmp / "config.json", {"format": "sgmft-checkpoint", "version": 1, "preset": preset,
                                          "model": asdict(model_cfg), "train": train})
        _write_json(tmp / "labels.json", list(label_names))
        _write_json(tmp / "features.json", contract)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def check_label_names(labels, num_classes: int, where: Path) -> list[str]:
    """``labels.json`` must name each of the model's classes once, in index order."""
    if not isinstance(labels, list) or not all(isinstance(n, str) and n for n in labels):
        raise CheckpointError(f"{where}: must be a JSON list of non-empty label names, got {str(labels)[:80]}")
    if len(labels) != num_classes:
        raise CheckpointError(f"{where}: {len(labels)} label name(s) for a model with {num_classes} classes; "
                              "the list must name every class once, in index order")
    dup = sorted({n for n in labels if labels.count(n) > 1})
    if dup:
        raise CheckpointError(f"{where}: label name(s) {dup} repeated")
    return list(labels)


def load_checkpoint(path, map_location: str = "cpu"):
    """Return ``(model in eval mode, info dict)``; info has model_cfg, label_names, features.

    Every file is checked and a problem is a :class:`CheckpointError` naming it: corrupt
    JSON, a truncated or corrupt ``model.safetensors``, weights that do not fit the config or
    are not finite, ``labels.json`` with another number of names than the model has classes,
    ``features.json`` with another width than the model's.
    """
    p, _ = locate(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such model folder (give a run folder or its model/ folder)")
    missing = [f for f in FILES if not (p / f).exists()]
    if missing:
        raise CheckpointError(f"{p}: not an sgmft checkpoint (missing {', '.join(missing)})")
    for f in FILES:                          # a FIFO or device would block; a huge JSON exhaust memory
        q = p / f
        if not q.is_file():
            raise CheckpointError(f"{q}: not a regular file")
        if f.endswith(".json") and q.stat().st_size > 64 * 2**20:
            raise CheckpointError(f"{q}: {q.stat().st_size} bytes, too large for a checkpoint's JSON file")
    cfg_data = _read_json(p / "config.json")
    labels = _read_json(p / "labels.json")
    features = _read_json(p / "features.json")
    if not isinstance(cfg_data, dict) or cfg_data.get("format") != "sgmft-checkpoint":
        got = cfg_data.get("format") if isinstance(cfg_data, dict) else type(cfg_data).__name__
        raise CheckpointError(f"{p / 'config.json'}: format is {got!r}, expected 'sgmft-checkpoint'")
    if not isinstance(cfg_data.get("model"), dict):
        raise CheckpointError(f"{p / 'config.json'}: has no 'model' section")
    model_cfg = model_config_from_dict(cfg_data["model"], f"{p / 'config.json'}: model")
    labels = check_label_names(labels, model_cfg.num_classes, p / "labels.json")
    if not isinstance(features, dict):
        raise CheckpointError(f"{p / 'features.json'}: must be a JSON object")
    if features.get("dim") is not None and features.get("dim") != model_cfg.dim:
        raise CheckpointError(f"{p / 'features.json'}: dim {features.get('dim')!r} but the model (config.json) "
                              f"takes D={model_cfg.dim}")
    model = build_model(model_cfg)
    weights = p / "model.safetensors"
    try:
        state = load_file(str(weights), device=map_location)
    except Exception as e:          # SafetensorError (truncated, bad header), OSError, ...
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{weights}: unreadable (truncated or corrupt safetensors file: {first})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{weights}: weights do not match the config ({first})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad:
        raise CheckpointError(f"{weights}: weight {bad!r} holds NaN or Inf values; the model is unusable")
    model.eval()
    return model, {"model_cfg": model_cfg, "label_names": labels, "features": features,
                   "preset": cfg_data.get("preset", ""), "train": cfg_data.get("train"), "path": p}
