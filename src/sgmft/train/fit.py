"""``train()``: a feature store + a preset in, a trained, exported checkpoint out.

Lightning runs the loop, so devices, strategy (ddp, ...) and num_nodes are configuration.
The run folder's layout is :class:`sgmft.runs.RunDir`; ``model/`` holds the exported
checkpoint (:mod:`sgmft.checkpoint`) of the best epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from sgmft.config import DEFAULT_PRESET, ModelConfig, Preset, TrainConfig, load_preset, progress_enabled
from sgmft.data.splits import resolve_split
from sgmft.features import FeatureStore
from sgmft.checkpoint import save_checkpoint
from sgmft.runs import RunDir, cleanup_on_failure, ids_digest
from sgmft.train.data import make_loader
from sgmft.train.module import LitClassifier


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    best_val_acc: float | None
    seconds: float


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*isinstance.*treespec.*")


def train(store, out_dir, preset: str | Preset | None = None, model_cfg: ModelConfig | None = None,
          train_cfg: TrainConfig | None = None) -> TrainResult:
    """Train ``preset`` on a feature store (see :func:`_train`). A run that fails before its
    first resumable checkpoint leaves nothing behind (:func:`sgmft.runs.cleanup_on_failure`)."""
    with cleanup_on_failure(out_dir):
        return _train(store, out_dir, preset, model_cfg, train_cfg)


def _train(store, out_dir, preset: str | Preset = "sgmft", model_cfg: ModelConfig | None = None,
           train_cfg: TrainConfig | None = None) -> TrainResult:
    """Train ``preset`` (or explicit configs) on a feature store; return where the model went.

    ``preset`` None means :data:`sgmft.config.DEFAULT_PRESET`.

    ``model_cfg.dim`` / ``num_classes`` are taken from the store.  The split is the store's
    own if it has one, else a seeded stratified (or user-disjoint) 80/20 split, with a
    validation part carved from train for model selection (best ``val_acc``).
    """
    _quiet_lightning()
    t0 = time.time()
    p = load_preset(preset or DEFAULT_PRESET) if isinstance(preset, (str, Path, type(None))) else preset
    model_cfg = model_cfg or p.model
    train_cfg = train_cfg or p.train
    fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    if fs.labels is None:
        raise ValueError(f"{fs.path}: has no labels.npy; training needs labelled posts")
    model_cfg = dataclasses.replace(model_cfg, dim=fs.dim, num_classes=len(fs.label_names)).validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = RunDir(out)

    split = resolve_split(fs.split, np.asarray(fs.labels), fs.users, mode=train_cfg.split,
                          test_fraction=train_cfg.test_fraction, val_fraction=train_cfg.val_fraction,
                          seed=train_cfg.seed)
    tr, va = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    if len(tr) == 0:
        raise ValueError(f"{fs.path}: the split has no training posts")

    L.seed_everything(train_cfg.seed, workers=True, verbose=False)
    lit = LitClassifier(model_cfg, train_cfg)
    train_loader = make_loader(fs, tr, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed,
                               num_workers=train_cfg.num_workers)
    val_loader = (make_loader(fs, va, max(train_cfg.batch_size, 256), shuffle=False,
                              num_workers=train_cfg.num_workers) if len(va) else None)
    ckpt_cb = ModelCheckpoint(dirpath=run_dir.lightning_checkpoints, filename="best",
                              monitor="val_acc" if val_loader else None, mode="max",
                              save_last=True, save_top_k=1)
    callbacks = [ckpt_cb]
    progress = progress_enabled(train_cfg.progress)     # None: only on a terminal
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, len(train_loader) // 50)))
    strategy = train_cfg.strategy
    if strategy == "ddp":
        # Placeholders for absent modalities get no gradient on stores without masks.
        strategy = "ddp_find_unused_parameters_true"
    trainer = L.Trainer(
        max_epochs=train_cfg.epochs, max_steps=train_cfg.max_steps,
        accelerator=train_cfg.accelerator, devices=train_cfg.devices, strategy=strategy,
        num_nodes=train_cfg.num_nodes, precision=train_cfg.precision,
        deterministic=train_cfg.deterministic, callbacks=callbacks,
        logger=CSVLogger(run_dir.root, name=run_dir.lightning.name, version=""),
        enable_progress_bar=progress, enable_model_summary=False,
        limit_train_batches=train_cfg.limit_train_batches, log_every_n_steps=max(1, min(50, len(train_loader))),
        num_sanity_val_steps=0,
    )
    resume = run_dir.last_checkpoint
    # Our own run's Lightning checkpoint (trusted; written by this function) resumes an interrupted run.
    trainer.fit(lit, train_loader, val_loader, ckpt_path=str(resume) if resume.exists() else None,
                weights_only=False)

    best = ckpt_cb.best_model_path if val_loader else ""
    best_score = float(ckpt_cb.best_model_score) if ckpt_cb.best_model_score is not None else None
    if trainer.is_global_zero:
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            lit.load_state_dict(state)
        save_checkpoint(run_dir.model, lit.model.cpu(), model_cfg, fs.label_names, fs.meta,
                               train_cfg, preset=p.name)
        run_dir.write_split(split)
        run = {"store": str(fs.path), "store_ids": ids_digest(fs.ids), "preset": p.name,
               "model": asdict(model_cfg), "train": asdict(train_cfg),
               "num_train": int(len(tr)), "num_val": int(len(va)),
               "num_test": int((split == "test").sum()),
               "best_val_acc": best_score, "epochs_run": int(trainer.current_epoch),
               "seconds": round(time.time() - t0, 2)}
        run_dir.write_run_json(run)
    return TrainResult(out, run_dir.model, best_score, time.time() - t0)
