"""Is a run's calibration error inherited from the validation posts that chose its epoch? (issue 18)

A diagnostic, not a model choice: for each finished run in a ``bench_calibration.py --workdir``
folder, the test split is cut in two fixed halves A and B. The calibration (temperature +
uniform, ``sgmft.train.calibrate.fit_temperature_uniform``) is fitted once on the run's
validation posts, as training does, and once on half A; both are scored on half B. It also
prints the kept weights' accuracy on validation and on the test halves: a validation
accuracy above the test accuracy is the flattery of the posts that chose the epoch.
Nothing here is used to pick or tune a model (docs/predict.md, "Calibrating on posts that
chose nothing").

    python benchmarks/bench_calibration.py --profiles hetero default --presets concat sgmft \\
        --seeds 0 1 2 --workdir W
    python benchmarks/calibration_selection_diagnostic.py W --out FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def diagnose(run: Path, fs) -> dict:
    import torch

    from sgmft.checkpoint import calibrated_probs
    from sgmft.eval.metrics import calibration_metrics
    from sgmft.predict import Predictor
    from sgmft.train.calibrate import fit_temperature_uniform

    test = fs.indices("test")
    perm = np.random.default_rng(0).permutation(len(test))
    rows = {"val": np.flatnonzero(np.load(run / "split.npy", allow_pickle=True) == "val"),
            "A": test[perm[: len(test) // 2]], "B": test[perm[len(test) // 2:]]}
    pred = Predictor.load(run / "model")
    z = {k: pred.predict_store(fs, r).logits for k, r in rows.items()}
    y = {k: np.asarray(fs.labels[r]) for k, r in rows.items()}
    out = {"run": run.name, "accuracy": {k: round(float((z[k].argmax(1) == y[k]).mean()), 4) for k in z}}
    for name, part in (("fitted_on_val", "val"), ("fitted_on_test_half_A", "A")):
        t, eps = fit_temperature_uniform(z[part], y[part])
        p = calibrated_probs(torch.as_tensor(z["B"], dtype=torch.float64), t, eps).numpy()
        out[name] = {"temperature": round(t, 3), "uniform_weight": round(eps, 3),
                     "ece_on_half_B": round(calibration_metrics(y["B"], p)["ece"], 4),
                     "mean_confidence_on_half_B": round(float(p.max(1).mean()), 4)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", help="a bench_calibration.py --workdir folder (store-<profile>, run-<profile>-...)")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    from sgmft.features import FeatureStore

    root, res = Path(a.workdir), []
    for run in sorted(root.glob("run-*")):
        if not (run / "model").is_dir():
            continue
        r = diagnose(run, FeatureStore.open(root / f"store-{run.name.split('-')[1]}"))
        print(json.dumps(r), file=sys.stderr, flush=True)
        res.append(r)
    text = json.dumps({"command": "python benchmarks/calibration_selection_diagnostic.py " + a.workdir,
                       "runs": res}, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
