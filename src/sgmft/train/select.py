"""Selecting presets (``candidates:``, the default ``auto``): train each candidate preset on the same
split and keep one by the validation split (:data:`RULE`; docs/design.md, "The default model").

Users bring data whose shape nobody tuned for. No single head wins on every kind of data, so the
default trains a small set of candidates (TrustMix, TrustMix started from LDA, the shrinkage-LDA
bar), assembles ensembles of them (``a+b``: the logarithmic pool of their calibrated probabilities,
eq E1' in models/ensemble.py; seconds, no training) and chooses on the run's validation split, never the test
split. The run folder is an
ordinary run: ``model/`` is a copy of the chosen candidate's checkpoint, ``split.npy`` the shared
split, and ``run.json`` says what was chosen and why (``selection``); the model card repeats it.
Each candidate is itself a complete, resumable run under ``candidates/<preset>/``.

On a small store the validation split is too small to choose on: 80 posts cannot tell a 42 % model
from a 50 % one. Below :data:`CV_BELOW_VAL_POSTS` labelled validation posts the same rule reads
:data:`CV_FOLDS`-fold cross-validation over the training and validation posts instead (each fold
trains every candidate on the other folds, under ``cv/fold-<i>/<preset>/``; the test split is never
touched), as ESL 7.10 states the rule. An ensemble's members are then calibrated by cross-fitting
(each fold's posts under a map fitted on the other folds' posts). The model kept is the chosen
candidate's *fold committee*: eq E1 over its fold models of two partitions of the pooled posts (the
chosen candidate is cross-validated once more), each calibrated on its candidate's out-of-fold predictions,
so every training and validation post trains the model and ten fits average out each one's noise
(docs/design.md, "The default model", item 11); its own temperature is extrapolated to ten members from
committees of one and two fold models that never saw the post (eq E2, item 22).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sgmft.atomic import atomic_dir
from sgmft.config import Preset, TrainConfig, load_preset
from sgmft.errors import SgmftNote, SgmftWarning
from sgmft.models.registry import MODELS, model_view, resolve_model
from sgmft.runs import RunDir, RunLock, fingerprint, fingerprint_inputs
from sgmft.train.result import TrainResult

__all__ = ["SHARED_TRAIN_FIELDS", "cross_fitted_probs", "cv_folds", "one_se_choice", "train_selected"]

RULE = ("the first candidate, unless a later one is more accurate by more than one standard error of the paired "
        "per-post difference (the one-standard-error rule, in the candidates' order), on the validation split, or "
        "by cross-validation over the training and validation posts when the validation split is small")
# Fewer labelled validation posts than this: choose by CV_FOLDS-fold cross-validation (docs/design.md, "The
# default model", item 10). On 80-200 validation posts the paired standard error is 3-6 points, and the rule
# kept random-start TrustMix 8 points below LDA on a 1,000-post family C store.
CV_BELOW_VAL_POSTS = 500
# How a candidate ``a+b`` chosen on the validation split pools its members (models/ensemble.py): eq E1',
# the logarithmic pool, better calibrated than their mean (docs/design.md, "The default model", item 15).
# Cross-validation scores ``a+b`` by eq E1, and its fold committee is the mean of the fold models (bagging).
CANDIDATE_POOL = "log_mean"
CV_FOLDS = 5
# After cross-validation the chosen candidate is cross-validated again on this many partitions of the pooled
# posts in all (the first, seed ``seed``, is the one that chose; partition r cuts with seed ``seed + r``). Each
# pooled post is then held out by one fold model of every partition, so the mean of those is a committee of
# CV_REPEATS members that never saw the post: with the single fold models it tells how the committee's
# temperature changes with its size, and eq E2 extrapolates that to the whole committee (docs/design.md,
# "The default model", item 22). The committee keeps the fold models of every partition.
CV_REPEATS = 2
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


def _drop_repeats(presets: list[Preset], order: list[str], sized: dict) -> tuple[list[Preset], list[str], dict]:
    """The candidates without those whose model, once fitted to the store's size, is an earlier
    candidate's (``trust_mda`` with one look is ``trust_lda``): the same run twice would cost a
    training and could never win; and without the ensembles of a dropped candidate. Returns the rest
    and, per dropped name, why (run.json)."""
    kept, skipped = [], {}
    for p in presets:
        twin = next((q.name for q in kept if model_view(q.model) == model_view(p.model)), None)
        if twin is None:
            kept.append(p)
        else:
            skipped[p.name] = {"skipped": f"the same model as {twin} here", **({"sized": sized[p.name]}
                                                                              if p.name in sized else {})}
    for n in order:
        gone = [m for m in n.split("+") if m in skipped] if "+" in n else []
        if gone:
            skipped[n] = {"skipped": f"an ensemble with {gone[0]}, which is not trained here"}
    return kept, [n for n in order if n not in skipped], skipped


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


class CrossValidation(NamedTuple):
    """What :func:`_cross_validate` measured, per candidate name, on the pooled posts."""

    logits: dict            # out-of-fold logits (an ensemble: its cross-fitted log-probabilities)
    labels: np.ndarray
    calibrations: dict      # trained candidate -> its calibration fitted on all its out-of-fold logits
    crossfit_logp: dict     # candidate -> log of its cross-fitted calibrated out-of-fold probabilities


def _fold_dir(out: Path, repeat: int, i: int) -> Path:
    """Where fold ``i`` of partition ``repeat`` trains (the first partition: ``cv/fold-<i>``)."""
    return out / "cv" / (f"fold-{i}" if repeat == 0 else f"repeat-{repeat}" / Path(f"fold-{i}"))


def _cross_validate(fs, out: Path, presets: list[Preset], order: list[str], split, train_fn,
                    overwrite: bool, repeat: int = 0) -> "CrossValidation":
    """Per candidate, its logits on each pooled post from the fold model that did not train on it; the
    pooled posts' labels; and per trained candidate, its calibration fitted on all its out-of-fold
    logits (:func:`_oof_calibration`), and every candidate's cross-fitted log-probabilities (what fits
    the committee's own temperature). An ensemble ``a+b`` gets eq
    E1 over its members' fold probabilities, each calibrated by a map fitted on the other folds' posts
    (cross-fitting: no post calibrates its own prediction, and a fold's small carved validation split,
    often too small to calibrate on, calibrates nothing). ``repeat`` r > 0 cuts another partition (seed
    ``seed + r``, folder ``cv/repeat-<r>/``; :data:`CV_REPEATS`)."""
    from sgmft.checkpoint import load_checkpoint
    from sgmft.models.ensemble import pooled_logits
    from sgmft.train.calibrate import collect_logits

    t = presets[0].train
    folds = cv_folds(split, fs.labels, fs.users, t.split, t.seed + repeat)
    pool = np.sort(np.concatenate(folds))
    raw = {p.name: np.zeros((len(pool), len(fs.label_names))) for p in presets}
    fold_of = np.zeros(len(pool), dtype=np.int64)
    what = "cross-validation" if repeat == 0 else f"cross-validation of {order[-1]!r} on partition {repeat + 1}"
    for i, rows in enumerate(folds):
        view = _split_view(fs, pool, rows)     # the same store, with the fold as its (unused) test split
        warnings.warn(f"{out}: {what}, fold {i + 1}/{len(folds)} ({len(rows)} held-out posts): training "
                      + ", ".join(p.name for p in presets), SgmftNote, stacklevel=4)
        at = np.searchsorted(pool, rows)
        fold_of[at] = i
        for p in presets:
            # a fold's data warnings describe its subset (the place whose one post is held out, a dozen
            # validation posts); the candidates' own runs warn about the store. Notes still pass.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SgmftWarning)
                warnings.simplefilter("default", SgmftNote)
                res = train_fn(view, _fold_dir(out, repeat, i) / p.name, p, overwrite=overwrite)
            raw[p.name][at] = collect_logits(load_checkpoint(res.checkpoint)[0], fs, rows)[0]
    y = np.asarray(fs.labels)[pool]
    where = f"out-of-fold predictions of {CV_FOLDS}-fold cross-validation on the training and validation posts"
    cals = {p.name: _oof_calibration(raw[p.name], y, t.calibration, where) for p in presets}
    crossfit = {p.name: cross_fitted_probs(raw[p.name], y, fold_of, t.calibration) for p in presets}
    logp = {n: pooled_logits([crossfit[m] for m in n.split("+")]).numpy() for n in order}        # eq E1
    logits = {n: raw[n] if "+" not in n else logp[n] for n in order}
    return CrossValidation(logits, y, cals, logp)


def cross_fitted_probs(logits: np.ndarray, labels: np.ndarray, fold_of: np.ndarray, method: str) -> torch.Tensor:
    """Calibrated probabilities of out-of-fold ``logits``, each fold's posts under the map fitted on the
    other folds' posts (:func:`_oof_calibration`), so no label calibrates its own post's probability."""
    from sgmft.models.output import calibrated_probs

    p = torch.zeros(logits.shape, dtype=torch.float64)
    for i in np.unique(fold_of):
        c = _oof_calibration(logits[fold_of != i], labels[fold_of != i], method, "the other folds")
        p[fold_of == i] = calibrated_probs(torch.from_numpy(logits[fold_of == i]), c["temperature"],
                                           c["uniform_weight"])
    return p


def _split_view(fs, train_rows, test_rows):
    """The same store under another split: ``train_rows`` train (the run carves its validation split from
    them), ``test_rows`` test, every other row in no split."""
    view = copy.copy(fs)
    view.split = np.full(len(fs), "", dtype="<U5")
    view.split[train_rows], view.split[test_rows] = "train", "test"
    return view


def _oof_calibration(logits: np.ndarray, labels: np.ndarray, method: str, fitted_on: str) -> dict:
    """The calibration record fitted on out-of-fold ``logits``; the identity when calibration is off
    or there are fewer than MIN_VAL_POSTS posts."""
    from sgmft.train.calibrate import MIN_VAL_POSTS, calibration_record

    if method == "none" or len(labels) < MIN_VAL_POSTS:
        return {"method": "none", "temperature": 1.0, "uniform_weight": 0.0, "num_posts": len(labels),
                "reason": "calibration off" if method == "none" else
                f"{len(labels)} out-of-fold posts: too few to fit on (< {MIN_VAL_POSTS})"}
    return calibration_record(logits, labels, method, fitted_on)


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
    """``(chosen, comparisons, cross-validation record or None, the :class:`CrossValidation` or None)``:
    the one-standard-error rule on the validation split, or on cross-validation
    when that split is small (:func:`_use_cv`)."""
    split = np.load(RunDir(results[order[0]].run_dir).split, allow_pickle=True)
    if fs.labels is None or not _use_cv(fs, split):
        return (*choose(fs, results, order, presets[0].train), None, None)
    if overwrite:
        shutil.rmtree(out / "cv", ignore_errors=True)
    xv = _cross_validate(fs, out, presets, order, split, train_fn, overwrite)
    y = xv.labels
    correct = {n: z.argmax(1) == y for n, z in xv.logits.items()}
    chosen, duels = one_se_choice(correct, order)
    cv = {"folds": CV_FOLDS, "posts": int(len(y)), "folder": "cv",
          "reason": f"fewer than {CV_BELOW_VAL_POSTS} labelled validation posts",
          "accuracy": {n: round(float(c.mean()), 4) for n, c in correct.items()}}
    return chosen, duels, cv, xv


def _copy_chosen(run: RunDir, best: TrainResult) -> None:
    """``run.model``: a copy of the chosen candidate's checkpoint (a choice on the validation split)."""
    with atomic_dir(run.model) as tmp:
        for f in Path(best.checkpoint).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)


