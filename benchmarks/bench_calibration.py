"""Calibration and per-post accounts on SimFeat profiles (issue 18), at the paper's scale.

For each profile: generate SimFeat (``sgmft.data.simfeat.profile_config``), write the feature
store, train every preset with ``sgmft.train.train`` (which fits the temperature on the
run's validation split) for each seed, predict the test split with
``sgmft.predict.Predictor`` and report, before (raw softmax) and after calibration (the
preset's ``train.calibration``, by default ``temperature_uniform``; ``--train
calibration=temperature`` for the one-scalar temperature of Guo et al. 2017):
accuracy, ECE (15 equal-width bins, L1; torchmetrics), NLL and Brier score, plus the fitted
temperature, the coverage at 95 % / 90 % accuracy (abstaining below a confidence), and how
often the per-post account (``explain=True``) names the informative modality on posts whose
regime has exactly one, classified correctly (``sgmft.eval.metrics.explanation_agreement``).
Prints one JSON document (and writes it with --out).

    python benchmarks/bench_calibration.py --profiles default hetero --seeds 0 \\
        --presets trust concat sgmft --out benchmarks/results-bench_calibration.json

Every run is also scored under both calibration methods, refitted on its validation rows
(``methods_refit_on_val``: the one-scalar ``temperature`` and ``temperature_uniform`` on the
same weights). ``--reuse`` scores the runs already in ``--workdir`` without training them again.
``--train key=value`` overrides TrainConfig fields of every preset (e.g. epochs=3);
``--set key=value`` SimFeatConfig fields. Runs are sequential on the machine's threads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np


def _mean_sd(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def compare_methods(pred, fs, val: np.ndarray, test: np.ndarray, y: np.ndarray) -> dict:
    """Both calibration methods refitted on the run's validation rows, scored on the test rows
    (the same trained weights, so the methods differ only in the calibration)."""
    import torch

    from sgmft.checkpoint import calibrated_probs
    from sgmft.eval.metrics import calibration_metrics
    from sgmft.train.calibrate import fit_temperature, fit_temperature_uniform

    zv = pred.predict_store(fs, val).logits
    zt = torch.as_tensor(pred.predict_store(fs, test).logits, dtype=torch.float64)
    yv = np.asarray(fs.labels[val])
    out = {}
    for name, (t, eps) in (("temperature", (fit_temperature(zv, yv), 0.0)),
                           ("temperature_uniform", fit_temperature_uniform(zv, yv))):
        m = calibration_metrics(y, calibrated_probs(zt, t, eps).numpy())
        out[name] = {"temperature": t, "uniform_weight": eps, **{k: m[k] for k in ("ece", "nll", "brier")}}
    pv = calibrated_probs(torch.as_tensor(zv, dtype=torch.float64), t, eps).numpy()
    pt = calibrated_probs(zt, t, eps).numpy()
    for name, f in _top_maps(pv, yv).items():   # tried, not adopted (docs/predict.md)
        m = calibration_metrics(y, _map_top(pt, f))
        out[name] = {k: m[k] for k in ("ece", "nll", "brier")}
    return out


def _top_maps(pv: np.ndarray, yv: np.ndarray) -> dict:
    """Two more flexible maps of the top confidence after temperature_uniform, fitted on the
    validation rows with scikit-learn: isotonic regression and Platt scaling of its log-odds."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    conf, hit = pv.max(1), (pv.argmax(1) == yv)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(conf, hit.astype(float))
    lo = lambda c: np.log(np.clip(c, 1e-9, 1 - 1e-9) / np.clip(1 - c, 1e-9, 1.0))[:, None]  # noqa: E731
    platt = LogisticRegression(C=1e6).fit(lo(conf), hit.astype(int))
    return {"temperature_uniform+isotonic_top": iso.predict,
            "temperature_uniform+platt_top": lambda c: platt.predict_proba(lo(c))[:, 1]}


def _map_top(p: np.ndarray, f) -> np.ndarray:
    """``p`` with its top probability replaced by ``f(top)`` and the others rescaled to sum to 1."""
    c, k = p.max(1), p.argmax(1)
    c2 = np.clip(f(c), 1e-6, 1 - 1e-6)
    q = p * ((1 - c2) / np.maximum(1 - c, 1e-12))[:, None]
    q[np.arange(len(p)), k] = c2
    return q


def score_run(pred, fs, test: np.ndarray, y: np.ndarray, regimes: np.ndarray) -> dict:
    """Calibration before/after, abstention and the accounts' agreement of one trained model."""
    import torch

    from sgmft.eval.metrics import calibration_metrics, coverage_at_accuracy, explanation_agreement, risk_coverage

    p = pred.predict_store(fs, test, explain=True)
    raw = torch.softmax(torch.as_tensor(p.logits, dtype=torch.float64), -1).numpy()
    before, after = calibration_metrics(y, raw), calibration_metrics(y, p.probs)
    curve = risk_coverage(y, p.probs)
    return {"temperature": pred.temperature, "uniform_weight": pred.uniform_weight,
            "method": (pred.info.get("calibration") or {}).get("method", "none"), "accuracy": after["accuracy"],
            "argmax_unchanged": bool(np.array_equal(raw.argmax(1), p.probs.argmax(1))),
            "before": {k: before[k] for k in ("ece", "nll", "brier", "mean_confidence")},
            "after": {k: after[k] for k in ("ece", "nll", "brier", "mean_confidence")},
            "coverage_at_95": coverage_at_accuracy(curve, 0.95)["coverage"],
            "coverage_at_90": coverage_at_accuracy(curve, 0.90)["coverage"],
            "account_agreement": explanation_agreement(regimes, p.top == y, p.explanations),
            "account_method": p.explanations[0]["method"] if p.explanations else None,
            "decided_by_counts": {k: sum(e["decided_by"] == k for e in p.explanations)
                                  for k in ("text", "image", "both", "neither")}}


