"""Training-step speed of the `paper` preset's exact attention kernels, and their float64 agreement; JSON.

    python benchmarks/bench_train.py [--batch 20] [--dim 1024] [--rounds 3] [--threads N]

The `paper` preset (n = D = 1024 width-1 tokens, 8 heads) is built three times with the same
weights, differing only in ``attn_impl``:

* ``moments``  -- the exact moment kernel (sgmft.models.moments; what ``auto`` picks for d = 1);
* ``rank1``    -- the exact rank-one closed form on torch's fused kernel (sgmft.models.rank1);
* ``naive``    -- the textbook per-head softmax(Q K^T / sqrt(d_h)) V with explicit n x n matrices.

**Speed.**  One process; warm-up, then ``--rounds`` rounds, each timing one full training step
(forward, cross-entropy, backward, fused Adam as in training) of every kernel in turn (the
order rotates each round), so a busy shared machine slows all three alike; it reports the
median wall-clock and process-CPU step time per kernel and the ratios (with one thread the
CPU time is the figure least disturbed by other jobs on a shared machine).  The textbook step runs as micro-batches (``--naive-micro``, gradients
accumulated, then one Adam step: the same update) so its n x n matrices stay under ~3 GB;
its time is about linear in the batch.  Inference (one forward of the batch) is timed the same way.

**Agreement.**  Before timing, on ``--check-batch`` posts in float64 and the preset's raw
L2-normalised inputs: logits, the gradients of both inputs and of every parameter, moments vs
textbook (and rank1 vs textbook), per tensor as max|a-b|/max|b| and ||a-b||/||b||.  Key biases
cancel in the softmax (exact gradient 0; the textbook returns rounding noise, reported).  For
each parameter it also reports each side's own "ulp jitter": how far that implementation's
gradient moves when its weights are perturbed by one ulp (a stable implementation moves by
~1e-15; a large jitter means that implementation loses digits there).

**Which side is right.**  Where the two differ (SIM's attention parameters at the raw ~0.03
feature scale) float64 cannot say which is correct, so ``--hp-dim`` n (default 64) recomputes
those gradients with the textbook formula in 40-digit arithmetic (mpmath,
tests/hp_attention.py) on an n-token model and reports every implementation's error against
that reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import time

IMPLS = ("moments", "rank1", "naive")


def _models(dim: int, impls=IMPLS, dtype=None):
    import torch

    from sgmft.config import load_preset
    from sgmft.models import build_model

    p = load_preset("paper")
    base = dataclasses.replace(p.model, dim=dim, n_tokens=dim, dropout=0.0)
    out = {}
    for impl in impls:
        torch.manual_seed(0)
        out[impl] = build_model(dataclasses.replace(base, attn_impl=impl))
        if dtype is not None:
            out[impl] = out[impl].to(dtype)
    for impl in impls[1:]:
        out[impl].load_state_dict(out[impls[0]].state_dict())
    return out, p


def _inputs(batch: int, dim: int, seed: int = 1, dtype=None):
    import torch

    g = torch.Generator().manual_seed(seed)
    t = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    i = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    y = torch.randint(0, 8, (batch,), generator=g)
    if dtype is not None:
        t, i = t.to(dtype), i.to(dtype)
    return t, i, y


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _grads(model, t, i, y):
    import torch

    model.zero_grad(set_to_none=True)
    t, i = t.clone().requires_grad_(), i.clone().requires_grad_()
    out = model(t, i)
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    return {"logits": out.logits.detach(), "input_text": t.grad, "input_image": i.grad,
            **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def _norm_rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _ulp_jitter(model, t, i, y, ref, runs: int) -> dict:
    """Per tensor, how far the model's own float64 result moves when every weight is multiplied
    by (1 + 2^-52 * N(0,1)): the rounding sensitivity of that implementation (max over runs)."""
    import torch

    state = {k: v.clone() for k, v in model.state_dict().items()}
    jitter = dict.fromkeys(ref, 0.0)
    for s in range(runs):
        gen = torch.Generator().manual_seed(100 + s)
        model.load_state_dict({k: v * (1 + 2.0 ** -52 * torch.randn(v.shape, generator=gen, dtype=v.dtype))
                               for k, v in state.items()})
        for k, g in _grads(model, t, i, y).items():
            if k in jitter:
                jitter[k] = max(jitter[k], _rel(g, ref[k]))
    model.load_state_dict(state)
    return jitter


def check_float64(dim: int, batch: int, jitter_runs: int = 2) -> dict:
    """Every gradient of moments (and rank1) vs the textbook, in float64, with each side's
    own rounding sensitivity (ulp jitter) to show which one is ill-conditioned."""
    import torch

    models, _ = _models(dim, dtype=torch.float64)
    t, i, y = _inputs(batch, dim, seed=2, dtype=torch.float64)
    ref = _grads(models["naive"], t, i, y)
    jitter = {impl: _ulp_jitter(models[impl], t, i, y, _grads(models[impl], t, i, y), jitter_runs)
              for impl in ("naive", "moments")}
    res = {"dtype": "float64", "batch": batch, "n_tokens": dim, "inputs": "raw L2-normalised (paper scale)",
           "metrics": "rel = max|a-b| / max|b| per tensor; norm_rel = ||a-b|| / ||b|| per tensor (b = textbook); "
                      "ulp jitter = how far an implementation's own result moves under 1-ulp weight perturbations"}
    for impl in ("moments", "rank1"):
        ours = _grads(models[impl], t, i, y)
        per = {k: _rel(ours[k], ref[k]) for k in ours}
        cancelled = sorted(k for k in ref if k not in ours)
        above = {k: {"rel": per[k], "norm_rel": _norm_rel(ours[k], ref[k]),
                     "textbook_ulp_jitter": jitter["naive"][k], "moments_ulp_jitter": jitter["moments"][k]}
                 for k in per if per[k] > 1e-12}
        res[impl] = {
            "max_rel_logits": per["logits"],
            "max_rel_input_grads": max(per["input_text"], per["input_image"]),
            "max_rel_param_grads": max(v for k, v in per.items() if k not in ("logits", "input_text", "input_image")),
            "params_compared": len(per) - 3,
            "params_above_1e-12": above,
            "all_within_1e-12_or_10x_textbook_jitter": all(v <= max(1e-12, 10 * jitter["naive"][k]) for k, v in per.items()),
            "key_bias_params_absent": cancelled,
            "textbook_key_bias_grad_max": max((float(ref[k].abs().max()) for k in cancelled), default=0.0),
        }
    ours, other = _grads(models["moments"], t, i, y), _grads(models["rank1"], t, i, y)
    res["moments_vs_rank1_max_rel_any"] = max(_rel(ours[k], other[k]) for k in ours)   # the two exact forms
    res["textbook_ulp_jitter_max_excl_key_bias"] = max(v for k, v in jitter["naive"].items() if not k.endswith("k.bias"))
    res["moments_ulp_jitter_max"] = max(jitter["moments"].values())
    return res


def check_high_precision(dim: int, batch: int, dps: int = 40) -> dict:
    """Which side is right: every SIM attention parameter gradient (the only ones where moments
    and textbook differ beyond 1e-12) against a 40-digit mpmath evaluation of the textbook
    formula (tests/hp_attention.py), on a reduced size (the mpmath cost is O(H n^2 d_h))."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hp_attention import sim_attention_reference

    models, _ = _models(dim, dtype=torch.float64)
    t, i, y = _inputs(batch, dim, seed=2, dtype=torch.float64)
    t0 = time.perf_counter()
    ref = sim_attention_reference(models["moments"], t, i, y, dps)
    seconds = time.perf_counter() - t0
    out = {"n_tokens": dim, "batch": batch, "digits": dps, "reference_s": seconds,
           "params": sorted(k for k in ref if not k.endswith("k.bias")), "per_impl": {}}
    for impl, model in models.items():
        g = _grads(model, t, i, y)
        per = {k: {"rel": _rel(g[k], ref[k]), "norm_rel": _norm_rel(g[k], ref[k])} for k in out["params"]}
        worst = max(per, key=lambda k: per[k]["rel"])
        out["per_impl"][impl] = {"max_rel": per[worst]["rel"], "worst_param": worst,
                                 "max_norm_rel": max(v["norm_rel"] for v in per.values()),
                                 "all_within_1e-12": all(v["rel"] <= 1e-12 for v in per.values()),
                                 "per_param": per}
    out["closest_to_reference"] = min(out["per_impl"], key=lambda k: out["per_impl"][k]["max_rel"])
    # what float64 can achieve at all: the stable implementation's own sensitivity to 1-ulp
    # weight perturbations (several of these gradients are small sums of large terms)
    own = _grads(models["moments"], t, i, y)
    jit = _ulp_jitter(models["moments"], t, i, y, own, 2)
    per = out["per_impl"]["moments"]["per_param"]
    for k in per:
        per[k]["moments_ulp_jitter"] = jit[k]
    out["moments_within_max_1e-12_or_10x_own_jitter"] = all(
        v["rel"] <= max(1e-12, 10 * v["moments_ulp_jitter"]) for v in per.values())
    return out