def _refits_on_all(p: Preset) -> bool:
    """A closed-form fit that reads no validation split (shrinkage LDA): refitted once on every pooled post
    instead of averaged over folds; nothing to early-stop, and each fold would see a fifth fewer posts."""
    cls = MODELS.get(p.model.arch)
    return bool(getattr(cls, "closed_form", False)) and not getattr(cls, "reads_validation", True)


def _committee_members(fs, out: Path, p: Preset, split, train_fn, overwrite: bool) -> list[tuple[str, Path]]:
    """``(name, checkpoint)`` of candidate ``p``'s part of the fold committee: its fold models of every
    partition (:data:`CV_REPEATS`), or for a fit that reads no validation split, one refit on all the training
    and validation posts (under ``cv/all/<preset>/``, no validation split carved)."""
    if not _refits_on_all(p):
        return [(f"{p.name}@fold-{i}" if r == 0 else f"{p.name}@repeat-{r}-fold-{i}", _fold_dir(out, r, i) / p.name
                 / "model") for r in range(CV_REPEATS) for i in range(CV_FOLDS)]
    split = np.asarray(split)
    pooled = np.flatnonzero(np.isin(split, ["train", "val"]) & (np.asarray(fs.labels) >= 0))
    view = _split_view(fs, pooled, np.flatnonzero(split == "test"))
    everything = copy.copy(p)
    everything.train = dataclasses.replace(p.train, val_fraction=0.0)
    res = train_fn(view, out / "cv" / "all" / p.name, everything, overwrite=overwrite)
    return [(f"{p.name}@all", Path(res.checkpoint))]


