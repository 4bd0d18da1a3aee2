"""Refit a TrustMix run's fusion parameters with its evidence frozen: is `wide`'s conflict gap in them?

A diagnostic, not a model choice (issue 17). A finished TrustMix run has evidence networks (eq T0)
and fusion parameters: the state prior (eq T3), the conflict tables Q_m (eq T1'), the bias and the
gate (eq T4). This probe keeps the evidence as trained and fits only the fusion parameters again, by
the fused cross-entropy alone (no eq T5 auxiliary terms), on the training or the validation posts,
and reports accuracy per split and per regime of the test posts after every ``--report`` epochs.
If the default's shortfall on posts whose image shows another place (issue 17's regime bar) were
in the fusion parameters, a refit would close it without losing elsewhere.

Prints one JSON document on stdout (a line per report on stderr).

    python benchmarks/bench_hetero.py --profiles wide --seeds 0 --presets auto --workdir W
    python benchmarks/probe_fusion_refit.py W/run-wide-auto-0/candidates/trust_mda W/store-wide
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

TABLES = ("log_prior", "bias", "conflict_t", "conflict_v")
FUSION = TABLES + ("gate.", "proj_t.", "proj_v.")
SETTINGS = {"tables-on-train": ("train", TABLES), "fusion-on-train": ("train", FUSION),
            "prior-on-val": ("val", ("log_prior", "bias"))}


def _scores(model, data, regime_names) -> dict:
    import torch

    out = {}
    with torch.inference_mode():
        for s, (t, v, y, reg) in data.items():
            pred = model(t, v).logits.argmax(-1).numpy()
            out[s] = round(100 * float((pred == y.numpy()).mean()), 2)
            if s == "test":
                out["test_by_regime"] = {regime_names[r]: round(100 * float((pred[reg == r] == y.numpy()[reg == r]).mean()), 1)
                                         for r in np.unique(reg)}
    return out


def refit(model, data, fit_on: str, params: tuple, epochs: int, report: int, regime_names, lr: float, seed: int):
    import torch

    torch.manual_seed(seed)
    m = copy.deepcopy(model).eval()                      # no input dropout: the evidence stays as trained
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith(params))
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    t, v, y, _ = data[fit_on]
    trace = []
    for ep in range(1, epochs + 1):
        for b in torch.randperm(len(y)).split(1024):
            loss = torch.nn.functional.cross_entropy(m(t[b], v[b]).logits, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep % report == 0:
            trace.append({"epoch": ep, **_scores(m, data, regime_names)})
            print(f"[refit] {fit_on} {params}: {trace[-1]}", file=sys.stderr)
    return trace


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished TrustMix run (or an auto run's candidates/<preset>)")
    ap.add_argument("store", type=Path, help="its SimFeat store (fine regimes)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--report", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {list(SETTINGS)}")
    args = ap.parse_args(argv)
    import torch

    from sgmft.checkpoint import load_checkpoint
    from sgmft.features import FeatureStore

    torch.set_num_threads(1)
    model, _ = load_checkpoint(args.run / "model")
    if not hasattr(model, "ev_t"):
        raise SystemExit(f"{args.run}: is not a TrustMix run (preset trust, trust_lda or trust_mda)")
    fs = FeatureStore.open(args.store)
    split = np.load(args.run / "split.npy", allow_pickle=True).astype(str)
    text, image = np.asarray(fs.text), np.asarray(fs.image)
    labels, regime = np.asarray(fs.labels), np.asarray(fs.regime)
    data = {s: (torch.as_tensor(text[i]).float(), torch.as_tensor(image[i]).float(),
                torch.as_tensor(labels[i]).long(), regime[i])
            for s in ("train", "val", "test") for i in [np.flatnonzero(split == s)]}
    out = {"run": str(args.run), "store": str(args.store), "as_trained": _scores(model, data, fs.regime_names),
           "command": "python benchmarks/probe_fusion_refit.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"probe_fusion_refit.py: unknown --settings {unknown}; choose from {list(SETTINGS)}")
    for name in names:
        fit_on, params = SETTINGS[name]
        out[name] = {"fit_on": fit_on, "parameters": list(params),
                     "trace": refit(model, data, fit_on, params, args.epochs, args.report, fs.regime_names,
                                    args.lr, seed=0)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