def time_kernels(dim: int, batch: int, rounds: int, naive_micro: int) -> dict:
    import torch

    models, p = _models(dim)
    t, i, y = _inputs(batch, dim)
    opts = {k: torch.optim.Adam(m.parameters(), lr=p.train.lr, betas=p.train.betas, fused=True)   # as in training
            for k, m in models.items()}

    def step(impl):
        m, opt = models[impl], opts[impl]
        opt.zero_grad(set_to_none=True)
        micro = naive_micro if impl == "naive" else batch
        for s in range(0, batch, micro):
            sl = slice(s, s + micro)
            loss = torch.nn.functional.cross_entropy(m(t[sl], i[sl]).logits, y[sl], reduction="sum") / batch
            loss.backward()
        opt.step()

    def infer(impl):
        with torch.inference_mode():
            micro = naive_micro if impl == "naive" else batch
            for s in range(0, batch, micro):
                models[impl](t[s:s + micro], i[s:s + micro])

    train_s = {k: [] for k in models}
    infer_s = {k: [] for k in models}
    train_cpu = {k: [] for k in models}
    for impl in models:                                   # warm-up
        step(impl)
        infer(impl)
    order = list(models)
    for r in range(rounds):
        for impl in order[r % len(order):] + order[:r % len(order)]:
            t0, c0 = time.perf_counter(), time.process_time()
            step(impl)
            train_s[impl].append(time.perf_counter() - t0)
            train_cpu[impl].append(time.process_time() - c0)
            t0 = time.perf_counter()
            infer(impl)
            infer_s[impl].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in train_s.items()}
    imed = {k: statistics.median(v) for k, v in infer_s.items()}
    cmed = {k: statistics.median(v) for k, v in train_cpu.items()}
    return {
        "train_step_cpu_s": {k: {"median": cmed[k], "all": v} for k, v in train_cpu.items()},
        "train_step_s": {k: {"median": med[k], "all": v} for k, v in train_s.items()},
        "infer_batch_s": {k: {"median": imed[k], "all": v} for k, v in infer_s.items()},
        "train_posts_per_s": {k: batch / v for k, v in med.items()},
        "ratios": {
            "train_step_rank1_over_moments": med["rank1"] / med["moments"],
            "train_step_naive_over_moments": med["naive"] / med["moments"],
            "train_step_naive_over_rank1": med["naive"] / med["rank1"],
            "train_step_cpu_rank1_over_moments": cmed["rank1"] / cmed["moments"],
            "train_step_cpu_naive_over_moments": cmed["naive"] / cmed["moments"],
            "inference_rank1_over_moments": imed["rank1"] / imed["moments"],
            "inference_naive_over_moments": imed["naive"] / imed["moments"],
        },
        "naive_micro_batch": naive_micro,
    }


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--naive-micro", type=int, default=4, help="textbook micro-batch (memory)")
    ap.add_argument("--check-batch", type=int, default=2, help="posts in the float64 agreement check")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--hp-dim", type=int, default=64,
                    help="tokens in the mpmath high-precision reference check (0: skip; cost ~ n^2)")
    ap.add_argument("--hp-batch", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                       "torch": torch.__version__},
           "preset": "paper", "batch": args.batch, "dim": args.dim, "rounds": args.rounds,
           "interleaved": True}
    if not args.skip_check:
        out["float64_check"] = check_float64(args.dim, args.check_batch)
        if args.hp_dim:
            out["high_precision_check"] = check_high_precision(args.hp_dim, args.hp_batch)
    out["timing"] = time_kernels(args.dim, args.batch, args.rounds, args.naive_micro)
    r = out["timing"]["ratios"]
    out["acceptance"] = {"train_step_>=5x_rank1": r["train_step_rank1_over_moments"] >= 5,
                         "train_step_>=100x_textbook": r["train_step_naive_over_moments"] >= 100}
    out["peak_rss_mb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