def extrapolated_temperature(t_one: float, t_r: float, r: int, members: int) -> float:
    """Eq E2: the committee temperature for ``members`` fold models, from the temperatures fitted to
    committees of 1 (``t_one``) and ``r`` (``t_r``) fold models that never saw the post, with the inverse
    temperature linear in 1 / m (a mean of m bagged members differs from their limit by a variance term of
    order 1 / m):

        beta(m) = beta_inf + c / m,   beta = 1 / T,   so   beta(M) = beta(1) - (beta(1) - beta(r)) (1 - 1/M) / (1 - 1/r)

    A non-positive extrapolation (never seen) keeps ``t_r``."""
    from sgmft.train.calibrate import clip_temperature

    b1, br = 1.0 / t_one, 1.0 / t_r
    beta = b1 - (b1 - br) * (1.0 - 1.0 / members) / (1.0 - 1.0 / r)
    return clip_temperature(1.0 / beta) if beta > 0 else t_r


def _committee_calibration(xvs: list, chosen: str, members: int, train: TrainConfig) -> dict:
    """The committee's own temperature, on top of its members' maps (eq E2, docs/design.md, "The default
    model", item 22). Each partition's cross-fitted out-of-fold probabilities of the chosen candidate are a
    committee of one fold model per post, their mean over the partitions one of ``len(xvs)``; the mean of
    calibrated members is less confident than it is right, the more so the more members (on the 16 small family
    D stores the five-model committee under a temperature fitted to one model was 7.0 points more accurate than
    confident on average; 1.7 with eq E2). A temperature is fitted to each and eq E2 extrapolates to ``members``."""
    from sgmft.models.ensemble import pooled_logits
    from sgmft.train.calibrate import MIN_VAL_POSTS, calibration_record, fit_temperature

    y, r = xvs[0].labels, len(xvs)
    if train.calibration == "none" or len(y) < MIN_VAL_POSTS:
        return {"method": "none", "temperature": 1.0, "reason": "the members' own calibrations only"}
    one = [xv.crossfit_logp[chosen] for xv in xvs]
    where = "cross-fitted out-of-fold predictions of the chosen candidate (each member calibrated on the other folds)"
    if r == 1:
        return calibration_record(one[0], y, "temperature", where)
    pooled = pooled_logits([torch.from_numpy(np.exp(lp)) for lp in one]).numpy()         # eq E1, r members
    rec = calibration_record(pooled, y, "temperature", f"{where}, of {r} partitions; their mean: a committee of {r}")
    t_one = fit_temperature(np.concatenate(one), np.tile(y, r))
    t = extrapolated_temperature(t_one, rec["temperature"], r, members)                  # eq E2
    return {**rec, "temperature": t, "temperature_by_members": {"1": t_one, str(r): rec["temperature"], str(members): t},
            "law": "eq E2: the inverse temperature linear in 1 / (number of members)",
            "val_stats_of": f"the committees of {r} fold models per post, before and at T({r})"}


