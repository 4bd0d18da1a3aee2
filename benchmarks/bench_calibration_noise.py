"""How much of a run's test ECE is the noise of its validation split? (issue 18)

A diagnostic, not a model choice. For each finished run in a ``bench_calibration.py --workdir``
folder (``run-<profile>-<preset>-<seed>`` beside ``store-<profile>``) it scores the calibration that
training fits (temperature + uniform weight, ``sgmft.train.calibrate.fit_temperature_uniform``,
on the run's validation posts) on the test posts, and three references:

* ``floor``: the sampling floor of ECE for a perfectly calibrated model with *this run's*
  confidences. Test labels are drawn from the run's own calibrated probabilities (so those
  probabilities are exactly right for them) and the ECE is measured on the same 3,400 posts,
  ``--draws`` times. Unlike ``bench_ece_floor.py`` (the oracle's sharper posterior), it has the
  spread of confidences a weaker model has.
* ``fitted_on_test``: the same two-parameter family fitted on the test posts themselves: the
  best that family can do there (in-sample, optimistic).
* ``bootstrap``: the validation posts resampled with replacement ``--resamples`` times, the
  calibration refitted on each and scored on the test posts: how far a validation split of this
  size moves the test ECE, and how often it lands above ``--bar``.

ECE is ``sgmft.eval.metrics.calibration_metrics`` (torchmetrics, 15 equal-width bins, L1), as in
``sgmft evaluate``. Prints one JSON document (and writes it with ``--out``).

    python benchmarks/bench_calibration.py --profiles hetero default --presets concat sgmft \\
        --seeds 0 1 2 --workdir W
    python benchmarks/bench_calibration_noise.py W --out FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _ece(labels: np.ndarray, probs: np.ndarray) -> float:
    from sgmft.eval.metrics import calibration_metrics

    return float(calibration_metrics(labels, probs)["ece"])


def _probs(logits: np.ndarray, t: float, eps: float) -> np.ndarray:
    import torch

    from sgmft.checkpoint import calibrated_probs

    return calibrated_probs(torch.as_tensor(logits, dtype=torch.float64), t, eps).numpy()


def _draw_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from that row's probabilities (inverse CDF)."""
    cum = np.cumsum(probs, axis=1)
    return np.minimum((rng.random(len(probs))[:, None] > cum).sum(1), probs.shape[1] - 1)


def _quantiles(xs: list[float]) -> dict:
    a = np.asarray(xs)
    return {"mean": float(a.mean()), "q10": float(np.quantile(a, 0.1)), "q50": float(np.quantile(a, 0.5)),
            "q90": float(np.quantile(a, 0.9))}


def diagnose(run: Path, fs, draws: int, resamples: int, bar: float, seed: int) -> dict:
    from sgmft.predict import Predictor
    from sgmft.train.calibrate import fit_temperature_uniform

    split = np.load(run / "split.npy", allow_pickle=True)
    val, test = np.flatnonzero(split == "val"), np.flatnonzero(split == "test")
    pred = Predictor.load(run / "model")
    zv, zt = (np.asarray(pred.predict_store(fs, r).logits) for r in (val, test))
    yv, yt = np.asarray(fs.labels[val]), np.asarray(fs.labels[test])
    rng = np.random.default_rng(seed)
    t, eps = fit_temperature_uniform(zv, yv)
    pt = _probs(zt, t, eps)
    t_test, eps_test = fit_temperature_uniform(zt, yt)
    floor = [_ece(_draw_labels(pt, rng), pt) for _ in range(draws)]
    boot = []
    for _ in range(resamples):
        i = rng.integers(0, len(val), len(val))
        boot.append(_ece(yt, _probs(zt, *fit_temperature_uniform(zv[i], yv[i]))))
    return {"val_posts": int(len(val)), "test_posts": int(len(test)),
            "val_accuracy": float((zv.argmax(1) == yv).mean()), "test_accuracy": float((zt.argmax(1) == yt).mean()),
            "test_mean_confidence": float(pt.max(1).mean()),
            "fitted_on_val": {"temperature": t, "uniform_weight": eps, "test_ece": _ece(yt, pt)},
            "fitted_on_test": {"temperature": t_test, "uniform_weight": eps_test,
                               "test_ece": _ece(yt, _probs(zt, t_test, eps_test))},
            "floor": _quantiles(floor),
            "bootstrap": {**_quantiles(boot), "fraction_above_bar": float(np.mean(np.asarray(boot) > bar))}}


def main(argv=None) -> int:
    from sgmft.features import FeatureStore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path, help="a bench_calibration.py --workdir folder")
    ap.add_argument("--runs", nargs="*", help="run folder names (default: every run-* with a model)")
    ap.add_argument("--draws", type=int, default=50, help="label draws for the floor")
    ap.add_argument("--resamples", type=int, default=50, help="bootstrap resamples of the validation posts")
    ap.add_argument("--bar", type=float, default=0.02, help="issue 18's ECE bar")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    args = ap.parse_args(argv)
    names = args.runs or sorted(p.name for p in args.workdir.glob("run-*") if (p / "model" / "config.json").is_file())
    if not names:
        raise SystemExit(f"no finished runs (run-*/model/config.json) in {args.workdir}")
    out = {"command": "python benchmarks/bench_calibration_noise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "ece_bins": 15, "bar": args.bar, "runs": {}}
    stores = {}
    for name in names:
        profile = name.split("-")[1]
        if profile not in stores:
            stores[profile] = FeatureStore.open(args.workdir / f"store-{profile}")
        fs = stores[profile]
        r = out["runs"][name] = diagnose(args.workdir / name, fs, args.draws, args.resamples, args.bar, args.seed)
        print(f"{name}: val acc {r['val_accuracy']:.4f} test acc {r['test_accuracy']:.4f} "
              f"ECE {r['fitted_on_val']['test_ece']:.4f} (fitted on test {r['fitted_on_test']['test_ece']:.4f}, "
              f"floor {r['floor']['mean']:.4f}, bootstrap {r['bootstrap']['q10']:.4f}-{r['bootstrap']['q90']:.4f}, "
              f"above {args.bar} in {r['bootstrap']['fraction_above_bar']:.0%})", file=sys.stderr, flush=True)
    text = json.dumps(out, indent=1)
    if args.out:
        from sgmft.atomic import write_text

        write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
