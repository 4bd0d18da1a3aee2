"""Training-step time of the `paper` preset with fresh vs trained weights, on real store batches.

    python benchmarks/bench_trained_step.py --run runs/paper-schedule/default/run \
        --store runs/paper-schedule/default/store --limit-factors 1,4

The moment kernel's cost depends on the weights: |c| x key range sets the bins it needs
(docs/benchmarks.md, "Trained weights cost more than fresh ones"). This script takes a run of
`benchmarks/paper_schedule.py` (any epoch), builds the preset with the preset's initial weights
and with the run's weights, and times full training steps (forward, cross-entropy, backward,
fused Adam) on the store's first training batches. ``--limit-factors`` scales the kernel's
fallback limit (``default_max_bins``; 1 = this commit's default, 0.25 = the old n / K) so the
fallback's cost can be measured in the same run. It also reports, per moment-kernel call,
the equal-width bins the bound needs and the share of samples sent to the fused kernel.
Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a paper-schedule run folder (with model/model.safetensors)")
    ap.add_argument("--store", required=True, help="its feature store")
    ap.add_argument("--steps", type=int, default=9, help="timed steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-factors", default="1", help="comma-separated multipliers of default_max_bins")
    args = ap.parse_args()

    import numpy as np
    import torch
    from safetensors.torch import load_file

    import sgmft.models.moments as moments
    from sgmft.config import load_preset
    from sgmft.features import FeatureStore
    from sgmft.models import build_model

    torch.set_num_threads(args.threads)
    fs = FeatureStore.open(args.store)
    preset = load_preset("paper")
    cfg = dataclasses.replace(preset.model, attn_impl="moments", n_tokens=fs.dim)
    rows = np.flatnonzero(np.asarray(fs.split) == "train")[: (args.steps + 1) * args.batch]
    t = torch.as_tensor(np.asarray(fs.text[rows]), dtype=torch.float32)
    i = torch.as_tensor(np.asarray(fs.image[rows]), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(fs.labels[rows])).long()
    trained_sd = load_file(f"{args.run}/model/model.safetensors")

    base_limit = moments.default_max_bins
    calls: list[tuple] = []
    mix = moments.moments_softmax_mix

    def spy(c, k, v, max_bins=None, token=None):   # keeps the inputs; the statistics wait for the timing
        limit = moments.default_max_bins(k.shape[-1]) if max_bins is None else max_bins
        calls.append((c.detach(), k.detach(), limit))
        return mix(c, k, v, max_bins, token)

    def call_stats() -> tuple[float, float]:
        """(most bins any call needed, largest share of a call's samples sent to the fused kernel)."""
        needs = [(moments.bins_needed(c, k), limit) for c, k, limit in calls]
        return (max((float(n.max()) for n, _ in needs), default=0.0),
                max((float((n > limit).float().mean()) for n, limit in needs), default=0.0))

    moments.moments_softmax_mix = spy

    def time_steps(model) -> float:
        opt = torch.optim.Adam(model.parameters(), lr=preset.train.lr, betas=preset.train.betas, fused=True)
        model.train()
        times = []
        for s in range(args.steps + 1):
            sl = slice(s * args.batch, (s + 1) * args.batch)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(t[sl], i[sl]).logits, y[sl]).backward()
            opt.step()
            if s:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out = {"run": str(args.run), "threads": args.threads, "batch": args.batch, "steps": args.steps, "results": {}}
    for f in [float(x) for x in args.limit_factors.split(",")]:
        moments.default_max_bins = lambda n, f=f: max(1, int(f * base_limit(n)))
        res = {}
        for name in ("fresh", "trained"):
            torch.manual_seed(0)
            model = build_model(cfg)
            if name == "trained":
                model.load_state_dict(trained_sd)
            calls.clear()
            res[f"{name}_step_s"] = time_steps(model)
            res[f"{name}_bins_needed_max"], res[f"{name}_fallback_share_max"] = call_stats()
        res["limit_bins_at_n"] = moments.default_max_bins(fs.dim)
        res["trained_over_fresh"] = res["trained_step_s"] / res["fresh_step_s"]
        out["results"][f"limit_x{f:g}"] = res
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
