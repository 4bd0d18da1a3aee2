"""Selecting presets (``candidates:``, the default ``auto``): train each candidate preset on the same
split and keep one by the validation split (:data:`RULE`; docs/design.md, "The default model").

Users bring data whose shape nobody tuned for. No single head wins on every kind of data, so the
default trains a small set of candidates (TrustMix, TrustMix started from LDA, the shrinkage-LDA
bar), assembles ensembles of them (``a+b``: the mean of their calibrated probabilities, eq E1 in
models/ensemble.py; seconds, no training) and chooses on the run's validation split, never the test
split. The run folder is an
ordinary run: ``model/`` is a copy of the chosen candidate's checkpoint, ``split.npy`` the shared
split, and ``run.json`` says what was chosen and why (``selection``); the model card repeats it.
Each candidate is itself a complete, resumable run under ``candidates/<preset>/``.

On a small store the validation split is too small to choose on: 80 posts cannot tell a 42 % model
from a 50 % one. Below :data:`CV_BELOW_VAL_POSTS` labelled validation posts the same rule reads
:data:`CV_FOLDS`-fold cross-validation over the training and validation posts instead (each fold
trains every candidate on the other folds, under ``cv/fold-<i>/<preset>/``; the test split is never
touched), as ESL 7.10 states the rule. The model kept is still the candidate's run on the split.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sgmft.atomic import atomic_dir
from sgmft.config import Preset, TrainConfig, load_preset
from sgmft.errors import SgmftNote
from sgmft.models.registry import model_view, resolve_model
from sgmft.runs import RunDir, RunLock, fingerprint, fingerprint_inputs
from sgmft.train.result import TrainResult

__all__ = ["SHARED_TRAIN_FIELDS", "train_selected"]

RULE = ("the first candidate, unless a later one is more accurate by more than one standard error of the paired "
        "per-post difference (the one-standard-error rule, in the candidates' order), on the validation split, or "
        "by cross-validation over the training and validation posts when the validation split is small")
# Fewer labelled validation posts than this: choose by CV_FOLDS-fold cross-validation (docs/design.md, "The
# default model", item 10). On 80-200 validation posts the paired standard error is 3-6 points, and the rule
# kept random-start TrustMix 8 points below LDA on a 1,000-post family C store.
CV_BELOW_VAL_POSTS = 500
CV_FOLDS = 5
# Below this many training posts per place, TrustMix candidates get one look per place (eq T0): each
# look is a mean to estimate, and on 1,000 posts of 10 places three looks lost 3-5 points to one
# (docs/design.md, "The default model", item 7).
LOOKS_MIN_POSTS_PER_PLACE = 150
# settings of the selecting preset that every candidate gets (the split, the seed, where to run)
SHARED_TRAIN_FIELDS = ("seed", "val_fraction", "test_fraction", "split", "num_workers", "accelerator",
                       "devices", "strategy", "num_nodes", "progress", "deterministic", "calibration",
                       "calibration_holdout")


def _candidate_preset(name: str, shared: TrainConfig, base: TrainConfig | None = None) -> Preset:
    """Candidate ``name`` with the selecting run's split and seed, and every train setting the user
    changed on the selecting preset (``base``: its train section as written), e.g. ``--epochs 3``."""
    p = load_preset(name)
    changed = {f.name for f in dataclasses.fields(shared)
               if base is not None and getattr(shared, f.name) != getattr(base, f.name)}
    p.train = dataclasses.replace(p.train, **{f: getattr(shared, f) for f in set(SHARED_TRAIN_FIELDS) | changed})
    return p


def _training_posts(labelled: int, split, train: TrainConfig) -> float:
    """About how many of ``labelled`` posts the training split will hold (not test, not validation)."""
    n = float(labelled)
    if split is not None:
        n -= float(np.count_nonzero(np.asarray(split) == "test"))
    else:
        n *= 1.0 - train.test_fraction
    return n * (1.0 - train.val_fraction)


def _fit_to_size(p: Preset, fs) -> dict | None:
    """One look per place for a TrustMix candidate on a small store (LOOKS_MIN_POSTS_PER_PLACE);
    returns what was changed and why (run.json ``selection``), or None."""
    looks = int(p.model.extra.get("looks", 1)) if p.model.arch == "trust" else 1
    if looks <= 1 or fs.labels is None:
        return None
    labels = np.asarray(fs.labels)
    labels = labels[labels >= 0]
    per_place = _training_posts(labels.size, fs.split, p.train) / max(1, len(np.unique(labels)))
    if per_place >= LOOKS_MIN_POSTS_PER_PLACE:
        return None
    p.model = dataclasses.replace(p.model, extra={**p.model.extra, "looks": 1})
    return {"looks": 1, "was": looks,
            "reason": f"about {per_place:.0f} training posts per place < {LOOKS_MIN_POSTS_PER_PLACE}: "
                      "one look per place"}


def one_se_choice(correct: dict[str, np.ndarray], order: list[str]) -> tuple[str, list[dict]]:
    """The candidate kept by the one-standard-error rule (Hastie, Tibshirani & Friedman, ESL 7.10), in
    ``order`` of preference: ``correct[name]`` is 1/0 per validation post. The first candidate is kept
    until a later one beats the kept one by more than one standard error of the paired difference;
    a gain inside the noise of a few hundred posts does not replace it. Returns the choice and each
    comparison (run.json ``selection.comparisons``)."""
    kept, duels = order[0], []
    for name in order[1:]:
        d = correct[name].astype(float) - correct[kept].astype(float)
        gain = float(d.mean()) if d.size else 0.0
        se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("inf")
        won = gain > se
        duels.append({"candidate": name, "against": kept, "gain": round(gain, 4), "se": round(se, 4), "replaces": won})
        kept = name if won else kept
    return kept, duels


def cv_folds(split, labels, users, mode: str, seed: int, k: int = CV_FOLDS) -> list[np.ndarray]:
    """The labelled training and validation rows of ``split`` cut into ``k`` folds (store rows, sorted):
    stratified by place, or user-disjoint with ``mode`` "user". Test rows are in no fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    pool = np.flatnonzero(np.isin(np.asarray(split), ["train", "val"]) & (labels >= 0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")   # rare places: best effort
        if mode == "user":
            groups = np.unique(np.asarray(users, dtype=str)[pool], return_inverse=True)[1]
            cut = StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(pool, labels[pool], groups)
        else:
            cut = StratifiedKFold(k, shuffle=True, random_state=seed).split(pool, labels[pool])
        return [np.sort(pool[te]) for _, te in cut]


def _cross_validate(fs, out: Path, presets: list[Preset], order: list[str], split, train_fn,
                    overwrite: bool) -> tuple[dict, np.ndarray]:
    """Per candidate, its logits on each pooled post from the fold model that did not train on it (an
    ensemble ``a+b``: the log of the mean of its members' calibrated fold probabilities, eq E1), and
    the pooled posts' labels."""
    from sgmft.checkpoint import load_checkpoint
    from sgmft.models.ensemble import pooled_logits
    from sgmft.models.output import calibrated_probs
    from sgmft.train.calibrate import collect_logits

    t = presets[0].train
    folds = cv_folds(split, fs.labels, fs.users, t.split, t.seed)
    pool = np.sort(np.concatenate(folds))
    raw = {p.name: torch.zeros(len(pool), len(fs.label_names), dtype=torch.float64) for p in presets}
    probs = {p.name: torch.zeros(len(pool), len(fs.label_names), dtype=torch.float64) for p in presets}
    for i, rows in enumerate(folds):
        view = copy.copy(fs)                    # the same store, with the fold as its (unused) test split
        view.split = np.full(len(fs), "", dtype="<U5")
        view.split[pool], view.split[rows] = "train", "test"
        warnings.warn(f"{out}: cross-validation fold {i + 1}/{len(folds)} ({len(rows)} held-out posts): training "
                      + ", ".join(p.name for p in presets), SgmftNote, stacklevel=4)
        for p in presets:
            res = train_fn(view, out / "cv" / f"fold-{i}" / p.name, p, overwrite=overwrite)
            model, info = load_checkpoint(res.checkpoint)
            cal = info["calibration"]
            at = torch.from_numpy(np.searchsorted(pool, rows))
            raw[p.name][at] = torch.from_numpy(collect_logits(model, fs, rows)[0])
            probs[p.name][at] = calibrated_probs(raw[p.name][at], cal["temperature"], cal.get("uniform_weight", 0.0))
    logits = {n: (raw[n] if "+" not in n else pooled_logits([probs[m] for m in n.split("+")])).numpy() for n in order}
    return logits, np.asarray(fs.labels)[pool]


def _use_cv(fs, split) -> bool:
    """Cross-validate when the validation split is small and every fold can hold each place twice."""
    labels = np.asarray(fs.labels)
    val = np.count_nonzero((np.asarray(split) == "val") & (labels >= 0))
    pool = labels[np.isin(np.asarray(split), ["train", "val"]) & (labels >= 0)]
    return val < CV_BELOW_VAL_POSTS and pool.size >= 2 * CV_FOLDS * max(2, len(np.unique(pool)))


def choose(fs, results: dict, order: list[str], train: TrainConfig) -> tuple[str, list[dict]]:
    """:func:`one_se_choice` on the validation posts that chose each candidate's epoch (the same rows
    for every candidate: one split); without labelled validation posts, the first candidate."""
    from sgmft.checkpoint import load_checkpoint
    from sgmft.train.calibrate import collect_logits, validation_rows

    split = np.load(RunDir(results[order[0]].run_dir).split, allow_pickle=True)
    rows = np.sort(validation_rows(np.flatnonzero(split == "val"), train)[0])
    if fs.labels is not None:
        rows = rows[np.asarray(fs.labels)[rows] >= 0]
    if fs.labels is None or not len(rows):
        return order[0], []
    correct = {}
    for n in order:
        logits, labels = collect_logits(load_checkpoint(results[n].checkpoint)[0], fs, rows)
        correct[n] = logits.argmax(1) == labels
    return one_se_choice(correct, order)


def _select(fs, out: Path, presets: list[Preset], order: list[str], results: dict, train_fn, overwrite: bool):
    """``(chosen, comparisons, cross-validation record or None, its (logits, labels) of the chosen
    candidate or None)``: the one-standard-error rule on the validation split, or on cross-validation
    when that split is small (:func:`_use_cv`)."""
    split = np.load(RunDir(results[order[0]].run_dir).split, allow_pickle=True)
    if fs.labels is None or not _use_cv(fs, split):
        return (*choose(fs, results, order, presets[0].train), None, None)
    if overwrite:
        shutil.rmtree(out / "cv", ignore_errors=True)
    logits, y = _cross_validate(fs, out, presets, order, split, train_fn, overwrite)
    correct = {n: z.argmax(1) == y for n, z in logits.items()}
    chosen, duels = one_se_choice(correct, order)
    cv = {"folds": CV_FOLDS, "posts": int(len(y)), "folder": "cv",
          "reason": f"fewer than {CV_BELOW_VAL_POSTS} labelled validation posts",
          "accuracy": {n: round(float(c.mean()), 4) for n, c in correct.items()}}
    return chosen, duels, cv, (logits[chosen], y)


def _write_chosen(run: RunDir, best: TrainResult, oof, train: TrainConfig) -> dict | None:
    """``run.model``: the chosen candidate's checkpoint; after cross-validation with its calibration
    refitted on the out-of-fold predictions of all the pooled posts (as scikit-learn's
    CalibratedClassifierCV with ``ensemble=False``) instead of the small validation split. Returns that
    calibration record, or None."""
    from sgmft.checkpoint import load_checkpoint, write_model_folder
    from sgmft.train.calibrate import MIN_VAL_POSTS, calibration_record

    if oof is None or train.calibration == "none" or len(oof[1]) < MIN_VAL_POSTS:
        with atomic_dir(run.model) as tmp:
            for f in Path(best.checkpoint).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        return None
    model, info = load_checkpoint(best.checkpoint)
    record = calibration_record(*oof, train.calibration, f"out-of-fold predictions of {CV_FOLDS}-fold "
                                "cross-validation on the training and validation posts")
    write_model_folder(run.model, model, info["model_cfg"], info["label_names"], info["contract"], info["train"],
                       info["preset"], calibration=record)
    return record


def _assemble(fs, out: Path, name: str, results: dict, train: TrainConfig) -> TrainResult:
    """Candidate ``a+b``: the ensemble of the trained candidates a and b (eq E1, models/ensemble.py),
    calibrated on the validation split like any run and written as one under ``candidates/<name>/``."""
    from sgmft.card import write_model_card
    from sgmft.checkpoint import load_checkpoint, save_checkpoint
    from sgmft.models import build_model
    from sgmft.models.ensemble import ensemble_config
    from sgmft.train.calibrate import collect_logits, fit_calibration, validation_rows

    t0, names = time.time(), name.split("+")
    loaded = [load_checkpoint(results[n].checkpoint) for n in names]
    cfg = ensemble_config(fs.dim, len(fs.label_names), names, [i["model_cfg"] for _, i in loaded],
                          [i["calibration"] for _, i in loaded])
    model = build_model(cfg)
    for member, (trained, _) in zip(model.members, loaded):
        member.load_state_dict(trained.state_dict())
    model.eval()
    first = RunDir(results[names[0]].run_dir)
    split = np.load(first.split, allow_pickle=True)
    va = np.flatnonzero(split == "val")
    run = RunDir(out / "candidates" / name)
    run.root.mkdir(parents=True, exist_ok=True)
    calibration = fit_calibration(model, fs, va, cfg, train)
    save_checkpoint(run.model, model, cfg, fs.label_names, fs.meta, train, preset=name, calibration=calibration)
    run.write_split(split)
    rows = validation_rows(va, train)[0]
    rows = rows[np.asarray(fs.labels)[rows] >= 0]
    logits, labels = collect_logits(model, fs, rows)
    val_acc = float((logits.argmax(1) == labels).mean()) if len(rows) else None
    record = {k: v for k, v in (first.read_run_json() or {}).items()
              if k in ("store", "store_ids", "num_train", "num_val", "num_test")}
    run.write_run_json({"status": "complete", "preset": name, "members": names, "model": model_view(cfg), **record,
                        "best_val_acc": val_acc, "seconds": round(time.time() - t0, 2)})
    write_model_card(run.model)
    return TrainResult(run.root, run.model, val_acc, time.time() - t0)


def _written_train(preset: Preset) -> TrainConfig | None:
    try:
        return load_preset(preset.name).train
    except (KeyError, ValueError):
        return None


def train_selected(store, out_dir, preset: Preset, *, overwrite: bool = False, train_fn=None):
    """Train every candidate of ``preset`` into ``out_dir/candidates/<name>``, copy the best one's
    checkpoint to ``out_dir/model`` and write run.json with the choice. Returns the TrainResult."""
    from sgmft.features import FeatureStore

    fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    out, t0 = Path(out_dir), time.time()
    run = RunDir(out)
    base = _written_train(preset)
    order = list(preset.candidates)
    presets = [_candidate_preset(c, preset.train, base) for c in order if "+" not in c]
    sized = {}
    for p in presets:                           # each candidate's model, checked and resolved (issue 19)
        change = _fit_to_size(p, fs)
        if change:
            sized[p.name] = change
        p.model = resolve_model(p.model, where=f"preset {p.name}: model")
    inputs = fingerprint_inputs({"candidates": [{"name": p.name, "model": model_view(p.model)} for p in presets]
                                 + [{"name": n, "ensemble": n.split("+")} for n in order if "+" in n],
                                 "selection": {"cv_folds": CV_FOLDS, "cv_below_val_posts": CV_BELOW_VAL_POSTS,
                                               "cv_calibration": "out_of_fold"}},
                                asdict(preset.train), fs.path)
    fp = fingerprint(inputs)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(run):
        info = run.read_run_json() or {}
        if overwrite:
            run.clear()
            shutil.rmtree(out / "candidates", ignore_errors=True)
        elif info.get("status") == "complete" and info.get("fingerprint") == fp and run.model.is_dir():
            return TrainResult(out, run.model, info.get("best_val_acc"), 0.0, status="complete")
    results = {}
    for p in presets:
        results[p.name] = train_fn(fs, out / "candidates" / p.name, p, overwrite=overwrite)
    for name in order:
        if "+" in name:                         # an ensemble of trained candidates (eq E1): seconds, no training
            results[name] = _assemble(fs, out, name, results, presets[0].train)
    chosen, duels, cv, oof = _select(fs, out, presets, order, results, train_fn, overwrite)
    best = results[chosen]
    with RunLock(run):
        refit = _write_chosen(run, best, oof, presets[0].train)
        if refit is not None:
            cv["calibration"] = {k: refit[k] for k in ("method", "temperature", "uniform_weight", "num_posts")}
        shutil.copy2(RunDir(best.run_dir).split, run.split)
        chosen_run = RunDir(best.run_dir).read_run_json() or {}
        selection = {"chosen": chosen, "rule": RULE, "split": "cross-validation" if cv else "validation",
                     **({"cross_validation": cv} if cv else {}), "comparisons": duels,
                     "candidates": {n: {"val_acc": r.best_val_acc, "seconds": round(r.seconds, 2),
                                        "run": f"candidates/{n}", **({"sized": sized[n]} if n in sized else {}),
                                        **({"ensemble_of": n.split("+")} if "+" in n else {})}
                                    for n, r in results.items()}}
        record = {k: chosen_run.get(k) for k in ("store", "store_ids", "num_train", "num_val", "num_test",
                                                  "best_epoch", "epochs_run", "model", "input_norm", "fit")
                  if k in chosen_run}
        run.write_run_json({"status": "complete", "fingerprint": fp, "fingerprint_inputs": inputs,
                            "preset": preset.name, "train": asdict(preset.train), **record,
                            "chosen_preset": chosen, "best_val_acc": best.best_val_acc,
                            "selection": selection, "seconds": round(time.time() - t0, 2)})
        from sgmft.card import write_model_card

        write_model_card(run.model)
    accs = cv["accuracy"] if cv else {n: r.best_val_acc or 0.0 for n, r in results.items()}
    warnings.warn(f"{out}: chose {chosen!r} ({'cross-validated' if cv else 'validation'} accuracy "
                  + ", ".join(f"{n} {a:.4f}" for n, a in accs.items())
                  + f"; rule: {RULE})", SgmftNote, stacklevel=3)
    return TrainResult(out, run.model, best.best_val_acc, time.time() - t0)
