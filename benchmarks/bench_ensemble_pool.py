"""How `auto`'s assembled candidates should pool their members: the mean (eq E1) or the logarithmic
pool (eq E1'), on finished `auto` runs (docs/design.md, "The default model", item 15).

For every auto run given and every ensemble candidate ``a+b`` in its ``candidates/`` folder, the
members' calibrated probabilities on the run's validation and test posts are pooled both ways; each
pool gets its own post-hoc calibration fitted on the validation posts (the method the run used), and
the script prints, per run and pool, the calibrated negative log-likelihood on the validation posts
(what chooses, never the test split), and the test accuracy, ECE and NLL (``calibration_metrics``, the
figures of ``sgmft evaluate``). The last JSON line is the summary over runs.

    python benchmarks/bench_hetero.py --profiles wide768 wide hetero looks default aniso conflict \\
        --seeds 0 1 2 --presets auto --workdir W
    python benchmarks/bench_ensemble_pool.py W/run-*-auto-*
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sgmft.checkpoint import load_checkpoint
from sgmft.eval.metrics import calibration_metrics
from sgmft.features import FeatureStore
from sgmft.models.ensemble import pooled_logits
from sgmft.models.output import calibrated_probs
from sgmft.train.calibrate import calibration_record, collect_logits

POOLS = ("mean", "log_mean")


def _member_probs(run: Path, name: str, fs, rows) -> torch.Tensor:
    model, info = load_checkpoint(run / "candidates" / name / "model")
    cal = info.get("calibration") or {}
    logits = torch.from_numpy(collect_logits(model.eval(), fs, rows)[0])
    return calibrated_probs(logits, float(cal.get("temperature", 1.0)), float(cal.get("uniform_weight", 0.0)))


def compare(run: Path, ensemble: str, fs) -> dict:
    """Both pools of ``ensemble`` in auto run ``run``: validation NLL after calibration, test metrics."""
    split = np.load(run / "candidates" / ensemble / "split.npy", allow_pickle=True)
    labels = np.asarray(fs.labels)
    rows = {s: np.flatnonzero((split == s) & (labels >= 0)) for s in ("val", "test")}
    members = {s: [_member_probs(run, m, fs, r) for m in ensemble.split("+")] for s, r in rows.items()}
    method = json.loads((run / "candidates" / ensemble / "model" / "config.json").read_text()) \
        .get("calibration", {}).get("method", "temperature_uniform")
    out = {"run": str(run), "ensemble": ensemble, "calibration": method, "val_posts": int(len(rows["val"]))}
    for pool in POOLS:
        z = {s: pooled_logits(p, pool=pool).numpy() for s, p in members.items()}
        rec = calibration_record(z["val"], labels[rows["val"]], method, "validation posts")
        probs = {s: calibrated_probs(torch.from_numpy(v), rec["temperature"], rec["uniform_weight"]).numpy()
                 for s, v in z.items()}
        val = calibration_metrics(labels[rows["val"]], probs["val"])
        test = calibration_metrics(labels[rows["test"]], probs["test"])
        out[pool] = {"temperature": round(rec["temperature"], 4), "uniform_weight": round(rec["uniform_weight"], 4),
                     "val_nll": round(val["nll"], 5), "val_acc": round(val["accuracy"], 4),
                     "test_acc": round(test["accuracy"], 4), "test_ece": round(test["ece"], 4),
                     "test_nll": round(test["nll"], 5)}
    return out


def summary(rows: list[dict]) -> dict:
    out = {"runs": len({r["run"] for r in rows}), "ensembles": len(rows)}
    for ens in sorted({r["ensemble"] for r in rows}):
        sel = [r for r in rows if r["ensemble"] == ens]
        out[ens] = {pool: {k: round(float(np.mean([r[pool][k] for r in sel])), 5)
                           for k in ("val_nll", "val_acc", "test_acc", "test_ece", "test_nll")} for pool in POOLS}
        out[ens]["log_mean_lower_val_nll"] = f"{sum(r['log_mean']['val_nll'] < r['mean']['val_nll'] for r in sel)}" \
                                             f" of {len(sel)}"
        out[ens]["log_mean_lower_test_ece"] = f"{sum(r['log_mean']['test_ece'] < r['mean']['test_ece'] for r in sel)}" \
                                              f" of {len(sel)}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished auto run directories")
    ap.add_argument("--out", type=Path, help="also write every row and the summary here (JSON)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for run in a.runs:
        info = json.loads((run / "run.json").read_text())
        fs = FeatureStore.open(info["store"])
        for ens in sorted(p.name for p in (run / "candidates").iterdir() if "+" in p.name):
            rows.append(compare(run, ens, fs))
            print(json.dumps(rows[-1]), flush=True)
    s = summary(rows)
    print(json.dumps(s))
    if a.out:
        from sgmft.atomic import write_text
        write_text(a.out, json.dumps({"rows": rows, "summary": s}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