def _refit_calibration(fs, out: Path, p: Preset, xv: "CrossValidation", oof: dict, split, train_fn,
                       overwrite: bool) -> dict:
    """A refit's calibration (eq E3, docs/design.md, "The default model", item 23). The out-of-fold map was fitted
    to fold models that saw four fifths of the pooled posts; the refit saw all of them, is more accurate and its
    logits are less inflated by estimation noise, so under that map it is less confident than it is right (by 7-10
    points on three 1,000-post stores). A closed-form fit is cheap, so the candidate is also fitted on each half
    of the pooled posts (``cv/halves/``), a temperature is fitted at both sizes, and the inverse temperature,
    linear in 1 / (training posts), is extrapolated to all of them:

        beta(n) = beta_inf + c / n,   so   beta(N) = beta(n_5) + (beta(n_5) - beta(n_2)) (1/N - 1/n_5) / (1/n_5 - 1/n_2)   (eq E3)

    with n_5 and n_2 the mean training posts of a fold model of the five folds and of the halves (a fold run
    carves its validation split; the refit does not). The out-of-fold map's temperature is scaled by T(N) / T(n_5)
    and its uniform weight kept. Without a fitted map (too few posts) the map is kept."""
    from sgmft.checkpoint import load_checkpoint
    from sgmft.train.calibrate import clip_temperature, collect_logits, fit_temperature

    if oof.get("method", "none") == "none":
        return oof
    t = p.train
    halves = cv_folds(split, fs.labels, fs.users, t.split, t.seed, k=2)
    pool = np.sort(np.concatenate(halves))
    logits, n_2 = np.zeros((len(pool), len(fs.label_names))), []
    for i, rows in enumerate(halves):
        res = train_fn(_split_view(fs, pool, rows), out / "cv" / "halves" / f"fold-{i}" / p.name, p, overwrite=overwrite)
        logits[np.searchsorted(pool, rows)] = collect_logits(load_checkpoint(res.checkpoint)[0], fs, rows)[0]
        n_2.append(_training_rows(res.run_dir))
    n_5 = np.mean([_training_rows(_fold_dir(out, 0, i) / p.name) for i in range(CV_FOLDS)])
    n, n_2 = float(len(pool)), float(np.mean(n_2))
    t_5, t_2 = fit_temperature(xv.logits[p.name], xv.labels), fit_temperature(logits, np.asarray(fs.labels)[pool])
    b5, b2 = 1.0 / t_5, 1.0 / t_2
    beta = b5 + (b5 - b2) * (1 / n - 1 / n_5) / (1 / n_5 - 1 / n_2) if n_2 < n_5 < n else b5          # eq E3
    t_n = clip_temperature(1.0 / beta) if beta > 0 else t_5
    return {**oof, "temperature": clip_temperature(oof["temperature"] * t_n / t_5),
            "temperature_by_training_posts": {str(round(n_2)): t_2, str(round(n_5)): t_5, str(round(n)): t_n},
            "law": "eq E3: the inverse temperature linear in 1 / (training posts)",
            "val_stats_of": "the out-of-fold predictions of the fold models, before and under the out-of-fold map"}


