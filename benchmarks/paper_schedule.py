"""The `paper` preset at the paper's schedule on SimFeat, with a per-epoch learning curve.

    python benchmarks/paper_schedule.py --out runs/paper-schedule/default              # 30 epochs
    python benchmarks/paper_schedule.py --out runs/paper-schedule/hetero --profile hetero
    python benchmarks/paper_schedule.py --out runs/paper-grid --grid --epochs 3         # scale x lr grid

The paper's schedule (section 4.2): 30 epochs, batch 20, Adam(1e-5, betas 0.9/0.99) on the
13,600 training posts of 17,000 (the SimFeat store's own 80/20 split), D = 1024, hence
680 steps an epoch and 20,400 steps.  As in the paper there is no validation set: every
training post is used, the curve is the test accuracy after each epoch, and the reported
result is the last epoch's (no model selection on test).

The run trains one epoch at a time through ``sgmft.train.train`` (which resumes from the
run's ``lightning/checkpoints/last.ckpt``), then scores the test split, and appends a row
to ``curve.csv`` (written atomically).  An interrupted run resumes where it stopped: re-run
the same command.  At the end it writes ``curve.png`` and ``summary.json`` (and prints the
summary as JSON; ``--summarise-only`` does that for the epochs so far).  ``--grid`` runs input scale {1, sqrt(D)} x lr {1e-5, 1e-4, 1e-3} at
``--epochs`` each, one sub-run per cell, and summarises the final test accuracies.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import time
from pathlib import Path

FIELDS = ["epoch", "steps", "train_loss", "train_acc", "test_acc", "epoch_seconds", "step_seconds"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_curve(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_curve(path: Path, rows: list[dict]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(rows)
    _write_atomic(path, buf.getvalue())


def _last_train_metrics(run: Path) -> tuple[float, float]:
    """(train_loss, train_acc) of the last epoch from Lightning's metrics.csv."""
    rows = _read_curve(run / "lightning" / "metrics.csv")
    for r in reversed(rows):
        if r.get("train_acc"):
            return float(r["train_loss"]), float(r["train_acc"])
    return float("nan"), float("nan")


def ensure_store(path: Path, profile: str) -> Path:
    from sgmft.data.simfeat import profile_config, write_simfeat

    if not (path / "meta.json").exists():
        write_simfeat(path, profile_config(profile))
    return path


