"""What the fold committee's temperature does on the test split (eq E2; docs/design.md, "The default model",
item 22), on finished `auto` runs that chose by cross-validation.

A small store's model is the committee of the chosen candidate's fold models of two partitions of the pooled
posts (train/select.py, ``CV_REPEATS``), with one temperature on top, extrapolated by eq E2 from the
temperatures fitted to committees of one and of two fold models that never saw the post (run.json
``selection.final.calibration.temperature_by_members``). Per run this script rebuilds, from the checkpoint's
own members and their maps, on the run's test posts:

* ``one partition, T(1)``: the five fold models of the first partition (and an LDA refit, if chosen) under the
  temperature fitted to one model per post: the committee as it was before item 22 (its member maps are now
  fitted on both partitions' out-of-fold predictions, so this is close to, not exactly, the old model);
* ``two partitions, T(1)`` and ``two partitions, T(2)``: all the fold models, under the temperature of a
  committee of one, and of two;
* ``two partitions, eq E2``: the model as saved (checked against its own output);
* ``fitted on test``: the same committee with the temperature fitted on the test posts themselves (in sample:
  what a temperature at best can do there, a reference, never a choice).

Each with the figures of ``sgmft evaluate`` (``calibration_metrics``): accuracy, mean confidence, their gap,
NLL, Brier and ECE (15 bins; on 200-500 test posts its sampling floor is large, so the NLL and the gap speak
more clearly: ``ece_floor`` is what a perfectly calibrated model with the saved model's probabilities would
measure on as many posts). The last JSON line holds the means over runs.

    python benchmarks/family_c.py --variants D0 D1 D2 D3 --sizes 1000 2500 --presets auto --workdir W ...
    python benchmarks/bench_committee_temperature.py W/*/auto --out benchmarks/results-bench_committee_temperature.json
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
from sgmft.train.calibrate import fit_temperature

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calibration_noise import _draw_labels  # noqa: E402  (labels drawn from the model's own probabilities)

FIELDS = ("accuracy", "mean_confidence", "nll", "brier", "ece")


def _store(run: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    return Path(json.loads((run / "run.json").read_text())["store"])


def _pooled(probs: list[torch.Tensor], names: list[str], keep) -> np.ndarray:
    """Eq E1 over the members ``keep`` selects, each part of ``a+b`` (the name before ``@``) half the weight."""
    parts: dict[str, list[torch.Tensor]] = {}
    for p, n in zip(probs, names):
        if keep(n):
            parts.setdefault(n.split("@")[0], []).append(p)
    means = [torch.stack(v).mean(0) for v in parts.values()]
    return pooled_logits(means).numpy()


def _scored(logp: np.ndarray, y: np.ndarray, t: float) -> dict:
    m = calibration_metrics(y, torch.softmax(torch.from_numpy(logp) / t, -1).numpy())
    out = {k: round(m[k], 5) for k in FIELDS}
    return {"temperature": round(t, 4), **out, "gap": round(m["accuracy"] - m["mean_confidence"], 5)}


def ece_floor(probs: np.ndarray, draws: int = 50, seed: int = 0) -> float:
    """The mean ECE that a perfectly calibrated model with these probabilities would measure on as many posts:
    labels drawn from ``probs`` themselves (the sampling floor of the ECE; bench_calibration_noise.py)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([calibration_metrics(_draw_labels(probs, rng), probs)["ece"] for _ in range(draws)]))


def measure(run: Path, store: str | None) -> dict | None:
    """The five committees above on ``run``'s test posts; None when the run kept no committee of two partitions."""
    info = json.loads((run / "run.json").read_text())
    final = (info.get("selection") or {}).get("final") or {}
    by = (final.get("calibration") or {}).get("temperature_by_members")
    if final.get("kind") != "fold committee" or not by:
        return None
    fs = FeatureStore.open(_store(run, store))
    split = np.load(run / "split.npy", allow_pickle=True)
    rows = np.flatnonzero((split == "test") & (np.asarray(fs.labels) >= 0))
    y = np.asarray(fs.labels)[rows]
    model, _ = load_checkpoint(run / "model")
    text, image = (torch.from_numpy(np.asarray(a[rows], dtype=np.float32)) for a in (fs.text, fs.image))
    with torch.no_grad():
        probs = [calibrated_probs(m(text, image).logits, t, e) for m, (t, e) in zip(model.members, model.cal)]
        saved = torch.softmax(model(text, image).logits / info["selection"]["final"]["calibration"]["temperature"], -1)
    names = final["members"]
    sizes = sorted(by, key=int)
    first = _pooled(probs, names, lambda n: "@repeat-" not in n)
    every = _pooled(probs, names, lambda n: True)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(every) / by[sizes[-1]], -1).numpy(), saved.numpy(),
                               atol=1e-5)                                       # the model is what is rebuilt
    return {"run": str(run), "of": final["of"], "test_posts": int(len(rows)), "temperature_by_members": by,
            "one partition, T(1)": _scored(first, y, by["1"]),
            "two partitions, T(1)": _scored(every, y, by["1"]),
            f"two partitions, T({sizes[1]})": _scored(every, y, by[sizes[1]]),
            "two partitions, eq E2": {**_scored(every, y, by[sizes[-1]]), "ece_floor": round(ece_floor(saved.numpy()), 5)},
            "fitted on test": _scored(every, y, fit_temperature(every, y))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished auto run folders")
    ap.add_argument("--store", help="the feature store (default: the one each run.json names)")
    ap.add_argument("--out", type=Path, help="write every row and the summary to this JSON file")
    a = ap.parse_args(argv)
    rows = [r for r in (measure(run, a.store) for run in a.runs) if r]
    for r in rows:
        print(json.dumps(r))
    if not rows:
        sys.exit("no run kept a fold committee of two partitions (auto on a store with < 500 validation posts)")
    keys = [k for k in rows[0] if isinstance(rows[0][k], dict) and "gap" in rows[0][k]]
    summary = {"runs": len(rows), "mean": {k: {f: round(float(np.mean([r[k][f] for r in rows])), 5)
                                               for f in (*FIELDS, "gap", "ece_floor") if f in rows[0][k]} for k in keys},
               "nll_below_one_partition_T1": {k: int(sum(r[k]["nll"] < r["one partition, T(1)"]["nll"] for r in rows))
                                              for k in keys}}
    print(json.dumps(summary))
    if a.out:
        a.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