def _training_rows(run_dir) -> int:
    """How many posts a finished run trained on (its split's training rows)."""
    return int(np.count_nonzero(np.load(RunDir(Path(run_dir)).split, allow_pickle=True).astype(str) == "train"))


def _cross_validations(fs, out: Path, chosen: str, xv: CrossValidation, presets: list[Preset], split, train_fn,
                       overwrite: bool) -> list[CrossValidation]:
    """``xv`` and, when the chosen candidate keeps fold models, its cross-validation on the other partitions
    (:data:`CV_REPEATS`)."""
    by_name = {p.name: p for p in presets}
    parts = [by_name[n] for n in chosen.split("+")]
    if all(_refits_on_all(p) for p in parts):
        return [xv]
    order = list(dict.fromkeys([p.name for p in parts] + [chosen]))
    return [xv] + [_cross_validate(fs, out, parts, order, split, train_fn, overwrite, repeat=r)
                   for r in range(1, CV_REPEATS)]


def _member_calibration(xvs: list[CrossValidation], name: str, train: TrainConfig) -> dict:
    """Candidate ``name``'s map for its committee members: fitted on its out-of-fold logits of every partition."""
    if len(xvs) == 1:
        return xvs[0].calibrations[name]
    return _oof_calibration(np.concatenate([xv.logits[name] for xv in xvs]), np.tile(xvs[0].labels, len(xvs)),
                            train.calibration, f"out-of-fold predictions of {len(xvs)} partitions of {CV_FOLDS}-fold "
                            "cross-validation on the training and validation posts")


