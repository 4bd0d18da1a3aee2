"""How far below the SimFeat oracle a correctly specified model must stay at a given training size.

The oracle (``sgmft.data.simfeat.oracle_posteriors``) knows the generator's exact parameters. A
model fitted on N posts does not. This script measures what *estimation* alone costs on one
modality, with every advantage a real model lacks: it is told which training posts show their
place in that modality (the generator's regime labels), and it has the generator's structure
(each place a mixture of looks with one shared covariance).

For each training size it fits, on one modality's features (``--modality``, the image by default) of the
posts in which it shows their place:

* ``lda``: scikit-learn's shrinkage LDA (one Gaussian per place, shared covariance);
* ``mda``: mixture discriminant analysis (Hastie & Tibshirani 1996) with the generator's number of
  the modality's looks per place: Ledoit-Wolf within-look covariance, k-means looks in its whitened space,
  three alternations;
* ``lda_cv``, ``mda_cv``: the same two with the shrinkage intensity that TrustMix's start chooses by
  cross-validation on the same training posts (``sgmft.models.trust._cv_shrinkage``, eq T6'';
  regularised discriminant analysis) instead of Ledoit-Wolf's;

and scores them on the test posts whose other modality is generic (only this one shows the place), against
the oracle on the same posts. Prints one JSON document.

    python benchmarks/bench_estimation_ceiling.py --profile wide768 --sizes 13600,68000
    python benchmarks/bench_estimation_ceiling.py --profile wide768 --sizes 13600 --modality text
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _whitener(r: np.ndarray, shrinkage: float | None = None) -> np.ndarray:
    from sklearn.covariance import ledoit_wolf

    if shrinkage is None:
        cov, _ = ledoit_wolf(r, assume_centered=True)
    else:
        s = r.T @ r / len(r)
        cov = (1 - shrinkage) * s + shrinkage * np.trace(s) / len(s) * np.eye(len(s))
    vals, vecs = np.linalg.eigh(cov)
    return (vecs / np.sqrt(np.maximum(vals, vals.max() * 1e-9))) @ vecs.T


def fit_mda(x: np.ndarray, y: np.ndarray, k: int, looks: int, seed: int = 0, rounds: int = 3,
            shrinkage: float | None = None):
    """Centres (K * looks, D) in the whitened space and the whitener W (D, D) (Ledoit-Wolf's shrinkage, or
    ``shrinkage``)."""
    from sklearn.cluster import KMeans

    r = x - np.stack([x[y == c].mean(0) for c in range(k)])[y]
    for _ in range(rounds):
        w = _whitener(r, shrinkage)
        z = x @ w
        cents, assign = [], np.zeros(len(z), int)
        for c in range(k):
            km = KMeans(looks, n_init=3, random_state=seed).fit(z[y == c])
            cents.append(km.cluster_centers_)
            assign[y == c] = c * looks + km.labels_
        centres = np.concatenate(cents)
        r = (z - centres[assign]) @ np.linalg.inv(w)
    return centres, w


def mda_predict(x: np.ndarray, centres: np.ndarray, w: np.ndarray, k: int, looks: int) -> np.ndarray:
    z = x @ w
    d2 = (z ** 2).sum(1)[:, None] - 2 * z @ centres.T + (centres ** 2).sum(1)[None]
    return (-d2).reshape(len(z), k, looks).max(-1).argmax(1)


def main(argv=None) -> int:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from sgmft.data.simfeat import generate_simfeat, profile_config
    from sgmft.models.trust import _cv_shrinkage

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="wide768")
    ap.add_argument("--sizes", default="13600,68000", help="training posts, comma-separated")
    ap.add_argument("--test-size", type=int, default=17000)
    ap.add_argument("--modality", choices=("image", "text"), default="image",
                    help="fit this modality; score the test posts whose other modality is generic")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    base = profile_config(args.profile)
    if "text_generic" not in base.regimes:
        raise SystemExit(f"profile {args.profile!r} has no fine regimes (text_generic); use one that has")
    cfg = profile_config(args.profile, num_posts=max(sizes) + args.test_size, test_size=args.test_size,
                         mc_samples=20_000)
    t0 = time.time()
    d = generate_simfeat(cfg)
    regime = np.asarray(d.regime).astype(str)
    train, test = np.flatnonzero(d.split != "test"), d.split == "test"
    other = "text" if args.modality == "image" else "image"
    informative = ("both", f"{other}_generic", f"{other}_other_place")   # this modality shows the post's place
    ev = test & (regime == f"{other}_generic")
    x = np.asarray(getattr(d, args.modality), dtype=np.float64)
    x = (x - x[train].mean(0)) / x[train].std(0)
    k, looks = cfg.num_classes, getattr(cfg, f"{args.modality}_looks")
    out = {"command": "python benchmarks/bench_estimation_ceiling.py " + " ".join(argv or sys.argv[1:]),
           "profile": args.profile, "modality": args.modality, f"{args.modality}_looks": looks,
           "test_posts_scored": int(ev.sum()),
           "oracle_on_them": d.oracle["test_accuracy_by_regime"][f"{other}_generic"], "sizes": {}}
    for n in sizes:
        rows = train[:n]
        rows = rows[np.isin(regime[rows], informative)]
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x[rows], d.labels[rows])
        centres, w = fit_mda(x[rows], d.labels[rows], k, looks)
        delta = _cv_shrinkage(x[rows], d.labels[rows], seed=0)[0]       # None: Ledoit-Wolf's is kept
        lda_cv = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=delta or "auto").fit(x[rows], d.labels[rows])
        centres_cv, w_cv = fit_mda(x[rows], d.labels[rows], k, looks, shrinkage=delta)
        out["sizes"][n] = {
            "lda": float((lda.predict(x[ev]) == d.labels[ev]).mean()),
            "mda": float((mda_predict(x[ev], centres, w, k, looks) == d.labels[ev]).mean()),
            "cv_shrinkage": delta,
            "lda_cv": float((lda_cv.predict(x[ev]) == d.labels[ev]).mean()),
            "mda_cv": float((mda_predict(x[ev], centres_cv, w_cv, k, looks) == d.labels[ev]).mean())}
        print(f"{n} training posts: {out['sizes'][n]}", file=sys.stderr, flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