def _summary(runs: list[dict]) -> dict:
    out = {"accuracy": _mean_sd([r["accuracy"] for r in runs]),
           "temperature": _mean_sd([r["temperature"] for r in runs]),
           "uniform_weight": _mean_sd([r["uniform_weight"] for r in runs])}
    for when in ("before", "after"):
        out[when] = {k: _mean_sd([r[when][k] for r in runs]) for k in ("ece", "nll", "brier")}
    fr = [r["account_agreement"]["fraction"] for r in runs if r["account_agreement"]["fraction"] is not None]
    out["account_agreement"] = _mean_sd(fr) if fr else None
    out["coverage_at_95"] = _mean_sd([r["coverage_at_95"] for r in runs])
    out["coverage_at_90"] = _mean_sd([r["coverage_at_90"] for r in runs])
    return out


def run_profile(profile: str, presets: list[str], seeds: list[int], workdir: Path, sets: dict,
                train_sets: list[str], log, reuse: bool = False) -> dict:
    from sgmft.config import apply_overrides, load_preset
    from sgmft.data.simfeat import generate_simfeat, profile_config, write_simfeat
    from sgmft.features import FeatureStore
    from sgmft.predict import Predictor
    from sgmft.train import train

    cfg = profile_config(profile, **sets)
    data = generate_simfeat(cfg)
    store = workdir / f"store-{profile}"
    write_simfeat(store, cfg, overwrite=True)
    fs = FeatureStore.open(store)
    test = np.flatnonzero(data.split == "test")
    y, reg = data.labels[test], data.regime[test]
    out = {"profile": profile, "config": asdict(cfg), "oracle_accuracy": data.oracle["test_accuracy"],
           "test_posts": int(len(test)), "runs": {}, "summary": {}}
    for preset in presets:
        runs = []
        for seed in seeds:
            p = load_preset(preset)
            p.train = apply_overrides(p.train, [f"seed={seed}", "progress=false", *train_sets])
            run_dir = workdir / f"run-{profile}-{preset}-{seed}"
            t1 = time.time()
            secs = None                                  # None: a reused run, not trained here
            if not (reuse and (run_dir / "model" / "config.json").is_file()):
                shutil.rmtree(run_dir, ignore_errors=True)
                train(fs, run_dir, p)
                secs = round(time.time() - t1, 1)
            pred = Predictor.load(run_dir / "model")
            val = np.flatnonzero(np.load(run_dir / "split.npy", allow_pickle=True) == "val")
            r = {"seed": seed, "train_seconds": secs, **score_run(pred, fs, test, y, reg),
                 "methods_refit_on_val": compare_methods(pred, fs, val, test, y)}
            runs.append(r)
            ag = r["account_agreement"]
            cmp = " ".join(f"{k} {v['ece']:.4f}" for k, v in r["methods_refit_on_val"].items())
            log(f"[{profile}] {preset} seed {seed}: test ECE by method ({cmp})")
            log(f"[{profile}] {preset} seed {seed}: acc {r['accuracy']:.4f} {r['method']} T {r['temperature']:.3f} "
                f"eps {r['uniform_weight']:.4f} "
                f"ECE {r['before']['ece']:.4f} -> {r['after']['ece']:.4f} NLL {r['before']['nll']:.4f} -> "
                f"{r['after']['nll']:.4f} account agreement {ag['fraction']} (n={ag['n']}) {secs} s")
        out["runs"][preset] = runs
        out["summary"][preset] = _summary(runs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", nargs="+", default=["default", "hetero"])
    ap.add_argument("--presets", nargs="+", default=["trust", "concat", "sgmft"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="SimFeatConfig overrides")
    ap.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides")
    ap.add_argument("--workdir", help="keep stores and runs here (default: a temporary folder)")
    ap.add_argument("--out", help="also write the JSON here (atomically)")
    ap.add_argument("--reuse", action="store_true", help="score the finished runs already in --workdir instead "
                                                           "of training them again (a store is regenerated)")
    a = ap.parse_args(argv)
    import yaml

    sets = {k.strip(): yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir) if a.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = {"argv": sys.argv[1:] if argv is None else argv,
                  "torch_threads": __import__("torch").get_num_threads(),
                  "ece_bins": 15, "ece_norm": "l1",
                  "profiles": {p: run_profile(p, a.presets, a.seeds, work, sets, a.train, log, a.reuse)
                               for p in a.profiles}}
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        from sgmft.atomic import write_text

        write_text(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
