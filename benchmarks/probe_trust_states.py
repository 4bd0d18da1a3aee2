"""Where a TrustMix run loses against the oracle: each modality alone, and whether it sees a generic input.

A diagnostic, not a model choice (issue 17). For a finished TrustMix run (``trust``, ``trust_lda``,
``trust_mda``) on a SimFeat store with fine regimes, per regime of the run's test posts:

* ``full``: the model's accuracy;
* ``image_alone`` / ``text_alone``: its accuracy with the other modality masked out (absent: it then
  adds no evidence, ``models/trust.py``), so where only one modality shows the place, how well that
  modality's own evidence does;
* ``text_generic_wins`` / ``image_generic_wins``: the fraction of posts whose generic evidence
  (logsumexp of the J generic components, eq T1) is above the evidence for every place;
* ``p_text`` / ``p_image``: the mean state posterior of each modality (shows the place, generic,
  another place; eq T2's posterior summed over the other modality's states).

Prints one JSON document on stdout (a line per regime on stderr).

    sgmft simulate STORE --profile wide768
    sgmft train STORE --preset trust_mda --seed 0 --out RUN
    python benchmarks/probe_trust_states.py RUN STORE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def probe(run: Path, store: Path) -> dict:
    import torch

    from sgmft.features import FeatureStore
    from sgmft.predict import Predictor

    fs = FeatureStore.open(store)
    if fs.regime is None or fs.regime_names is None:
        raise SystemExit(f"{store}: has no regimes (a SimFeat store with fine regimes is needed)")
    pred = Predictor.load(run)
    model = pred.model
    if not hasattr(model, "ev_t"):
        raise SystemExit(f"{run}: is not a TrustMix run (preset trust, trust_lda or trust_mda)")
    test = np.flatnonzero(np.load(run / "split.npy", allow_pickle=True).astype(str) == "test")
    regime = np.asarray(fs.regime_names)[np.asarray(fs.regime)[test]]
    y = np.asarray(fs.labels)[test]
    text, image = np.asarray(fs.text)[test], np.asarray(fs.image)[test]
    on = np.ones(len(test), bool)
    with torch.inference_mode():       # one pass: fused = [l_t, lse g_t, l_v, lse g_v, state posterior]
        out = model(torch.as_tensor(text), torch.as_tensor(image))
    k, s = len(pred.label_names), model.n_states
    f = out.fused.numpy()
    top = {"full": out.logits.argmax(-1).numpy(),      # calibration keeps the argmax
           "image_alone": pred.predict_features(text, image, text_mask=~on, image_mask=on).probs.argmax(1),
           "text_alone": pred.predict_features(text, image, text_mask=on, image_mask=~on).probs.argmax(1)}
    wins = {"text_generic_wins": f[:, k] > f[:, :k].max(1),
            "image_generic_wins": f[:, 2 * k + 1] > f[:, k + 1:2 * k + 1].max(1)}
    post = f[:, 2 * k + 2:].reshape(-1, s, s)
    states = ["shows_place", "generic", "other_place"][:s]
    res = {}
    for g in dict.fromkeys(regime):
        m = regime == g
        res[g] = {"posts": int(m.sum()), **{n: float((p[m] == y[m]).mean()) for n, p in top.items()},
                  **{n: float(w[m].mean()) for n, w in wins.items()},
                  "p_text": dict(zip(states, post[m].sum(2).mean(0).round(4).tolist())),
                  "p_image": dict(zip(states, post[m].sum(1).mean(0).round(4).tolist()))}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished TrustMix run folder")
    ap.add_argument("store", type=Path, help="its SimFeat feature store")
    args = ap.parse_args(argv)
    doc = {"command": "python benchmarks/probe_trust_states.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "regimes": probe(args.run, args.store)}
    for g, r in doc["regimes"].items():
        print(f"{g:18s} n={r['posts']:5d} full {100 * r['full']:.1f} image alone {100 * r['image_alone']:.1f} "
              f"text alone {100 * r['text_alone']:.1f} generic wins: text {r['text_generic_wins']:.2f} "
              f"image {r['image_generic_wins']:.2f}", file=sys.stderr)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
