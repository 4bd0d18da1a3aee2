"""Training / inference throughput and peak memory of SG-MFT presets; JSON on stdout.

    python benchmarks/bench_train.py [--batch 20] [--steps 3] [--dim 1024] [--threads N]

For the ``paper`` preset (n = D = 1024, d = 1) it also times a straightforward
implementation of the same equations -- per-head softmax(QK^T/sqrt(d_h))V ("naive") and
torch's fused scaled_dot_product_attention ("sdpa"), each with the explicit n x n P^e --
on the same weights and batch, checks that outputs and gradients agree (relative 1e-5, in
float64; float32 logits are reported too),
and reports the speed ratio of our exact rank-one kernel to each.  Every configuration
runs in its own process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing as mp
import platform
import resource
import time


def _measure(q, preset: str, impl: str, batch: int, steps: int, dim: int, threads: int, check: bool):
    import torch

    from sgmft.config import load_preset
    from sgmft.models import build_model

    torch.set_num_threads(threads)
    p = load_preset(preset)
    n = min(p.model.n_tokens, dim)
    cfg = dataclasses.replace(p.model, dim=dim, n_tokens=n, attn_impl=impl, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=p.train.lr, betas=p.train.betas)
    g = torch.Generator().manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    result = {"preset": preset, "impl": impl, "n_tokens": n, "token_dim": cfg.token_dim, "batch": batch}

    if check:
        # Outputs + gradients on the initial weights, in float64: with the paper's raw
        # L2-normalised inputs many attention gradients are ~1e-10, below float32 resolution,
        # so only a float64 comparison can show that the two implementations agree.
        md = copy.deepcopy(model).double()
        out = md(text.double(), image.double())
        torch.nn.functional.cross_entropy(out.logits, y).backward()
        result["_logits"] = out.logits.detach().tolist()
        result["_grads"] = {k: v.grad.detach().flatten()[:4096].tolist()
                            for k, v in md.named_parameters() if v.grad is not None}
        del md, out
        with torch.no_grad():
            result["_logits32"] = model(text, image).logits.double().tolist()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(text, image).logits, y)
        loss.backward()
        opt.step()

    step()                                                    # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train_s = (time.perf_counter() - t0) / steps
    model.eval()
    with torch.inference_mode():
        model(text, image)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(text, image)
        infer_s = (time.perf_counter() - t0) / steps
    result.update({"train_step_s": train_s, "train_posts_per_s": batch / train_s,
                   "infer_batch_s": infer_s, "infer_posts_per_s": batch / infer_s,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    q.put(result)


def run(preset, impl, args, check=False) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(q, preset, impl, args.batch, args.steps, args.dim,
                                              args.threads, check))
    proc.start()
    res = q.get()
    proc.join()
    return res


def _max_rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-reference", action="store_true", help="only time our presets")
    args = ap.parse_args()

    out = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                       "torch": torch.__version__}, "batch": args.batch, "dim": args.dim, "runs": []}
    ours = run("paper", "auto", args, check=not args.skip_reference)
    rec = run("sgmft", "auto", args)
    out["runs"] += [ours, rec]
    if not args.skip_reference:
        for impl in ("naive", "sdpa"):
            ref = run("paper", impl, args, check=True)
            out["runs"].append(ref)
            rel_logits = _max_rel(ours["_logits"], ref["_logits"])
            rel_grads = max(_max_rel(ours["_grads"][k], ref["_grads"][k]) for k in ours["_grads"])
            rel32 = _max_rel(ours["_logits32"], ref["_logits32"])
            out[f"paper_vs_{impl}"] = {
                "train_step_ratio": ref["train_step_s"] / ours["train_step_s"],
                "inference_ratio": ref["infer_batch_s"] / ours["infer_batch_s"],
                "peak_rss_ratio": ref["peak_rss_mb"] / ours["peak_rss_mb"],
                "max_rel_diff_logits_f64": rel_logits, "max_rel_diff_grads_f64": rel_grads,
                "max_rel_diff_logits_f32": rel32,
                "outputs_match_1e-5": bool(rel_logits <= 1e-5 and rel_grads <= 1e-5),
            }
    for r in out["runs"]:
        r.pop("_logits", None)
        r.pop("_grads", None)
        r.pop("_logits32", None)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