def _write_committee(run: RunDir, fs, out: Path, chosen: str, xv: CrossValidation, presets: list[Preset],
                     split, train_fn, overwrite: bool) -> dict:
    """``run.model`` after cross-validation: the committee of the chosen candidate, eq E1 over its fold models
    of every partition (:data:`CV_REPEATS`; a shrinkage LDA: one refit on all the pooled posts,
    :func:`_refits_on_all`), each with its candidate's calibration fitted on all its out-of-fold predictions,
    and one temperature on top (eq E2); an ensemble ``a+b`` gives each of a and b half the weight. Every labelled
    training and validation post trains the model, and the mean of models that each saw another part
    of the data varies less than one model (bagging; docs/design.md, "The default model", items 11 and 22).
    Returns run.json's ``selection.final``."""
    from sgmft.checkpoint import load_checkpoint, save_checkpoint
    from sgmft.models import build_model
    from sgmft.models.ensemble import ensemble_config

    by_name, t = {p.name: p for p in presets}, presets[0].train
    xvs = _cross_validations(fs, out, chosen, xv, presets, split, train_fn, overwrite)
    member_cal = {n: _member_calibration(xvs, n, t) for n in chosen.split("+")}
    parts = [_committee_members(fs, out, by_name[n], split, train_fn, overwrite) for n in chosen.split("+")]
    names, models, cfgs, cal, weights = [], [], [], [], []
    for n, part in zip(chosen.split("+"), parts):
        for name, ckpt in part:
            model, info = load_checkpoint(ckpt)
            names.append(name)
            models.append(model)
            cfgs.append(info["model_cfg"])
            cal.append(member_cal[n])
            weights.append(1.0 / (len(parts) * len(part)))
    if len(models) == 1:                # LDA alone: its refit, its temperature extrapolated to its size (eq E3)
        own = _refit_calibration(fs, out, by_name[chosen], xv, cal[0], split, train_fn, overwrite)
        save_checkpoint(run.model, models[0], cfgs[0], fs.label_names, fs.meta, t, preset=chosen, calibration=own)
    else:
        cfg = ensemble_config(fs.dim, len(fs.label_names), names, cfgs, cal,
                              weights if len(set(weights)) > 1 else None)
        committee = build_model(cfg)
        for member, trained in zip(committee.members, models):
            member.load_state_dict(trained.state_dict())
        committee.eval()
        own = _committee_calibration(xvs, chosen, max(len(part) for part in parts), t)
        save_checkpoint(run.model, committee, cfg, fs.label_names, fs.meta, t, preset=chosen, calibration=own)
    keys = ("method", "temperature", "num_posts", "fitted_on", "temperature_by_members", "temperature_by_training_posts",
            "law")
    return {"kind": "fold committee", "of": chosen, "partitions": len(xvs), "members": names,
            "weights": [round(w, 6) for w in weights], "calibration": {k: own[k] for k in keys if k in own},
            "member_calibration": {m: {k: c.get(k) for k in ("method", "temperature", "uniform_weight", "num_posts")}
                                   for m, c in member_cal.items()}}


def _assemble(fs, out: Path, name: str, results: dict, train: TrainConfig) -> TrainResult:
    """Candidate ``a+b``: the ensemble of the trained candidates a and b (eq E1', the logarithmic pool of
    their calibrated probabilities, models/ensemble.py), calibrated on the validation split like any run
    and written as one under ``candidates/<name>/``."""
    from sgmft.card import write_model_card
    from sgmft.checkpoint import load_checkpoint, save_checkpoint
    from sgmft.models import build_model
    from sgmft.models.ensemble import ensemble_config
    from sgmft.train.calibrate import collect_logits, fit_calibration, validation_rows

    t0, names = time.time(), name.split("+")
    loaded = [load_checkpoint(results[n].checkpoint) for n in names]
    cfg = ensemble_config(fs.dim, len(fs.label_names), names, [i["model_cfg"] for _, i in loaded],
                          [i["calibration"] for _, i in loaded], pool=CANDIDATE_POOL)
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


