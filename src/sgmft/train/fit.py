"""``train()``: a feature store + a preset in, a trained, exported checkpoint out.

Lightning runs the loop, so devices, strategy (ddp, ...) and num_nodes are configuration.
The run folder's layout is :class:`sgmft.runs.RunDir`; ``model/`` holds the exported
checkpoint (:mod:`sgmft.checkpoint`) of the best epoch.

A run folder is safe to re-use (docs/training.md, "Resuming"): one writer at a time
(:class:`sgmft.runs.RunLock`); ``run.json`` records a fingerprint of the configs, the
store's contents and the seed, and a run is only resumed under the same fingerprint; a
complete run is left untouched; the resume state is read without unpickling
(:mod:`sgmft.train.resume`) and restores the weights, the optimiser, the loop counters,
the data order and the RNG, so a killed and resumed run ends bit-identical to an
uninterrupted one. A NaN or infinite loss stops the run (nothing exported), and training
data that cannot teach anything is refused before the first step.
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import contextlib
import dataclasses
import json
import logging
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from sgmft.checkpoint import FILES as MODEL_FILES
from sgmft.checkpoint import save_checkpoint
from sgmft.config import DEFAULT_PRESET, ModelConfig, Preset, TrainConfig, load_preset, progress_enabled
from sgmft.card import write_model_card
from sgmft.data.splits import resolve_split
from sgmft.errors import SgmftNote, SgmftWarning
from sgmft.features import FeatureStore
from sgmft.models.input_norm import fit_input_norm
from sgmft.models.registry import model_view, resolve_model
from sgmft.runs import (RunDir, RunError, RunLock, cleanup_on_failure, describe_differences, fingerprint,
                        fingerprint_inputs, ids_digest)
from sgmft.train.calibrate import fit_calibration, validation_rows
from sgmft.train.data import FeatureDataset, make_loader
from sgmft.train.module import EpochLines, LitClassifier
from sgmft.train.select import CV_BELOW_VAL_POSTS, train_selected
from sgmft.train.result import TrainResult
from sgmft.train.resume import (NonFiniteError, ResumeCheckpointError, RunRecorder, SafeCheckpointIO,
                                _finite_module, load_state, load_weights, write_metrics_csv)




def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*isinstance.*treespec.*")
    warnings.filterwarnings("ignore", message=".*have no logger configured.*")


def _rank_zero_process() -> bool:
    """True in the process that owns the run folder (not in a DDP child Lightning launched)."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").strip():
            return int(os.environ[key]) == 0
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


def _check_store(fs: FeatureStore) -> None:
    """Refuse a store that cannot train anything, before a split is attempted."""
    if len(fs) == 0:
        raise InputError(f"{fs.path}: the feature store is empty (0 posts); there is nothing to train on")
    if fs.labels is None:
        raise InputError(f"{fs.path}: has no labels.npy; training needs labelled posts")
    if not (np.asarray(fs.labels) >= 0).any():
        raise InputError(f"{fs.path / 'labels.npy'}: no post is labelled (all {len(fs)} labels are -1, "
                         "unlabelled); training needs labelled posts")


def _check_training_rows(fs: FeatureStore, tr: np.ndarray) -> None:
    """One class, or no modality at all, is an error; a missing class or modality a warning."""
    names = fs.label_names
    counts = np.bincount(np.asarray(fs.labels)[tr], minlength=len(names))
    present = np.flatnonzero(counts)
    if len(present) == 1:
        only = names[int(present[0])]
        raise InputError(f"{fs.path}: every training post has the label {only!r} ({len(tr)} posts): a classifier "
                         f"cannot learn anything from one class (it would score val_acc 1.0 by always answering "
                         f"{only!r}); the store needs posts of at least two places")
    absent = [names[i] for i in np.flatnonzero(counts == 0)]
    if absent:
        warnings.warn(f"{fs.path}: {len(absent)} of {len(names)} classes have no training post "
                      f"({', '.join(map(repr, absent[:8]))}{', ...' if len(absent) > 8 else ''}); "
                      "the model will never predict them", SgmftWarning, stacklevel=4)
    tm = np.ones(len(tr), bool) if fs.text_mask is None else np.asarray(fs.text_mask)[tr]
    im = np.ones(len(tr), bool) if fs.image_mask is None else np.asarray(fs.image_mask)[tr]
    if not tm.any() and not im.any():
        raise InputError(f"{fs.path}: no training post has usable text or a usable image (text_mask and "
                         f"image_mask are False for all {len(tr)}): the model would see only placeholders")
    for name, m, other in (("text", tm, "images"), ("image", im, "text")):
        if not m.any():
            warnings.warn(f"{fs.path / (name + '_mask.npy')}: {name} is missing ({name}_mask False) for every "
                          f"training post: the model learns from {other} alone", SgmftWarning, stacklevel=4)
    neither = int((~tm & ~im).sum())
    if neither and (tm.any() and im.any()):
        warnings.warn(f"{fs.path}: {neither} of {len(tr)} training posts have neither text nor image (both "
                      "masks False); they teach only how common each label is", SgmftWarning, stacklevel=4)
    _check_constant_modalities(fs, tr[tm], tr[im])


