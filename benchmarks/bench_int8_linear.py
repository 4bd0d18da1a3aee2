"""Why int8 is slower than bf16 on a CPU with AMX (issue 22): one MLP Linear of a ViT at the
shapes a batch sends through it, in every recipe, interleaved, best of R rounds. Prints JSON.

    python benchmarks/bench_int8_linear.py --threads 2 --rounds 7 --out benchmarks/results-bench_int8_linear.json

Entries (y = x W^T + b, W with one int8 scale per output channel where int8):

The process tunes glibc's allocator as a loaded CPU backbone does (``allocator.keep_freed_memory``:
``SGMFT_MALLOC=system`` keeps the defaults, and then every large output pays its page faults again).

* ``fp32``, ``bf16``: ``F.linear`` on fp32 / bf16 tensors (bf16 is what ``--precision bf16`` runs);
* ``int8_one_scale_per_token``: sgmft's int8 on CPUs with VNNI or AMX-int8 (``TokenInt8Linear``:
  one activation scale per token, u8 x s8 on oneDNN's prepacked kernel, one call per batch; the
  activation quantiser eager, as for models under 50 M parameters); absent where it cannot run exactly;
* ``int8_one_scale_per_post``: sgmft's int8 on AVX2-only CPUs (``PerPostLinear``: dynamic
  quantisation, one activation scale per post, so a post's features do not depend on its
  batch-mates), one call per post;
* ``int8_one_scale_per_batch``: the same quantised Linear called once on the whole batch (one
  scale for all posts: faster, but a post's features then depend on its batch-mates);
* ``int8_gemm_only``: ``torch._int_mm`` on int8 inputs already quantised, int32 out: the int8 GEMM
  with no quantisation or dequantisation at all, an upper bound for any int8 recipe in eager mode;
* where per token runs: ``int8_per_token_gemm_only_fp32_out`` / ``..._bf16_out``, oneDNN's prepacked
  kernel alone on activations already quantised, with the fp32 output sgmft uses or a bf16 one (what
  writing the output costs);
* ``mlp_*``: the whole ViT MLP (fc1, quick GELU, fc2; twice the FLOPs, ``vs_fp32`` against ``mlp_fp32``):
  ``mlp_fp32``, ``mlp_int8_per_token`` (sgmft's int8), ``mlp_int8_per_token_256_token_blocks`` (the
  same on 256 tokens at a time: same bytes; in a model: ``bench_extract_ideas.py --variants int8mlp``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings

SHAPES = {"ViT-B/16": dict(posts=32, tokens=197, d_in=768, d_out=3072),
          "ViT-H/14": dict(posts=8, tokens=257, d_in=1280, d_out=5120)}


def _entries(shape, torch):
    from sgmft.features.backbones.base import PerPostLinear, int8_scheme
    from sgmft.features.backbones.int8_linear import TokenInt8Linear
    from sgmft.features.backbones.precision import int8_engine

    g = torch.Generator().manual_seed(0)
    p, t, k, n = shape["posts"], shape["tokens"], shape["d_in"], shape["d_out"]
    x = torch.randn(p, t, k, generator=g)
    lin = torch.nn.Linear(k, n).eval().requires_grad_(False)
    xb, wb, bb = x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()
    src = copy.deepcopy(lin)   # quantize_dynamic replaces it in place; lin stays the fp32 reference
    prev, torch.backends.quantized.engine = torch.backends.quantized.engine, int8_engine()
    try:  # packed for sgmft's engine, as apply_precision packs them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(
                torch.nn.Sequential(src), {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                dtype=torch.qint8, mapping={torch.nn.Linear: PerPostLinear})
    finally:
        torch.backends.quantized.engine = prev
    one = super(PerPostLinear, q[0]).forward   # the dynamic Linear itself, one call
    xi = torch.randint(-127, 128, (p * t, k), dtype=torch.int8, generator=g)
    wi = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
    out = {"fp32": lambda: torch.nn.functional.linear(x, lin.weight, lin.bias),
           "bf16": lambda: torch.nn.functional.linear(xb, wb, bb),
           "int8_one_scale_per_post": lambda: q[0](x),
           "int8_one_scale_per_batch": lambda: one(x),
           "int8_gemm_only": lambda: torch._int_mm(xi, wi)}
    if int8_scheme() == "per-token":
        tok = TokenInt8Linear(lin)
        out["int8_one_scale_per_token"] = lambda: tok(x)
        out.update(_per_token_entries(tok, x, lin, torch))
    return out


def _per_token_entries(tok, x, lin, torch):
    """The per-token kernel alone (fp32 / bf16 out) and the whole MLP, whole and in token blocks."""
    from sgmft.features.backbones.int8_linear import TokenInt8Linear, _ZERO_POINT, quantize_per_token

    q, _ = quantize_per_token(x.reshape(-1, tok.in_features))

    def gemm(dtype):
        return lambda: torch.ops.onednn.qlinear_pointwise(q, 1.0, _ZERO_POINT, tok.packed, tok.w_scale, tok._w_zp,
                                                          None, 1.0, 0, dtype, "none", [], "")
    back = torch.nn.Linear(lin.out_features, lin.in_features).eval().requires_grad_(False)
    tok2 = TokenInt8Linear(back)

    def gelu(h):
        return h * torch.sigmoid(1.702 * h)            # CLIP's quick GELU

    def mlp_int8(rows):
        x2 = x.reshape(-1, tok.in_features)
        out = torch.empty_like(x2)
        for i in range(0, x2.shape[0], rows):
            out[i:i + rows] = tok2(gelu(tok(x2[i:i + rows])))
        return out
    return {"int8_per_token_gemm_only_fp32_out": gemm(torch.float32),
            "int8_per_token_gemm_only_bf16_out": gemm(torch.bfloat16),
            "mlp_fp32": lambda: back(gelu(lin(x))),
            "mlp_int8_per_token": lambda: mlp_int8(x.shape[0] * x.shape[1]),
            "mlp_int8_per_token_256_token_blocks": lambda: mlp_int8(256)}


def _row(name: str, secs: float, best: dict, flop: float) -> dict:
    """One entry's figures; an ``mlp_*`` entry does two Linears and compares with ``mlp_fp32``."""
    if name.startswith("mlp_"):
        return {"ms": round(1e3 * secs, 3), "gflops": round(2 * flop / secs / 1e9, 1),
                "vs_fp32": round(best["mlp_fp32"] / secs, 3)}
    return {"ms": round(1e3 * secs, 3), "gflops": round(flop / secs / 1e9, 1),
            "vs_fp32": round(best["fp32"] / secs, 3), "vs_bf16": round(best["bf16"] / secs, 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    import torch

    from sgmft.features.backbones.allocator import allocator_state, keep_freed_memory
    from sgmft.features.backbones.precision import cpu_flags, int8_engine, onednn_kernels

    keep_freed_memory()    # as a loaded CPU backbone does: a large output reuses freed heap, no page faults
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {}
    with torch.inference_mode():
        for name, shape in SHAPES.items():
            fns = _entries(shape, torch)
            for f in fns.values():
                f(), f()   # warm-up: kernels, packing, allocator
            best = {k: float("inf") for k in fns}
            for _ in range(args.rounds):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    best[k] = min(best[k], time.perf_counter() - t0)
            flop = 2.0 * shape["posts"] * shape["tokens"] * shape["d_in"] * shape["d_out"]
            res[name] = {"shape": shape, "entries": {k: _row(k, v, best, flop) for k, v in best.items()}}
    out = {"benchmark": "int8-linear", "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "int8_engine": int8_engine(), "onednn": onednn_kernels(),
           "amx": {"amx_bf16", "amx_tile"} <= cpu_flags(), "cpu_count": os.cpu_count(),
           "allocator": allocator_state(),
           "method": f"best of {args.rounds} interleaved rounds, one process", "results": res}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        from sgmft.atomic import write_text

        write_text(args.out, text + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
