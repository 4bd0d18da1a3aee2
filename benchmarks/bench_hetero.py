"""Fusion models on SimFeat profiles, overall and per regime, against the Bayes oracle.

For each profile: generate SimFeat (``sgmft.data.simfeat.profile_config``), write the
feature store, train every preset with ``sgmft.train.train`` for each seed, predict the
test split with ``sgmft.predict.Predictor`` and score it overall and per regime (the
generator's own per-post regimes).  Prints one JSON document (and writes it with --out).

    python benchmarks/bench_hetero.py --profiles hetero default --seeds 0 1 2 \
        --presets trust concat sgmft text_only image_only --out benchmarks/results-bench_hetero.json

A preset may carry model overrides after ``@`` (``--presets trust_mda@label_noise=0.05``, several
joined by ``,``); the result is keyed by the whole spec. An ``auto`` run records the candidate it chose
(``chosen_preset``, from its run.json).
``--set key=value`` overrides SimFeatConfig fields (held-out variants of a profile);
``--train key=value`` overrides TrainConfig fields of every preset (e.g. epochs=3).
``--render RESULT.json`` prints the markdown tables of docs/design.md from a saved result;
``--merge A.json B.json --out C.json`` joins results run apart (seed 0, then seeds 1-2);
``--summary RESULT.json`` prints one row per profile with every preset;
``--acceptance RESULT.json`` prints issue 17's bars (default against the best other model, per regime).
Runs are sequential; each run's seconds are recorded (wall clock, shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np


def _parse_sets(items: list[str]) -> dict:
    import yaml
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _mean_sd(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def run_profile(profile: str, presets: list[str], seeds: list[int], workdir: Path, sets: dict,
                train_sets: list[str], log, reuse: bool = False) -> dict:
    from sgmft.config import apply_overrides
    from sgmft.data.simfeat import generate_simfeat, profile_config, write_simfeat
    from sgmft.features import FeatureStore
    from sgmft.predict import Predictor
    from sgmft.train import train

    cfg = profile_config(profile, **sets)
    t0 = time.time()
    data = generate_simfeat(cfg)
    gen_s = time.time() - t0
    store = workdir / f"store-{profile}"
    write_simfeat(store, cfg, overwrite=True)
    fs = FeatureStore.open(store)
    test = np.flatnonzero(data.split == "test")
    y, reg = data.labels[test], data.regime[test]
    names = list(cfg.regimes)
    oracle = data.oracle
    out = {"profile": profile, "config": asdict(cfg), "generate_seconds": round(gen_s, 2),
           "oracle": {"accuracy": oracle["test_accuracy"],
                      "text_only": oracle["text_only_test_accuracy"],
                      "image_only": oracle["image_only_test_accuracy"],
                      "by_regime": oracle["test_accuracy_by_regime"],
                      "regime_counts": oracle["test_regime_counts"]},
           "runs": {}, "summary": {}}
    log(f"[{profile}] oracle {oracle['test_accuracy']:.4f} (generated in {gen_s:.1f} s)")
    for preset in presets:
        runs = []
        for seed in seeds:
            p = _load_spec(preset)
            p.train = apply_overrides(p.train, [f"seed={seed}", "progress=false", *train_sets])
            run_dir = workdir / f"run-{profile}-{preset.replace('@', '_').replace(',', '_')}-{seed}"
            if not reuse:                                 # --reuse: train() keeps a finished run of this
                shutil.rmtree(run_dir, ignore_errors=True)   # store and config (its fingerprint), refuses others
            t1 = time.time()
            train(fs, run_dir, p)
            secs = time.time() - t1
            pred = Predictor.load(run_dir / "model").predict_store(fs, test).top
            hit = pred == y
            by = {r: (float(hit[reg == r].mean()) if np.any(reg == r) else None) for r in names}
            chosen = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("chosen_preset")
            runs.append({"seed": seed, "accuracy": float(hit.mean()), "by_regime": by,
                         "train_seconds": round(secs, 1), **({"chosen_preset": chosen} if chosen else {})})
            log(f"[{profile}] {preset} seed {seed}{f' (chose {chosen})' if chosen else ''}: {hit.mean():.4f} "
                f"({hit.mean() / oracle['test_accuracy']:.3f} of oracle) {secs:.0f} s  "
                + " ".join(f"{r}={v:.3f}" for r, v in by.items() if v is not None))
        out["runs"][preset] = runs
        out["summary"][preset] = summarise(runs, names, oracle["test_accuracy"])
    return out


def _load_spec(spec: str):
    """``name`` or ``name@key=value,key=value``: the preset with those model overrides (checked as
    ``sgmft train --set model.key=value`` checks them)."""
    from sgmft.config import load_preset
    from sgmft.models.registry import apply_model_overrides

    name, _, sets = spec.partition("@")
    p = load_preset(name)
    if sets:
        p.model = apply_model_overrides(p.model, [s.strip() for s in sets.split(",") if s.strip()])
    return p


def summarise(runs: list[dict], names, oracle_accuracy: float) -> dict:
    """Mean and sd over seeds: accuracy, fraction of the oracle, per regime, train seconds."""
    acc = [r["accuracy"] for r in runs]
    return {"accuracy": _mean_sd(acc),
            "over_oracle": _mean_sd([a / oracle_accuracy for a in acc]),
            "by_regime": {r: _mean_sd([x["by_regime"][r] for x in runs]) for r in names
                          if all(x["by_regime"].get(r) is not None for x in runs)},
            "train_seconds": _mean_sd([r["train_seconds"] for r in runs])}


def merge(paths: list[str]) -> dict:
    """One result from several (e.g. seed 0 and seeds 1-2 run apart): runs are joined per profile and
    preset by seed (a later file wins for the same seed); the oracle must agree; summaries are redone."""
    out: dict = {"merged_from": paths, "profiles": {}}
    for path in paths:
        res = json.loads(Path(path).read_text(encoding="utf-8"))
        for name, prof in res["profiles"].items():
            have = out["profiles"].setdefault(name, {**prof, "runs": {}, "summary": {}})
            if have["oracle"]["accuracy"] != prof["oracle"]["accuracy"]:
                raise SystemExit(f"{path}: profile {name!r} has another oracle (another data set); not merged")
            for preset, runs in prof["runs"].items():
                by_seed = {r["seed"]: r for r in have["runs"].get(preset, [])}
                by_seed.update({r["seed"]: r for r in runs})
                have["runs"][preset] = [by_seed[k] for k in sorted(by_seed)]
    for prof in out["profiles"].values():
        names = list(prof["oracle"]["regime_counts"])
        prof["summary"] = {p: summarise(runs, names, prof["oracle"]["accuracy"]) for p, runs in prof["runs"].items()}
    return out


def summary_table(result: dict, default: str = "auto") -> str:
    """One row per profile: the oracle, every preset's mean (± sd, with the number of seeds when they
    differ from the default's) and the default's margin over the best other preset."""
    presets = []
    for prof in result["profiles"].values():
        presets += [p for p in prof["summary"] if p not in presets and p != default]
    lines = ["| profile | oracle | **default** | / oracle | " + " | ".join(presets) + " | default − best other |",
             "|---|---|---|---|" + "---|" * (len(presets) + 1)]
    for name, prof in result["profiles"].items():
        summ = prof["summary"]
        if default not in summ:
            continue
        n0 = summ[default]["accuracy"]["n"]

        def cell(p):
            if p not in summ:
                return "-"
            a = summ[p]["accuracy"]
            seeds = "" if a["n"] == n0 else f" ({a['n']})"
            return f"{100 * a['mean']:.2f}" + (f" ± {100 * a['sd']:.2f}" if a["n"] > 1 else "") + seeds
        others = {p: summ[p]["accuracy"]["mean"] for p in presets if p in summ}
        best = max(others.values()) if others else float("nan")
        lines.append(f"| `{name}` | {100 * prof['oracle']['accuracy']:.2f} | **{cell(default)}** | "
                     f"{summ[default]['over_oracle']['mean']:.3f} | " + " | ".join(cell(p) for p in presets)
                     + f" | {100 * (summ[default]['accuracy']['mean'] - best):+.2f} |")
    return "\n".join(lines)


def acceptance(result: dict, default: str = "auto", band: float = 0.003, regime_band: float = 0.05) -> str:
    """Issue 17's bars per profile: the default's mean against the best other preset's, its fraction of
    the oracle, and its regimes more than ``regime_band`` below the oracle (except "neither" and regimes
    whose oracle is below 50 %)."""
    lines = ["| profile | seeds | default | best other | default − best | / oracle | regimes > 5 points below the oracle |",
             "|---|---|---|---|---|---|---|"]
    for name, prof in result["profiles"].items():
        summ, o = prof["summary"], prof["oracle"]
        if default not in summ:
            continue
        d = summ[default]["accuracy"]["mean"]
        others = {p: s["accuracy"]["mean"] for p, s in summ.items() if p != default}
        best = max(others, key=others.get) if others else None
        bad = [f"{r} {100 * s['mean']:.1f} vs {100 * o['by_regime'][r]:.1f}"
               for r, s in summ[default]["by_regime"].items()
               if r != "neither" and o["by_regime"][r] >= 0.5 and s["mean"] < o["by_regime"][r] - regime_band]
        lines.append(f"| `{name}` | {summ[default]['accuracy']['n']} | {100 * d:.2f} | "
                     + (f"{best} {100 * others[best]:.2f} | {100 * (d - others[best]):+.2f} | " if best else "- | - | ")
                     + f"{summ[default]['over_oracle']['mean']:.3f} | {'; '.join(bad) or 'none'} |")
    return "\n".join(lines)


def render(result: dict) -> str:
    """Markdown tables (accuracy %, mean +- sd) from a result JSON: overall and per regime."""
    lines = []
    for name, prof in result["profiles"].items():
        o = prof["oracle"]
        regimes = [r for r, n in o["regime_counts"].items() if n]
        lines += [f"### {name}", "",
                  "| model | accuracy (%) | / oracle | train s/run | "
                  + " | ".join(f"{r} ({o['regime_counts'][r]})" for r in regimes) + " |",
                  "|---|---|---|---|" + "---|" * len(regimes)]
        lines.append(f"| oracle | {100 * o['accuracy']:.2f} | 1 | - | "
                     + " | ".join(f"{100 * o['by_regime'][r]:.1f}" for r in regimes) + " |")
        order = sorted(prof["summary"], key=lambda p: p != "auto")          # the default first
        most = max(v["accuracy"]["n"] for v in prof["summary"].values())
        for preset in order:
            s = prof["summary"][preset]
            a, q, t = s["accuracy"], s["over_oracle"], s["train_seconds"]
            pm = (lambda sd: f" ± {100 * sd:.1f}") if a["n"] > 1 else (lambda sd: "")
            cells = [f"{100 * s['by_regime'][r]['mean']:.1f}{pm(s['by_regime'][r]['sd'])}" for r in regimes]
            seeds = f" ({a['n']} seed{'s' if a['n'] > 1 else ''})" if a["n"] != most else ""
            lines.append(f"| {Path(preset).stem}{seeds} | {100 * a['mean']:.2f}"
                         + (f" ± {100 * a['sd']:.2f}" if a["n"] > 1 else "") + " | "
                         f"{q['mean']:.3f} | {t['mean']:.0f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", nargs="+", default=["hetero", "default"])
    ap.add_argument("--presets", nargs="+", default=["trust", "concat", "sgmft", "text_only", "image_only"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="SimFeatConfig overrides")
    ap.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides")
    ap.add_argument("--workdir", help="keep stores and runs here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs in --workdir (same store and "
                    "configuration, e.g. from bench_calibration.py) instead of training them again")
    ap.add_argument("--out", help="also write the JSON here (atomically)")
    ap.add_argument("--render", metavar="JSON", help="print markdown tables of an earlier result and exit")
    ap.add_argument("--summary", metavar="JSON", help="print one row per profile (every preset) and exit")
    ap.add_argument("--acceptance", metavar="JSON", help="print issue 17's bars for an earlier result and exit")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="join earlier results (e.g. seed 0 and seeds 1-2) into one, print it (and --out) and exit")
    a = ap.parse_args(argv)
    if a.render:
        print(render(json.loads(Path(a.render).read_text(encoding="utf-8"))))
        return 0
    if a.summary:
        print(summary_table(json.loads(Path(a.summary).read_text(encoding="utf-8"))))
        return 0
    if a.acceptance:
        print(acceptance(json.loads(Path(a.acceptance).read_text(encoding="utf-8"))))
        return 0
    if a.merge:
        _emit(merge(a.merge), a.out)
        return 0
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir) if a.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = {"argv": sys.argv[1:] if argv is None else argv,
                  "torch_threads": __import__("torch").get_num_threads(),
                  "profiles": {p: run_profile(p, a.presets, a.seeds, work, _parse_sets(a.set), a.train, log,
                                               reuse=a.reuse)
                               for p in a.profiles}}
    result["seconds"] = round(time.time() - t0, 1)
    _emit(result, a.out)
    return 0


def _emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        tmp_out = Path(out).with_suffix(".json.tmp")
        tmp_out.write_text(text, encoding="utf-8")
        os.replace(tmp_out, out)


if __name__ == "__main__":
    sys.exit(main())