def _write_record(run: RunDir, best: TrainResult, selection: dict, head: dict, t0: float) -> None:
    """run.json, the split and the model card of the selecting run. A fold committee trained on every
    training and validation post, so its split has no validation posts left (``evaluate --split val``
    finds none), and its figure is the chosen candidate's cross-validated accuracy."""
    from sgmft.card import write_model_card
    from sgmft.checkpoint import load_checkpoint
    from sgmft.models.registry import model_view

    split = np.load(RunDir(best.run_dir).split, allow_pickle=True)
    chosen_run = RunDir(best.run_dir).read_run_json() or {}
    keys = ("store", "store_ids", "num_train", "num_val", "num_test", "best_epoch", "epochs_run", "model",
            "input_norm", "fit")
    record = {k: chosen_run[k] for k in keys if k in chosen_run}
    acc = best.best_val_acc
    if "final" in selection:
        split = np.where(split == "val", "train", split)
        record = {k: v for k, v in record.items() if k in ("store", "store_ids", "num_test")}
        record.update(num_train=int(np.count_nonzero(split == "train")), num_val=0,
                      model=model_view(load_checkpoint(run.model)[1]["model_cfg"]))
        acc = selection["cross_validation"]["accuracy"][selection["chosen"]]
    run.write_split(split)
    run.write_run_json({**head, **record, "chosen_preset": selection["chosen"], "best_val_acc": acc,
                        "selection": selection, "seconds": round(time.time() - t0, 2)})
    write_model_card(run.model)


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
    presets, order, skipped = _drop_repeats(presets, order, sized)
    inputs = fingerprint_inputs({"candidates": [{"name": p.name, "model": model_view(p.model)} for p in presets]
                                 + [{"name": n, "ensemble": n.split("+"), "pool": CANDIDATE_POOL}
                                    for n in order if "+" in n],
                                 "selection": {"cv_folds": CV_FOLDS, "cv_below_val_posts": CV_BELOW_VAL_POSTS,
                                               "cv_final": "fold_committee_lda_refit", "cv_repeats": CV_REPEATS,
                                               "cv_calibration": "cross_fitted",
                                               "committee_temperature": "extrapolated_e2",
                                               "refit_temperature": "extrapolated_e3"}},
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
        if "+" in name:                         # an ensemble of trained candidates (eq E1'): seconds, no training
            results[name] = _assemble(fs, out, name, results, presets[0].train)
    chosen, duels, cv, xv = _select(fs, out, presets, order, results, train_fn, overwrite)
    with RunLock(run):
        split = np.load(RunDir(results[order[0]].run_dir).split, allow_pickle=True)
        final = (_write_committee(run, fs, out, chosen, xv, presets, split, train_fn, overwrite) if cv
                 else _copy_chosen(run, results[chosen]))
        selection = {"chosen": chosen, "rule": RULE, "split": "cross-validation" if cv else "validation",
                     **({"cross_validation": cv, "final": final} if cv else {}), "comparisons": duels,
                     "candidates": {n: {"val_acc": r.best_val_acc, "seconds": round(r.seconds, 2),
                                        "run": f"candidates/{n}", **({"sized": sized[n]} if n in sized else {}),
                                        **({"ensemble_of": n.split("+")} if "+" in n else {})}
                                    for n, r in results.items()} | skipped}
        _write_record(run, results[chosen], selection, {"status": "complete", "fingerprint": fp,
                      "fingerprint_inputs": inputs, "preset": preset.name, "train": asdict(preset.train)}, t0)
    accs = cv["accuracy"] if cv else {n: r.best_val_acc or 0.0 for n, r in results.items()}
    warnings.warn(f"{out}: chose {chosen!r} ({'cross-validated' if cv else 'validation'} accuracy "
                  + ", ".join(f"{n} {a:.4f}" for n, a in accs.items())
                  + f"; rule: {RULE})", SgmftNote, stacklevel=3)
    return TrainResult(out, run.model, (cv["accuracy"][chosen] if cv else results[chosen].best_val_acc),
                       time.time() - t0)
