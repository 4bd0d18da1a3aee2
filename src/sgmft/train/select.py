"""Selecting presets (``candidates:``, the default ``auto``): train each candidate preset on the same
split and keep one by the validation split (:data:`RULE`; docs/design.md, "The default model").

Users bring data whose shape nobody tuned for. No single head wins on every kind of data, so the
default trains a small set of candidates (TrustMix, TrustMix started from LDA, the shrinkage-LDA
bar) and chooses on the run's validation split, never the test split. The run folder is an
ordinary run: ``model/`` is a copy of the chosen candidate's checkpoint, ``split.npy`` the shared
split, and ``run.json`` says what was chosen and why (``selection``); the model card repeats it.
Each candidate is itself a complete, resumable run under ``candidates/<preset>/``.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sgmft.atomic import atomic_dir
from sgmft.config import Preset, TrainConfig, load_preset
from sgmft.errors import SgmftNote
from sgmft.models.registry import model_view, resolve_model
from sgmft.runs import RunDir, RunLock, fingerprint, fingerprint_inputs
from sgmft.train.result import TrainResult

__all__ = ["SHARED_TRAIN_FIELDS", "train_selected"]

RULE = ("the first candidate, unless a later one is more accurate on the validation split by more than one "
        "standard error of the paired per-post difference (the one-standard-error rule, in the candidates' order)")
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
    presets = [_candidate_preset(c, preset.train, base) for c in preset.candidates]
    sized = {}
    for p in presets:                           # each candidate's model, checked and resolved (issue 19)
        change = _fit_to_size(p, fs)
        if change:
            sized[p.name] = change
        p.model = resolve_model(p.model, where=f"preset {p.name}: model")
    inputs = fingerprint_inputs({"candidates": [{"name": p.name, "model": model_view(p.model)} for p in presets]},
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
        res = train_fn(fs, out / "candidates" / p.name, p, overwrite=overwrite)
        results[p.name] = res
    chosen, duels = choose(fs, results, [p.name for p in presets], presets[0].train)
    best = results[chosen]
    with RunLock(run):
        with atomic_dir(run.model) as tmp:
            for f in Path(best.checkpoint).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        shutil.copy2(RunDir(best.run_dir).split, run.split)
        chosen_run = RunDir(best.run_dir).read_run_json() or {}
        selection = {"chosen": chosen, "rule": RULE, "split": "validation", "comparisons": duels,
                     "candidates": {n: {"val_acc": r.best_val_acc, "seconds": round(r.seconds, 2),
                                        "run": f"candidates/{n}", **({"sized": sized[n]} if n in sized else {})}
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
    warnings.warn(f"{out}: chose {chosen!r} (validation accuracy "
                  + ", ".join(f"{n} {(r.best_val_acc or 0):.4f}" for n, r in results.items())
                  + f"; rule: {RULE})", SgmftNote, stacklevel=3)
    return TrainResult(out, run.model, best.best_val_acc, time.time() - t0)
