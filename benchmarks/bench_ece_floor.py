"""The sampling floor of ECE on a SimFeat test split: the ECE of the oracle's own posterior.

The oracle's p(y | latent) mixed with the label noise, (1 - eta) p + eta / K, is calibrated for the
observed labels by construction, so its ECE on the 3,400 test posts (the binning of ``sgmft evaluate``:
``sgmft.eval.metrics.calibration_metrics``, torchmetrics, 15 equal-width bins) is what a perfectly
calibrated model would measure there: sampling noise only.

    python benchmarks/bench_ece_floor.py                      # hetero and default
    python benchmarks/bench_ece_floor.py --profiles wide aniso
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from sgmft.data.simfeat import generate_simfeat, profile_config
from sgmft.eval.metrics import calibration_metrics


def oracle_ece(profile: str, mc_samples: int = 2000) -> dict:
    """The oracle posterior's calibration on the profile's test split (label noise mixed in)."""
    cfg = profile_config(profile, mc_samples=mc_samples)
    d = generate_simfeat(cfg)
    te = d.split == "test"
    k, eta = cfg.num_classes, cfg.label_noise
    p = (1 - eta) * d.oracle_posterior[te].astype(np.float64) + eta / k
    m = calibration_metrics(d.labels[te], p)
    return {"profile": profile, "test_posts": int(te.sum()), "ece": round(m["ece"], 4),
            "ece_bins": m["ece_bins"], "mean_confidence": round(m["mean_confidence"], 4),
            "accuracy": round(m["accuracy"], 4)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", nargs="+", default=["hetero", "default"], help="SimFeat profiles")
    ap.add_argument("--mc-samples", type=int, default=2000, help="Monte-Carlo samples of the oracle")
    args = ap.parse_args(argv)
    for prof in args.profiles:
        print(json.dumps(oracle_ece(prof, args.mc_samples)), flush=True)


if __name__ == "__main__":
    main()
