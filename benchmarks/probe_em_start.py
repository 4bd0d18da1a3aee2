"""TrustMix's generative start alone (eq T6'), from each start of EM's generic themes (``theme_start``).

A diagnostic for docs/design.md, "EM's themes from a second start" (under "The default model", item 15). For a preset with ``init: em`` (``trust_lda``,
``trust_mda``) on a feature store, it builds the model, fits the input normalisation and the start on the
training split exactly as ``sgmft train`` does (seed 0 unless given), and scores the start *before any
gradient step* on the training, validation and test splits: accuracy (%) and cross-entropy, the fitted state
shares per modality (shows the place, generic, another place) and, on a SimFeat store, the test accuracy
per regime. It does this once per value of ``theme_start`` (``all``, ``unexplained``) and says which one
``best`` keeps (the higher validation accuracy, then the lower validation cross-entropy) and which one has
the lower training cross-entropy (item 15's rule, which item 16 replaced). On a SimFeat store with conflict
tables and fine regimes it also says how often each modality's strongest place evidence is the place that
modality shows on the test posts, for the start and for the exact likelihood (``identification``, as
``probe_conflict_tables.py`` reports it for a trained run). One JSON line on stdout.

    sgmft simulate STORE --profile wide768
    python benchmarks/probe_em_start.py STORE trust_mda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np


def _score(model, fs, rows, names) -> dict:
    import torch
    import torch.nn.functional as F

    def col(a):
        return None if a is None else torch.as_tensor(np.asarray(a)[rows])

    y = np.asarray(fs.labels)[rows]
    with torch.inference_mode():
        out = model(col(fs.text), col(fs.image), col(fs.text_mask), col(fs.image_mask))
    pred = out.logits.argmax(-1).numpy()
    res = {"accuracy": round(100 * float((pred == y).mean()), 2),
           "cross_entropy": round(float(F.cross_entropy(out.logits, torch.as_tensor(y))), 4)}
    if names is not None:
        g = names[np.asarray(fs.regime)[rows]]
        res["by_regime"] = {r: round(100 * float((pred[g == r] == y[g == r]).mean()), 1) for r in dict.fromkeys(g)}
    return res


def probe(store: str, preset: str, seed: int, extra: dict | None = None) -> dict:
    import torch

    from sgmft.config import load_preset
    from sgmft.data.splits import resolve_split
    from sgmft.features import FeatureStore
    from sgmft.models import build_model
    from sgmft.models.registry import resolve_model
    from sgmft.models.input_norm import fit_input_norm
    from sgmft.train.fit import _rows_batch

    fs, p = FeatureStore.open(store), load_preset(preset)
    if p.model.extra.get("init") != "em":
        raise SystemExit(f"preset {preset}: has no EM start (init: em); try trust_lda or trust_mda")
    split = resolve_split(fs.split, np.asarray(fs.labels), fs.users, mode=p.train.split,
                          test_fraction=p.train.test_fraction, val_fraction=p.train.val_fraction, seed=seed)
    rows = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    names = np.asarray(fs.regime_names) if fs.regime is not None and fs.regime_names is not None else None
    world = _world_or_none(fs)
    doc = {"store": store, "preset": preset, "seed": seed, **({"extra": extra} if extra else {})}
    for start in ("all", "unexplained"):
        cfg = dataclasses.replace(p.model, dim=fs.dim, num_classes=len(fs.label_names))
        cfg = resolve_model(dataclasses.replace(cfg, extra={**cfg.extra, **(extra or {}), "theme_start": start}),
                             where=preset)
        torch.manual_seed(seed)
        model = build_model(cfg)
        fit_input_norm(model, fs, rows["train"])
        t0 = time.time()
        info = model.init_from_data(_rows_batch(fs, rows["train"]), seed=seed)
        model.eval()
        doc[start] = {"start_seconds": round(time.time() - t0, 1),
                      "state_shares": {m: info[m].get("state_shares") for m in ("text", "image")},
                      **{s: _score(model, fs, r, names if s == "test" else None) for s, r in rows.items()}}
        if world is not None:
            doc[start]["identification"] = _identify(model, fs, rows["test"], world)
    return _keeps(doc)


def _world_or_none(fs):
    """The generator drawn again (``probe_conflict_tables._world``) for a SimFeat store with conflict tables and
    fine regimes, else None."""
    from probe_conflict_tables import _world

    sim = fs.meta.get("extra", {}).get("simfeat", {}).get("config", {})
    if not sim.get("conflict_concentration") or not sim.get("fine_regimes"):
        return None
    return _world(fs.path)


def _identify(model, fs, test, world) -> dict:
    """``probe_conflict_tables._identification`` of the start on the test posts."""
    from probe_conflict_tables import _evidence, _identification

    cfg, gen, comp_t, comp_i = world
    text, image = np.asarray(fs.text)[test], np.asarray(fs.image)[test]
    ev, _ = _evidence(model, text, image)
    return _identification(cfg, gen, ev, text, image, comp_t[test], comp_i[test])


def _keeps(doc: dict) -> dict:
    """Add which start ``best`` keeps (TrustMix._choose_start's rule) and which one fits the training posts better."""
    starts = ("all", "unexplained")
    doc["best_keeps"] = min(starts, key=lambda s: (-doc[s]["val"]["accuracy"], doc[s]["val"]["cross_entropy"]))
    doc["lower_training_cross_entropy"] = min(starts, key=lambda s: doc[s]["train"]["cross_entropy"])
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="a feature store (sgmft simulate, sgmft extract)")
    ap.add_argument("preset", help="a preset with init: em (trust_lda, trust_mda)")
    ap.add_argument("--seed", type=int, default=0, help="the training seed (split and start), as sgmft train --seed")
    ap.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                    help="model options over the preset's (e.g. generic=16), as sgmft train --set model.extra.KEY=VALUE")
    args = ap.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.extra)
    extra = {k: int(v) if v.isdigit() else v for k, v in extra.items()}
    print(json.dumps(probe(args.store, args.preset, args.seed, extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
