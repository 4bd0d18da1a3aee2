"""Train and evaluate a list of model rows over several seeds, and aggregate the results.

Shared by ``sgmft demo`` and ``sgmft experiments``.  Every (row, seed) run lives in
``<out>/runs/<row>/seed<k>/``; a finished run (its ``eval-test/metrics.json`` exists) is
skipped on re-run, so an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sgmft.atomic import write_text
from sgmft.config import Preset, apply_overrides, load_preset
from sgmft.runs import RunDir


@dataclass
class Row:
    """One line of a results table: a preset plus overrides."""

    name: str
    preset: str
    model: list[str] = field(default_factory=list)   # ModelConfig overrides "field=value"
    train: list[str] = field(default_factory=list)   # TrainConfig overrides
    label: str = ""                                  # display name (default: name)

    def resolve(self, seed: int, extra_train: list[str] | None = None) -> Preset:
        p = load_preset(self.preset)
        from sgmft.models.registry import apply_model_overrides   # checked against what the arch reads

        p.model = apply_model_overrides(p.model, self.model)
        p.train = apply_overrides(p.train, list(self.train) + list(extra_train or []) + [f"seed={seed}"])
        return p


def safe_name(name: str) -> str:
    """A row name as a file name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def seed_run(out_dir: Path, row_name: str, seed: int) -> RunDir:
    """The training run of one row and seed inside an experiment folder."""
    return RunDir(Path(out_dir) / "runs" / safe_name(row_name) / f"seed{seed}")


def run_one(row: Row, seed: int, store, out_dir: Path, *, extra_train=None, progress: bool = False,
            tsne_max_points: int = 1000) -> dict:
    from sgmft.eval.run import evaluate
    from sgmft.train import train

    run = seed_run(out_dir, row.name, seed)
    done = run.eval_dir("test") / "metrics.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    p = row.resolve(seed, extra_train)
    p.train = dataclasses.replace(p.train, progress=progress)
    t0 = time.time()
    train(store, run.root, p)
    secs = time.time() - t0
    m = evaluate(run.root, store, run.eval_dir("test"), tsne_max_points=tsne_max_points, seed=seed,
                 title=f"{row.label or row.name} (seed {seed})")
    m["train_seconds"] = round(secs, 1)
    write_text(done, json.dumps(m, indent=2))
    return m


def aggregate(results: dict[str, list[dict]]) -> list[dict]:
    """Mean and standard deviation (over seeds) of accuracy, macro-F1, accuracy / oracle and the
    ECE (15 bins) after and before calibration (``ece``, ``ece_before``)."""
    table = []
    for name, runs in results.items():
        row = {"row": name, "seeds": len(runs)}
        for r in runs:                              # evaluate's metrics.json: calibration.before.ece
            before = ((r.get("calibration") or {}).get("before") or {}).get("ece")
            if before is not None:
                r.setdefault("ece_before", before)
        for key in ("accuracy", "macro_f1", "accuracy_over_oracle", "train_seconds", "ece", "ece_before"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            if vals:
                row[f"{key}_mean"] = float(np.mean(vals))
                row[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        oracle = [r["oracle_accuracy"] for r in runs if r.get("oracle_accuracy") is not None]
        if oracle:
            row["oracle_accuracy"] = float(np.mean(oracle))
        table.append(row)
    return table


def simfeat_config(profile: str = "default", **overrides):
    """``profile_config(profile, **overrides)``, except that a profile's ``content_dim`` that does
    not fit a smaller ``dim`` given in ``overrides`` shrinks to ``dim // 4`` (smoke scales)."""
    from sgmft.data.simfeat import profile_config

    base = profile_config(profile)
    dim = overrides.get("dim", base.dim)
    if "content_dim" not in overrides and base.content_dim + 2 >= dim:
        overrides = {**overrides, "content_dim": max(1, dim // 4)}
    return profile_config(profile, **overrides)


def default_preset() -> str:
    """The package's default model (``sgmft.config.DEFAULT_PRESET``; ``"sgmft"`` before it existed)."""
    import sgmft.config

    return getattr(sgmft.config, "DEFAULT_PRESET", "sgmft")


def aggregate_regimes(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per row, per regime: mean (and ``accuracy_std`` over seeds) of the accuracy, the regime's
    test count and the oracle's accuracy there. Rows whose runs have no regimes are left out."""
    out: dict[str, dict] = {}
    for name, runs in results.items():
        regs = [r["accuracy_by_regime"] for r in runs if r.get("accuracy_by_regime")]
        if not regs:
            continue
        row = {}
        for reg in dict.fromkeys(k for r in regs for k in r):
            vals = [r[reg]["accuracy"] for r in regs if reg in r and r[reg]["accuracy"] is not None]
            first = next(r[reg] for r in regs if reg in r)
            row[reg] = {"n": first["n"], "accuracy": float(np.mean(vals)) if vals else None,
                        "accuracy_std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                        "oracle_accuracy": first.get("oracle_accuracy")}
        out[name] = row
    return out


def run_rows(rows: list[Row], store, out_dir, seeds=(0,), *, extra_train=None, progress: bool = False,
             tsne_max_points: int = 1000, on_result=None) -> tuple[list[dict], dict[str, list[dict]]]:
    out = Path(out_dir)
    results: dict[str, list[dict]] = {}
    for row in rows:
        for seed in seeds:
            m = run_one(row, seed, store, out, extra_train=extra_train, progress=progress,
                        tsne_max_points=tsne_max_points)
            results.setdefault(row.name, []).append(m)
            if on_result:
                on_result(row, seed, m)
    return aggregate(results), results


def format_table(table: list[dict], labels: dict[str, str] | None = None) -> str:
    """Markdown table: accuracy, macro-F1 (mean ± std, in %), accuracy / oracle and the ECE
    (15 equal-width bins) before and after temperature scaling."""
    labels = labels or {}
    has_oracle = any("accuracy_over_oracle_mean" in r for r in table)
    has_ece = any("ece_mean" in r for r in table)
    head = ("| model | seeds | accuracy (%) | macro-F1 (%) |" + (" acc / oracle |" if has_oracle else "")
            + (" ECE, 15 bins: before → after calibration |" if has_ece else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        def pm(key):
            if f"{key}_mean" not in r:
                return "n/a"
            if r.get("seeds", 0) < 2:             # one run: no spread to show
                return f"{100 * r[f'{key}_mean']:.2f}"
            return f"{100 * r[f'{key}_mean']:.2f} ± {100 * r[f'{key}_std']:.2f}"
        line = f"| {labels.get(r['row'], r['row'])} | {r['seeds']} | {pm('accuracy')} | {pm('macro_f1')} |"
        if has_oracle:
            line += (f" {r['accuracy_over_oracle_mean']:.3f} |" if "accuracy_over_oracle_mean" in r else " n/a |")
        if has_ece:
            before = f"{r['ece_before_mean']:.3f} → " if "ece_before_mean" in r else ""
            line += f" {before}{r['ece_mean']:.3f} |" if "ece_mean" in r else " n/a |"
        lines.append(line)
    return "\n".join(lines)
