"""How close to the SimFeat oracle, per kind of post, can any model estimated from a store's training posts come?

A diagnostic for issue 17's regime bar (every regime within 5 points of the oracle at paper scale). The
oracle knows the generator's parameters. This probe estimates every one of them from the training posts
of the store (all posts outside the test split), with every advantage a real model lacks: it is told
which regime each training post is in, which place or generic theme each modality shows, the number
of looks per place, and the generator's form. Per modality it fits the looks by mixture discriminant
analysis (``bench_estimation_ceiling.fit_mda``, the shrinkage chosen as TrustMix's start chooses it,
eq T6''), the themes as the means of the posts that show them, the look weights from the posts' nearest
looks; it counts the regime probabilities, each modality's chance of showing another place rather than
a theme, the conflict tables Q_m(c | y) (add-0.5) and the label prior. It then classifies the test posts
with the oracle's own formula (``sgmft.data.simfeat.oracle_posteriors``) on these estimates. What it
misses of the oracle is what estimation from this many posts costs: a bar above it asks more than the data
give. Prints one JSON document.

    sgmft simulate W/store-wide768 --profile wide768
    python benchmarks/probe_plugin_ceiling.py W/store-wide768
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_estimation_ceiling import fit_mda  # noqa: E402
from probe_conflict_tables import _counted, _world  # noqa: E402

COARSE = {"both": 0, "image_other_place": 1, "image_generic": 1, "text_other_place": 2, "text_generic": 2,
          "neither": 3}                       # the generator's regimes: both / text only / image only / neither


class _Estimated:
    """The attributes of ``simfeat._Model`` that ``oracle_posteriors`` reads, estimated (whitened space)."""

    def comp(self, modality: str) -> np.ndarray:
        return self.comps[modality]


def _modality(x, comp, train, k: int, looks: int, seed: int) -> dict:
    """Looks (MDA), themes, look weights and the whitener of one modality, from the training posts told their components."""
    from sgmft.models.trust import _cv_shrinkage

    place = train[comp[train] < k]
    delta = _cv_shrinkage(x[place], comp[place], seed=seed)[0]         # None: Ledoit-Wolf's
    centres, w = fit_mda(x[place], comp[place], k, looks, seed=seed, shrinkage=delta)
    z = x @ w
    d2 = ((z[place, None, :] - centres.reshape(k, looks, -1)[comp[place]]) ** 2).sum(-1)
    cnt = np.ones((k, looks))
    np.add.at(cnt, (comp[place], d2.argmin(1)), 1)
    gen_rows = train[comp[train] >= k]
    themes = np.stack([z[gen_rows[comp[gen_rows] == g]].mean(0) for g in np.unique(comp[gen_rows])])
    place_means = centres.reshape(k, looks, -1).mean(1)
    return {"z": z, "looks": centres.reshape(k, looks, -1), "log_w": np.log(cnt / cnt.sum(1, keepdims=True)),
            "comp": np.vstack([place_means, themes]), "shrinkage": delta, "themes": len(themes)}


def _estimate(cfg, fits: dict, comps: dict, y, fine, train):
    """(cfg with the estimated distractor chances and unit noise, the _Estimated model)."""
    k = cfg.num_classes
    coarse = np.array([COARSE[r] for r in fine])
    reg = np.bincount(coarse[train], minlength=4) + 1.0
    q = {}
    for m, idx in (("text", (2, 3)), ("image", (1, 3))):
        un = train[np.isin(coarse[train], idx)]
        q[m] = float(np.mean(comps[m][un] < k))
    est = _Estimated()
    est.comps = {m: fits[m]["comp"] for m in fits}
    est.looks = {m: fits[m]["looks"] for m in fits}
    est.log_look_w = {m: fits[m]["log_w"] for m in fits}
    dim = fits["text"]["z"].shape[1]
    est.precision = {m: np.eye(dim) for m in fits}
    est.log_conflict = {m: _counted(y[train], comps[m][train], fine[train], f"{m}_other_place", k, 0.5) for m in fits}
    g = {m: fits[m]["themes"] for m in fits}
    with np.errstate(divide="ignore"):
        est.log_uninf_text = np.log(np.r_[np.full(k, q["text"] / (k - 1)), np.full(g["text"], (1 - q["text"]) / g["text"])])
        est.log_uninf_image = np.log(np.r_[np.full(k, q["image"] / (k - 1)), np.full(g["image"], (1 - q["image"]) / g["image"])])
    est.log_regime = np.log(reg / reg.sum())
    est.prior = (np.bincount(y[train], minlength=k) + 1.0) / (len(train) + k)
    ecfg = dataclasses.replace(cfg, text_signal=1.0, image_signal=1.0, text_noise=1.0,
                               image_noise=1.0, text_distractor_prob=q["text"], image_distractor_prob=q["image"],
                               num_generic=g["text"])
    return ecfg, est, q


def probe(store: Path, seed: int = 0) -> dict:
    from sgmft.data import simfeat as S
    from sgmft.features import FeatureStore

    meta = json.loads((store / "meta.json").read_text())["extra"]["simfeat"]
    cfg, _, comp_t, comp_i = _world(store)           # the generator drawn again: what each modality shows
    if cfg.num_generic <= 0:
        raise SystemExit(f"{store}: this probe needs a SimFeat profile with generic themes")
    fs = FeatureStore.open(store)
    fine = np.asarray(fs.regime_names)[np.asarray(fs.regime)]
    y, split = np.asarray(fs.labels), np.asarray(fs.split).astype(str)
    train, test = np.flatnonzero(split != "test"), split == "test"
    comps, fits = {"text": comp_t, "image": comp_i}, {}
    for m, looks in (("text", cfg.text_looks), ("image", cfg.image_looks)):
        x = np.asarray(fs.text if m == "text" else fs.image, dtype=np.float64)
        x = (x - x[train].mean(0)) / x[train].std(0)
        fits[m] = _modality(x, comps[m], train, cfg.num_classes, looks, seed)
    ecfg, est, q = _estimate(cfg, fits, comps, y, fine, train)
    pred = S.oracle_posteriors(ecfg, est, fits["text"]["z"][test], fits["image"]["z"][test])["joint"].argmax(1)
    yt, ft = y[test], fine[test]
    return {"store": str(store), "profile": meta["config"].get("profile"), "training_posts": int(len(train)),
            "test_posts": int(test.sum()),
            "shrinkage": {m: fits[m]["shrinkage"] for m in fits}, "distractor_chance": q,
            "plugin": {"test": round(100 * float(np.mean(pred == yt)), 2),
                       **{r: round(100 * float(np.mean(pred[ft == r] == yt[ft == r])), 1) for r in cfg.regimes}},
            "oracle": {"test": round(100 * meta["oracle"]["test_accuracy"], 2),
                       **{r: round(100 * v, 1) for r, v in meta["oracle"]["test_accuracy_by_regime"].items()
                          if v is not None}}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stores", type=Path, nargs="+", help="SimFeat stores (fine regimes, conflict tables)")
    args = ap.parse_args(argv)
    t0 = time.time()
    out = {"command": "python benchmarks/probe_plugin_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "stores": [probe(s) for s in args.stores]}
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