def _constant(x, rows: np.ndarray, chunk: int = 8192) -> bool:
    """Whether every row of ``x`` in ``rows`` (sorted) equals the first, read in chunks (the store may be mapped;
    real features differ within the first chunk, so this reads one)."""
    if len(rows) < 2:
        return False
    first = np.asarray(x[rows[0]])
    return all((np.asarray(x[r]) == first).all() for r in np.array_split(rows, -(-len(rows) // chunk)))


def _check_constant_modalities(fs: FeatureStore, text_rows: np.ndarray, image_rows: np.ndarray) -> None:
    """A modality whose features are the same on every training post that has it (one placeholder image, an
    empty caption everywhere) tells the places nothing: a warning, or an error when both are."""
    same = [name for name, x, rows in (("text", fs.text, text_rows), ("image", fs.image, image_rows))
            if _constant(x, np.sort(rows))]
    if len(same) == 2:
        raise InputError(f"{fs.path}: text.npy and image.npy each hold the same features on every training post "
                         f"({len(text_rows)} and {len(image_rows)} rows): there is nothing to tell places apart")
    for name in same:
        warnings.warn(f"{fs.path / (name + '.npy')}: the {name} features are the same on every training post "
                      f"(e.g. one placeholder {'image' if name == 'image' else 'caption'}): the {name} says nothing "
                      "about the place, and the model learns from the other modality alone", SgmftWarning,
                      stacklevel=5)


def resolve_budget(train_cfg: TrainConfig, num_train: int) -> TrainConfig:
    """``epochs`` raised so the run makes at least ``min_steps`` optimiser steps (docs/training.md,
    "Budget"): a fixed 10 epochs is 1,000 steps on 13,600 posts but 20 on 300. The resolved value is
    what run.json records, so a resumed run and the fingerprint see the same number."""
    if train_cfg.min_steps <= 0 or num_train <= 0:
        return train_cfg
    world = train_cfg.devices if isinstance(train_cfg.devices, int) and train_cfg.devices > 0 else 1
    per_epoch = max(1, -(-num_train // (train_cfg.batch_size * world * train_cfg.num_nodes)))
    epochs = max(train_cfg.epochs, -(-train_cfg.min_steps // per_epoch))
    return train_cfg if epochs == train_cfg.epochs else dataclasses.replace(train_cfg, epochs=epochs)


def _warn_if_not_learned(fs, tr, va, best_score) -> None:
    """A run whose validation accuracy is near what always answering the commonest class gets has
    not learned: say so (with what to try) instead of exporting a model silently."""
    if best_score is None or len(va) == 0:
        return
    labels = np.asarray(fs.labels)
    majority = int(np.bincount(labels[tr]).argmax())
    rate = float((labels[va] == majority).mean())
    if best_score <= rate + 0.05:
        warnings.warn(f"{fs.path}: the model did not learn: best validation accuracy {best_score:.3f} is close to "
                      f"the majority-class rate {rate:.3f} (always answering {fs.label_names[majority]!r}). Check the "
                      "labels and features, or train longer (--set train.min_steps=N or --epochs N)",
                      SgmftWarning, stacklevel=4)


def _run_record(fs, p, model_cfg, train_cfg, fp, inputs, **extra) -> dict:
    return {"status": "running", "fingerprint": fp, "fingerprint_inputs": inputs,
            "store": str(fs.path), "store_ids": ids_digest(fs.ids), "preset": p.name,
            "model": model_view(model_cfg), "train": asdict(train_cfg), **extra}


def _migrated_inputs(info: dict) -> dict | None:
    """A run's recorded fingerprint inputs with its model read again as today's view (issue 19: runs
    written before it list every flat ModelConfig field; options added since take their defaults), when
    the record is genuine (its inputs give its fingerprint). None otherwise."""
    old = info.get("fingerprint_inputs")
    if not isinstance(old, dict) or not isinstance(old.get("model"), dict) or not info.get("fingerprint"):
        return None
    from sgmft.config import model_config_from_dict

    try:
        view = model_view(model_config_from_dict(old["model"], "run.json: model"))
    except ValueError:
        return None
    if fingerprint(old) != info["fingerprint"]:
        return None
    return {**old, "model": json.loads(json.dumps(view, sort_keys=True))}


def _legacy_fingerprint(info: dict, inputs: dict) -> str | None:
    """The recorded fingerprint of a run written under an older model view, when it is this run: its
    migrated inputs (:func:`_migrated_inputs`) equal ``inputs``. None otherwise."""
    return info["fingerprint"] if _migrated_inputs(info) == inputs else None


def _refusal_differences(info: dict, inputs: dict) -> list[str]:
    """What differs between a recorded run and this one, as a refusal names it: against the record's
    migrated inputs where it has them, so that an option added since (at its default) is not named."""
    return describe_differences(_migrated_inputs(info) or info.get("fingerprint_inputs"), inputs)


def _decide(run_dir: RunDir, fp: str, inputs: dict, epochs: int) -> str:
    """``"fresh"``, ``"resume"`` or ``"complete"`` for a run folder under our lock."""
    root = run_dir.root
    links = run_dir.symlinked_entries()
    if links:
        raise RunError(f"{links[0]}: is a symbolic link; sgmft writes a run only inside its folder. Use "
                       "--overwrite (which removes the link, not its target) or a new --out")
    if not run_dir.run_json.exists():        # a new run; files of the user's own may be there

        owned = run_dir.owned_entries()
        if owned:
            raise RunError(f"{root}: has {', '.join(e.name for e in owned)} but no run.json, so it cannot be "
                           "checked or resumed; use --overwrite to start it again, or a new --out")
        return "fresh"
    info = run_dir.read_run_json()
    if info is None:
        raise RunError(f"{run_dir.run_json}: unreadable, not a regular file, too large or not a JSON object; use "
                       "--overwrite to start the run again, or a new --out")
    if not info.get("fingerprint"):
        raise RunError(f"{run_dir.run_json}: has no fingerprint (written by an older sgmft), so resuming it "
                       "could mix two configurations; use --overwrite to train it again, or a new --out")
    if info["fingerprint"] != fp and _legacy_fingerprint(info, inputs) is None:
        diffs = _refusal_differences(info, inputs)
        raise RunError(f"{root}: was started with a different configuration, store or seed "
                       f"({'; '.join(diffs) or 'fingerprint ' + info['fingerprint'] + ' -> ' + fp}); "
                       "use --overwrite to replace it, or a new --out")
    before = (info.get("train") or {}).get("epochs")
    if isinstance(before, int) and epochs < before:
        raise RunError(f"{root}: was started for {before} epochs and cannot be shortened to {epochs}; use "
                       "--overwrite to train it again, or a new --out")
    if (info.get("status") == "complete" and epochs == before
            and all((run_dir.model / f).is_file() for f in MODEL_FILES)):
        return "complete"
    return "resume"                          # interrupted, or extended to more epochs


def _check_resume_state(path: Path, lit: LitClassifier, fp: str, legacy: str | None = None) -> dict:
    """Read ``last.ckpt`` (never unpickled) and check it belongs to this run (``fp``, or ``legacy``: the
    same run's fingerprint from before issue 19) and this model."""
    state = load_state(path)
    rec = (state.get("callbacks") or {}).get(RunRecorder.STATE_KEY) or {}
    if rec.get("fingerprint") not in {fp, legacy} - {None}:
        raise ResumeCheckpointError(f"{path}: belongs to another run (fingerprint {rec.get('fingerprint')!r}, "
                                    f"this run is {fp!r}); use --overwrite to start the run again")
    weights = state.get("state_dict")
    want = {k: tuple(v.shape) for k, v in lit.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()} if isinstance(weights, dict) else {}
    if got != want:
        diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got.get(k))
        raise ResumeCheckpointError(f"{path}: its weights do not fit this model (first difference: {diff[0]!r}); "
                                    "use --overwrite to start the run again")
    return state


def train(store, out_dir, preset: str | Preset | None = None, model_cfg: ModelConfig | None = None,
          train_cfg: TrainConfig | None = None, *, overwrite: bool = False) -> TrainResult:
    """Train ``preset`` on a feature store (see :func:`_train`). A run that fails before its
    first resumable checkpoint leaves nothing behind (:func:`sgmft.runs.cleanup_on_failure`,
    applied while the run's lock is held, so a writer that did not get the lock never
    deletes anything); nor does the run folder stay if this call created it."""
    out = Path(out_dir)
    existed = out.exists()
    p = load_preset(preset or DEFAULT_PRESET) if isinstance(preset, (str, Path, type(None))) else preset
    if p.candidates and model_cfg is None:             # a selecting preset (auto): docs/design.md
        if train_cfg is not None:
            p = dataclasses.replace(p, train=train_cfg)
        return train_selected(store, out_dir, p, overwrite=overwrite, train_fn=train)   # train/select.py
    try:
        return _train(store, out_dir, preset, model_cfg, train_cfg, overwrite=overwrite)
    except BaseException:
        if not existed and _rank_zero_process():
            with contextlib.suppress(OSError):
                out.rmdir()                  # only if empty
        raise


def _train(store, out_dir, preset: str | Preset | None = None, model_cfg: ModelConfig | None = None,
           train_cfg: TrainConfig | None = None, *, overwrite: bool = False) -> TrainResult:
    """Train ``preset`` (or explicit configs) on a feature store; return where the model went.

    ``preset`` None means :data:`sgmft.config.DEFAULT_PRESET`.

    ``model_cfg.dim`` / ``num_classes`` are taken from the store.  The split is the store's
    own if it has one, else a seeded stratified (or user-disjoint) 80/20 split, with a
    validation part carved from train for model selection (best ``val_acc``).

    ``out_dir`` is created, resumed (same fingerprint, run not complete), or left alone (the
    run is complete: ``status == "complete"``); another fingerprint is a :class:`RunError`
    unless ``overwrite`` (which first deletes what sgmft wrote there).
    """
    _quiet_lightning()
    t0 = time.time()
    p = load_preset(preset or DEFAULT_PRESET) if isinstance(preset, (str, Path, type(None))) else preset
    model_cfg = model_cfg or p.model
    train_cfg = train_cfg or p.train
    fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    _check_store(fs)
    model_cfg = resolve_model(dataclasses.replace(model_cfg, dim=fs.dim, num_classes=len(fs.label_names)),
                              where=f"preset {p.name}: model")   # refuses fields the arch does not read
    out = Path(out_dir)
    run_dir = RunDir(out)

    split = resolve_split(fs.split, np.asarray(fs.labels), fs.users, mode=train_cfg.split,
                          test_fraction=train_cfg.test_fraction, val_fraction=train_cfg.val_fraction,
                          seed=train_cfg.seed)
    tr, va = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    if len(tr) == 0:
        raise InputError(f"{fs.path}: the split has no training posts")
    _check_training_rows(fs, tr)
    train_cfg = resolve_budget(train_cfg, len(tr))
    inputs = fingerprint_inputs(model_view(model_cfg), asdict(train_cfg), fs.path)   # what the arch reads
    fp = fingerprint(inputs)
    if not _rank_zero_process():          # a DDP child: rank 0 holds the lock and owns the folder
        return _fit(fs, run_dir, p, model_cfg, train_cfg, split, tr, va, fp, inputs, t0,
                    resume=run_dir.last_checkpoint.exists(),
                    legacy=_legacy_fingerprint(run_dir.read_run_json() or {}, inputs))

    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a folder; choose another --out")
    with RunLock(run_dir) as lock:
        if lock.note:
            warnings.warn(lock.note, SgmftNote, stacklevel=2)
        if overwrite:                                       # sgmft's own entries only
            run_dir.clear()
            decision = "fresh"
        else:
            decision = _decide(run_dir, fp, inputs, train_cfg.epochs)
        if decision == "complete":
            info = run_dir.read_run_json() or {}
            return TrainResult(out, run_dir.model, info.get("best_val_acc"), 0.0, status="complete")
        run_dir.remove_orphans()
        resume = decision == "resume" and run_dir.last_checkpoint.exists()
        legacy = _legacy_fingerprint(run_dir.read_run_json() or {}, inputs) if resume else None
        if not resume and run_dir.lightning.is_dir():       # killed before its first epoch ended
            import shutil

            shutil.rmtree(run_dir.lightning)
        with cleanup_on_failure(out):                       # under the lock: only our own files
            recorded = (run_dir.read_run_json() or {}).get("train") or {}
            if decision == "fresh" or recorded.get("epochs") != train_cfg.epochs:   # new, or extended
                run_dir.write_run_json(_run_record(fs, p, model_cfg, train_cfg, fp, inputs))
            res = _fit(fs, run_dir, p, model_cfg, train_cfg, split, tr, va, fp, inputs, t0, resume=resume,
                       legacy=legacy)
        if decision == "resume":
            res.status = "resumed"
        return res


def _tensorboard_logger(run_dir: RunDir):
    """Lightning's TensorBoard logger into ``<run>/tensorboard/`` (the metrics of ``self.log``,
    the ones ``lightning/metrics.csv`` holds); a resumed run adds an event file."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise InputError("train.tensorboard (--tensorboard) needs the tensorboard package: "
                         "pip install 'sgmft[tensorboard]'") from None
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(run_dir.root, name=run_dir.tensorboard.name, version="", default_hp_metric=False)


def _rows_batch(fs, rows: np.ndarray) -> dict:
    """A whole split as one batch dict of tensors (the training loader's reader, rows in store order)."""
    rows = np.sort(np.asarray(rows))
    return FeatureDataset(fs, rows).__getitems__(np.arange(len(rows)))


def _fit_closed_form(fs, run_dir: RunDir, p, model_cfg, train_cfg, split, tr, va, fp, inputs, t0) -> TrainResult:
    """Heads with a closed-form or convex fit (``closed_form = True``: shrinkage LDA, logistic
    regression, models/linear.py): no optimiser loop, same run folder and checkpoint as any run."""
    from sgmft.models import build_model, forward_batch

    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg)
    norm_info = fit_input_norm(model, fs, tr)
    va_sel = validation_rows(va, train_cfg)[0]
    val = _rows_batch(fs, va_sel) if len(va_sel) else None
    fit_info = model.fit_closed_form(_rows_batch(fs, tr), val, seed=train_cfg.seed)
    model.eval()
    val_acc = None
    if val is not None:
        with torch.no_grad():
            val_acc = float((forward_batch(model, val).logits.argmax(1) == val["label"]).float().mean())
    bad = _finite_module(model)
    if bad:
        raise NonFiniteError(f"{run_dir.root}: the fitted weights are non-finite ({bad}); nothing was exported")
    write_metrics_csv(run_dir.metrics_csv, [{"epoch": 0, "step": 0, "val_acc": val_acc}])
    _finish(fs, run_dir, p, model, model_cfg, train_cfg, split, tr, va, fp, inputs, t0, best_score=val_acc,
            best_epoch=0, epochs_run=0, extra={"input_norm": norm_info, "fit": fit_info})
    return TrainResult(run_dir.root, run_dir.model, val_acc, time.time() - t0)


def _finish(fs, run_dir, p, model, model_cfg, train_cfg, split, tr, va, fp, inputs, t0, *, best_score, best_epoch,
            epochs_run, extra) -> None:
    """Calibrate on the validation split, then export the checkpoint, the split, run.json (status
    complete) and the model card."""
    _warn_if_not_learned(fs, tr, va, best_score)
    calibration = fit_calibration(model.cpu(), fs, va, model_cfg, train_cfg)   # docs/predict.md
    save_checkpoint(run_dir.model, model.cpu(), model_cfg, fs.label_names, fs.meta, train_cfg, preset=p.name,
                    calibration=calibration)
    run_dir.write_split(split)
    run = _run_record(fs, p, model_cfg, train_cfg, fp, inputs,
                      num_train=int(len(tr)), num_val=int(len(va)), num_test=int((split == "test").sum()),
                      best_val_acc=best_score, best_epoch=best_epoch,
                      epochs_run=epochs_run, seconds=round(time.time() - t0, 2), **extra)
    run["status"] = "complete"
    run_dir.write_run_json(run)
    write_model_card(run_dir.model)                 # model/README.md (docs/predict.md, "Sharing")


def _fit(fs, run_dir: RunDir, p, model_cfg, train_cfg, split, tr, va, fp, inputs, t0, *,
         resume: bool, legacy: str | None = None) -> TrainResult:
    from sgmft.models import MODELS

    if getattr(MODELS.get(model_cfg.arch), "closed_form", False):
        return _fit_closed_form(fs, run_dir, p, model_cfg, train_cfg, split, tr, va, fp, inputs, t0)
    L.seed_everything(train_cfg.seed, workers=True, verbose=False)
    lit = LitClassifier(model_cfg, train_cfg)
    norm_info = fit_input_norm(lit.model, fs, tr)         # training split only; buffers of the model
    init_info = None                                      # a data-dependent start (TrustMix init: lda)
    va_sel = validation_rows(va, train_cfg)[0]              # calibration_holdout: the rest fits the calibration
    if getattr(lit.model, "wants_data_init", False) and not resume:   # resume: weights come from last.ckpt
        enough = len(va_sel) >= CV_BELOW_VAL_POSTS     # fewer: too few to choose EM's start on (theme_start best)
        init_info = lit.model.init_from_data(_rows_batch(fs, tr), seed=train_cfg.seed,
                                             val_batch=_rows_batch(fs, va_sel) if enough else None)
    preloaded = {}
    if resume and _rank_zero_process():
        state = _check_resume_state(run_dir.last_checkpoint, lit, fp, legacy)
        preloaded[str(run_dir.last_checkpoint)] = state
        done = [r["epoch"] for r in (state["callbacks"][RunRecorder.STATE_KEY].get("history") or [])]
        n_done = f"{max(done) + 1}" if done else "?"      # history epochs count from 0, as in metrics.csv
        warnings.warn(f"{run_dir.root}: resuming after {n_done} finished epoch(s) of {train_cfg.epochs} "
                      f"({run_dir.last_checkpoint.name})", SgmftNote, stacklevel=3)
    lim = train_cfg.limit_train_batches
    full = lim == 1.0 or (isinstance(lim, int) and lim >= -(-len(tr) // train_cfg.batch_size))
    train_loader = make_loader(fs, tr, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed,
                               num_workers=train_cfg.num_workers, full_epochs=full)
    val_loader = (make_loader(fs, va_sel, max(train_cfg.batch_size, 256), shuffle=False,
                              num_workers=train_cfg.num_workers) if len(va_sel) else None)
    recorder = RunRecorder(run_dir, has_val=val_loader is not None, fingerprint=fp,
                           select_on=getattr(train_cfg, "select_on", "val_acc"))
    callbacks = [recorder]
    progress = progress_enabled(train_cfg.progress)     # None: only on a terminal
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, len(train_loader) // 50)))
    elif train_cfg.progress is None:                    # not a terminal (a log, a CI job): a line per epoch
        callbacks.append(EpochLines(train_cfg.epochs))
    strategy = train_cfg.strategy
    if strategy == "ddp":
        # Placeholders for absent modalities get no gradient on stores without masks.
        strategy = "ddp_find_unused_parameters_true"
    trainer = L.Trainer(
        max_epochs=train_cfg.epochs, max_steps=train_cfg.max_steps,
        accelerator=train_cfg.accelerator, devices=train_cfg.devices, strategy=strategy,
        num_nodes=train_cfg.num_nodes, precision=train_cfg.precision,
        deterministic=train_cfg.deterministic, callbacks=callbacks,
        plugins=[SafeCheckpointIO(preloaded)], logger=_tensorboard_logger(run_dir) if train_cfg.tensorboard else False,
        enable_checkpointing=False, log_every_n_steps=max(1, min(50, len(train_loader))),
        enable_progress_bar=progress, enable_model_summary=False,
        limit_train_batches=train_cfg.limit_train_batches, num_sanity_val_steps=0,
    )
    ckpt = str(run_dir.last_checkpoint) if resume else None
    trainer.fit(lit, train_loader, val_loader, ckpt_path=ckpt, weights_only=True)
    if trainer.interrupted:
        raise RunError(f"{run_dir.root}: training was interrupted; run the same command again to resume")

    best_score = recorder.best_score
    if trainer.is_global_zero:
        if recorder.best_epoch is not None:
            try:
                lit.model.load_state_dict(load_weights(run_dir.best_weights), strict=True)
            except RuntimeError as e:
                raise ResumeCheckpointError(f"{run_dir.best_weights}: does not fit this model ({str(e)[:200]}); "
                                            "use --overwrite to start the run again") from None
        bad = _finite_module(lit.model)
        if bad:
            raise NonFiniteError(f"{run_dir.root}: the trained weights are non-finite ({bad}); nothing was exported")
        write_metrics_csv(run_dir.metrics_csv, recorder.history)
        _finish(fs, run_dir, p, lit.model, model_cfg, train_cfg, split, tr, va, fp, inputs, t0,
                best_score=best_score, best_epoch=recorder.best_epoch, epochs_run=int(trainer.current_epoch),
                extra={"input_norm": norm_info, **({"init": init_info} if init_info else {})})
    return TrainResult(run_dir.root, run_dir.model, best_score, time.time() - t0)
