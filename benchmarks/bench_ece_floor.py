"""The sampling floor of ECE on a SimFeat test split: the ECE of the oracle's own posterior.

The oracle's p(y | latent) mixed with the label noise, (1 - eta) p + eta / K, is calibrated for the
observed labels by construction, so its ECE on the 3,400 test posts (15 equal-width bins, as in
``sgmft evaluate``) is what a perfectly calibrated model would measure there: sampling noise only.

    python benchmarks/bench_ece_floor.py
"""
import numpy as np, json
from sgmft.data.simfeat import generate_simfeat, profile_config
def ece(p, y, bins=15):
    conf = p.max(1); pred = p.argmax(1); hit = pred == y
    edges = np.linspace(0, 1, bins + 1); e = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any(): e += m.mean() * abs(hit[m].mean() - conf[m].mean())
    return e
for prof in ("hetero", "default"):
    cfg = profile_config(prof, mc_samples=2000)
    d = generate_simfeat(cfg); te = d.split == "test"
    K = cfg.num_classes; eta = cfg.label_noise
    p = (1 - eta) * d.oracle_posterior[te].astype(np.float64) + eta / K
    print(prof, "oracle ECE on the 3,400 test posts: %.4f" % ece(p, d.labels[te]))