def run_schedule(store: Path, out: Path, epochs: int, input_scale, lr: float, seed: int) -> list[dict]:
    import numpy as np
    import torch

    from sgmft.config import load_preset
    from sgmft.features import FeatureStore
    from sgmft.predict import Predictor
    from sgmft.train.fit import train

    preset = load_preset("paper")
    fs = FeatureStore.open(store)
    # the paper preset is n = D (width-1 tokens) whatever the store's D
    model_cfg = dataclasses.replace(preset.model, input_scale=input_scale, n_tokens=fs.dim)
    out.mkdir(parents=True, exist_ok=True)
    curve_path = out / "curve.csv"
    rows = _read_curve(curve_path)
    if fs.split is None:
        raise ValueError(f"{store}: the study needs the store's own train/test split")
    test = np.flatnonzero(np.asarray(fs.split) == "test")
    y_test = np.asarray(fs.labels)[test]
    n_train = int((np.asarray(fs.split) == "train").sum())
    steps_per_epoch = -(-n_train // preset.train.batch_size)
    run = out / "run"
    for epoch in range(len(rows) + 1, epochs + 1):
        t0 = time.time()
        train_cfg = dataclasses.replace(preset.train, epochs=epoch, val_fraction=0.0, progress=False,
                                        seed=seed, lr=lr)
        train(fs, run, preset=preset, model_cfg=model_cfg, train_cfg=train_cfg)
        seconds = time.time() - t0
        pred = Predictor.load(run)
        with torch.inference_mode():
            top = pred.predict_store(fs, test).top
        loss, acc = _last_train_metrics(run)
        rows.append({"epoch": epoch, "steps": epoch * steps_per_epoch, "train_loss": f"{loss:.6f}",
                     "train_acc": f"{acc:.6f}", "test_acc": f"{float(np.mean(top == y_test)):.6f}",
                     "epoch_seconds": f"{seconds:.1f}", "step_seconds": f"{seconds / steps_per_epoch:.4f}"})
        _write_curve(curve_path, rows)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str, chance: float, oracle: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ep = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ep, [float(r["test_acc"]) for r in rows], "o-", label="test accuracy")
    ax.plot(ep, [float(r["train_acc"]) for r in rows], "s--", label="train accuracy (epoch mean)")
    ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance (majority class)")
    if oracle:
        ax.axhline(oracle, color="green", lw=0.8, ls="-.", label="SimFeat oracle")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def summarise(store: Path, out: Path, rows: list[dict], profile: str, input_scale, lr: float) -> dict:
    import numpy as np

    from sgmft.features import FeatureStore

    fs = FeatureStore.open(store)
    split, labels = np.asarray(fs.split), np.asarray(fs.labels)
    test = labels[split == "test"]
    chance = float(np.bincount(test).max() / len(test))
    oracle = ((fs.meta.get("extra", {}).get("simfeat", {}) or {}).get("oracle") or {}).get("test_accuracy")
    secs = [float(r["epoch_seconds"]) for r in rows]
    steps = [int(r["steps"]) for r in rows]
    summary = {"profile": profile, "preset": "paper", "input_scale": input_scale, "lr": lr,
               "epochs": len(rows), "steps": steps[-1] if steps else 0,
               "train_posts": int((split == "train").sum()), "test_posts": int(len(test)),
               "last_epoch_test_acc": float(rows[-1]["test_acc"]) if rows else None,
               "best_epoch_test_acc": max((float(r["test_acc"]) for r in rows), default=None),
               "chance_majority": chance, "oracle_test_acc": oracle,
               # the 30 train() calls (steps, per-epoch restart and checkpoint); the per-epoch test
               # pass and the store's simulation are not in it
               "train_seconds": sum(secs),
               "mean_train_step_seconds": (sum(secs) / steps[-1]) if steps else None,
               "torch_threads": int(__import__("torch").get_num_threads())}
    if rows:
        plot(rows, out / "curve.png", f"paper preset, SimFeat {profile}, scale {input_scale}, lr {lr:g}",
             chance, oracle)
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--profile", default="default", help="SimFeat profile (default, hetero, ...)")
    ap.add_argument("--store", type=Path, help="feature store (default: OUT/store, simulated if absent)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--input-scale", default="1.0", help="1.0 (literal) or sqrt_dim")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--grid", action="store_true", help="input scale {1, sqrt(D)} x lr {1e-5, 1e-4, 1e-3}")
    ap.add_argument("--summarise-only", action="store_true",
                    help="write summary.json and curve.png from the epochs in curve.csv so far (no training)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.input_scale if args.input_scale == "sqrt_dim" else float(args.input_scale)
    store = ensure_store(args.store or args.out / "store", args.profile)
    if args.summarise_only:
        rows = _read_curve(args.out / "curve.csv")
        print(json.dumps(summarise(store, args.out, rows, args.profile, scale, args.lr), indent=2))
        return
    if not args.grid:
        rows = run_schedule(store, args.out, args.epochs, scale, args.lr, args.seed)
        print(json.dumps(summarise(store, args.out, rows, args.profile, scale, args.lr), indent=2))
        return
    cells = []
    # most informative cells first (each cell's summary is written as soon as it finishes)
    for cell_scale, lr in (("sqrt_dim", 1e-4), (1.0, 1e-3), ("sqrt_dim", 1e-3), (1.0, 1e-4),
                           ("sqrt_dim", 1e-5), (1.0, 1e-5)):
        cell = args.out / f"scale-{cell_scale}_lr-{lr:g}"
        rows = run_schedule(store, cell, args.epochs, cell_scale, lr, args.seed)
        cells.append(summarise(store, cell, rows, args.profile, cell_scale, lr))
        _write_atomic(args.out / "grid.json", json.dumps(cells, indent=2))
    print(json.dumps(cells, indent=2))


if __name__ == "__main__":
    main()
