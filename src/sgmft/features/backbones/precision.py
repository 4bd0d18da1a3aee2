"""Which precision this machine should run a backbone at, and why (``--precision auto``).

On a GPU, ``auto`` is bf16 (fp16 where bf16 is unsupported), as before. On a CPU it is the
fastest precision whose features stay within the cosine bar of fp32 (mean cosine >= 0.999,
:data:`COSINE_BAR`), judged by what the CPU can run fast:

* **bf16** where the CPU has AMX tiles (``amx_bf16`` + ``amx_tile``): oneDNN runs bf16
  GEMMs on the tiles (``brg_matmul:..._amx``), several times the fp32 GEMM rate; bf16 features
  are at mean cosine 0.9999 to fp32 on ViT-B/16 and ViT-H/14 shapes (docs/scale.md).
* **int8** (int8 Linears with one activation scale per token on oneDNN's u8 x s8 kernels) where
  the CPU has VNNI (``avx512_vnni`` or ``avx_vnni``) but no AMX: bf16 is slower than fp32 there
  (no bf16 tiles), int8 is the only gain (2.5x on ViT-B/16, 2.6x on ViT-H/14 on a 2-core
  VNNI-only Xeon), at mean cosine 0.9998 / 0.9996.
* **fp32** otherwise.

The choice is made once per process, printed once as a ``note:`` with its reason, and
recorded like any explicit precision (backbone fingerprint, store, model contract), so
predict and serve run what extraction ran. ``sgmft extract --explain-hardware`` prints the
GEMM ceiling report (:func:`hardware_ceiling`) and the choice without extracting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from functools import lru_cache

COSINE_BAR = 0.999  # the mean cosine to fp32 a reduced precision must keep (issue 11 / 22)
# mean cosine to fp32 measured with benchmarks/bench_extract.py --precisions (random
# Chinese-CLIP weights; docs/scale.md): the evidence behind each automatic choice
# int8 on VNNI / AMX-int8 CPUs: one activation scale per token (int8_linear.TokenInt8Linear;
# benchmarks/results-bench_extract-precision-{base,huge}-vnni.json)
MEASURED_COSINE = {"bfloat16": {"ViT-B/16": 0.99994, "ViT-H/14": 0.99990},
                   "int8": {"ViT-B/16": 0.99976, "ViT-H/14": 0.99956}}
# whole-extraction int8 / fp32 on an AVX2-only CPU (AMD EPYC Zen 3, 2 threads; docs/scale.md,
# benchmarks/results-bench_extract-precision-{base,huge}-avx2.json, int8 one post at a time):
# the evidence for int8 without VNNI
AVX2_INT8_SPEEDUP = {"ViT-B/16": 1.28, "ViT-H/14": 1.53}
AVX2_INT8_COSINE = {"ViT-B/16": 0.99951, "ViT-H/14": 0.99917}
ISA_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "amx_fp16", "avx512_bf16", "avx512_fp16", "avx512_vnni",
             "avx_vnni", "avx512f", "avx2")
_announced = False


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_AMX_FLAGS = frozenset({"amx_bf16", "amx_tile", "amx_int8", "amx_fp16"})
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
# CPU flags under which oneDNN's u8 x s8 int8 matmul is exact (no int16 saturation): int8 per token
EXACT_INT8_FLAGS = _VNNI_FLAGS | {"amx_int8"}


def onednn_isa_cap() -> str | None:
    """The cap ``$ONEDNN_MAX_CPU_ISA`` (or its older name ``$DNNL_MAX_CPU_ISA``) puts on oneDNN's kernels."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None


def usable_cpu_flags() -> frozenset:
    """:func:`cpu_flags`, less the AMX and VNNI units that ``$ONEDNN_MAX_CPU_ISA`` (or
    ``$DNNL_MAX_CPU_ISA``) tells oneDNN not to use: with ``AVX512_CORE_FP16``, say, the CPU
    has AMX tiles but no kernel runs on them, so the choices here must not count on them."""
    flags = cpu_flags()
    isa = (onednn_isa_cap() or "").strip().upper()
    if not isa or isa in ("ALL", "DEFAULT"):
        return flags
    if "AMX" not in isa:
        flags = flags - _AMX_FLAGS
    if not any(k in isa for k in ("VNNI", "BF16", "FP16", "AVX10", "AMX")):
        flags = flags - _VNNI_FLAGS
    return flags


def auto_cpu_precision(flags=None) -> tuple[str, str]:
    """``(precision, reason)`` that ``--precision auto`` picks on a CPU with ``flags``
    (default: this CPU's)."""
    flags = usable_cpu_flags() if flags is None else frozenset(flags)
    if {"amx_bf16", "amx_tile"} <= flags:
        c = MEASURED_COSINE["bfloat16"]
        return "bfloat16", (f"this CPU has AMX tiles (amx_bf16, amx_tile): bf16 GEMMs run on them, several "
                            f"times the fp32 rate; bf16 features keep mean cosine {c['ViT-H/14']}-{c['ViT-B/16']} "
                            f"to fp32 (bar {COSINE_BAR})")
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni"})
    if vnni and _has_int8_engine():
        c = MEASURED_COSINE["int8"]
        return "int8", (f"this CPU has VNNI ({', '.join(vnni)}) but no AMX: int8 Linears are the only faster "
                        f"precision here (bf16 has no tiles and runs below fp32); int8 features keep mean "
                        f"cosine {c['ViT-H/14']}-{c['ViT-B/16']} to fp32 (bar {COSINE_BAR})")
    if "avx2" in flags and _has_int8_engine():
        c, x = AVX2_INT8_COSINE, AVX2_INT8_SPEEDUP
        return "int8", (f"this CPU has AVX2 but neither AMX nor VNNI: int8 Linears still run "
                        f"{x['ViT-B/16']}-{x['ViT-H/14']}x fp32 on ViT-B/16 to ViT-H/14 shapes (bf16 and fp16 are "
                        f"emulated here, 0.12x); int8 features keep mean cosine {c['ViT-H/14']}-{c['ViT-B/16']} "
                        f"to fp32 (bar {COSINE_BAR})")
    return "float32", "this CPU has neither AMX, VNNI nor AVX2: no reduced precision is faster than fp32 here"


def _has_int8_engine() -> bool:
    import torch

    return bool(set(torch.backends.quantized.supported_engines) & {"onednn", "x86", "fbgemm"})


INT8_ENGINE_PREFERENCE = ("onednn", "x86", "fbgemm", "qnnpack")


def int8_engine() -> str:
    """The quantized engine int8 weights are packed for: the first of
    :data:`INT8_ENGINE_PREFERENCE` that this torch build supports (oneDNN: the fastest
    here, with AMX-int8 kernels; see sgmft.features.backbones.base)."""
    import torch

    supported = set(torch.backends.quantized.supported_engines)
    for eng in INT8_ENGINE_PREFERENCE:
        if eng in supported:
            return eng
    raise RuntimeError(f"precision int8: this torch build has no quantized engine "
                       f"(supported: {sorted(supported)})")


def announce_auto(precision: str, reason: str) -> None:
    """Print the automatic choice once per process (a ``note:`` on stderr via warnings)."""
    global _announced
    if _announced:
        return
    _announced = True
    from sgmft.errors import SgmftNote

    warnings.warn(f"--precision auto chose {precision} on this CPU: {reason} "
                  f"(pass --precision fp32 to keep exact fp32; `sgmft extract --explain-hardware` shows why)",
                  SgmftNote, stacklevel=3)


# -- torch.compile for long extractions ------------------------------------------------------------
COMPILE_MIN_PARAMS = 50_000_000   # ViT-B/16 Chinese-CLIP has ~188 M; the tiny test model ~1 M
COMPILE_MIN_POSTS = 2_000         # compiling costs minutes; below this it does not pay back
_OFF, _ON = ("0", "off", "false", "no"), ("1", "on", "true", "yes")


def compile_choice(bb, n_posts: int) -> tuple[bool, str]:
    """``(compile?, reason)`` for an extraction of ``n_posts`` with backbone ``bb``.

    Off by default: on the shared 2-core AMX machine of issue 22, compiling gained 1.08x over
    eager bf16 on ViT-H/14, 1.00x (1 thread) to 1.43x on ViT-B/16, after 100-270 s of
    compilation, and lost under heavy contention (docs/scale.md). ``SGMFT_COMPILE=1`` forces
    it on; ``SGMFT_COMPILE=auto`` turns it on for bf16 on CPU with a model of >=
    :data:`COMPILE_MIN_PARAMS` parameters and a job of >= :data:`COMPILE_MIN_POSTS` posts."""
    env = os.environ.get("SGMFT_COMPILE", "0").strip().lower()
    if env in _OFF:
        return False, "off by default (SGMFT_COMPILE=1 or auto to turn it on)"
    if env in _ON:
        return True, "SGMFT_COMPILE=1"
    model = getattr(bb, "model", None)
    if model is None or getattr(bb, "device", None) is None or bb.device.type != "cpu":
        return False, "not a CPU torch backbone"
    if bb.precision != "bfloat16":
        return False, f"precision {bb.precision} (compile measured no gain outside bf16 on CPU)"
    n_params = sum(p.numel() for p in model.parameters())
    if n_params < COMPILE_MIN_PARAMS:
        return False, f"small model ({n_params / 1e6:.1f} M parameters)"
    if n_posts < COMPILE_MIN_POSTS:
        return False, f"short job ({n_posts} posts < {COMPILE_MIN_POSTS}): compiling would not pay back"
    return True, (f"bf16 on CPU, {n_params / 1e6:.0f} M parameters, {n_posts} posts: torch.compile (Inductor, "
                  "freezing) fuses the bf16 forward; the first batches of each size compile (minutes)")


def maybe_compile(bb, n_posts: int) -> bool:
    """Compile ``bb``'s forward when :func:`compile_choice` says so; a note says why."""
    on, why = compile_choice(bb, n_posts)
    if on and hasattr(bb, "compile_forward"):
        from sgmft.errors import SgmftNote

        warnings.warn(f"compiling the backbone forward: {why} (unset SGMFT_COMPILE to skip)", SgmftNote, stacklevel=2)
        bb.compile_forward()
        return True
    return False


# -- the hardware ceiling -------------------------------------------------------------------------
def onednn_kernels() -> dict:
    """Which oneDNN implementation runs a bf16 / fp16 matmul and an int8 (onednn engine)
    dynamic Linear here (``ONEDNN_VERBOSE`` in a child process): ``..._amx`` means AMX tiles,
    ``avx512_core_bf16`` the AVX-512 BF16 dot-product instructions."""
    code = ("import warnings; warnings.simplefilter('ignore'); import torch\n"
            "a = torch.randn(256, 256); print('@@bf16', flush=True); a.bfloat16() @ a.bfloat16()\n"
            "print('@@fp16', flush=True); a.half() @ a.half()\n"
            "torch.backends.quantized.engine = 'onednn'\n"
            "q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(256, 256)), "
            "{torch.nn.Linear}, dtype=torch.qint8)\n"
            "print('@@int8', flush=True); q(a)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": "1"})
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    out, tag, isa = {}, None, None
    for line in r.stdout.splitlines():
        if line.startswith("@@"):
            tag = line[2:]
        parts = line.split(",")
        if len(parts) > 4 and parts[2] == "info" and parts[4].startswith("isa:"):
            isa = parts[4][4:]
        if tag and tag not in out and len(parts) > 6 and parts[3] == "exec" and parts[5] == "matmul":
            out[tag] = parts[6]
    return {"isa": isa, "matmul_impl": out}


def _ceiling_kernels(n: int) -> dict:
    """name -> a callable running one n x n x n GEMM (or an n -> n int8 Linear on n rows)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    ab, bb, ah, bh = a.bfloat16(), b.bfloat16(), a.half(), b.half()
    kernels = {"fp32_matmul": lambda: a @ b, "bf16_matmul": lambda: ab @ bb, "fp16_matmul": lambda: ah @ bh}

    def fast_math():
        prev = torch.backends.mkldnn.fp32_precision
        torch.backends.mkldnn.fp32_precision = "bf16"
        try:
            a @ b
        finally:
            torch.backends.mkldnn.fp32_precision = prev
    kernels["fp32_matmul_onednn_bf16_fastmath"] = fast_math
    prev_engine = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for eng in ("x86", "fbgemm", "onednn"):
            if eng in torch.backends.quantized.supported_engines:
                torch.backends.quantized.engine = eng
                q = torch.ao.quantization.quantize_dynamic(  # per-channel weights, as sgmft's int8
                    torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)),
                    {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
                kernels[f"int8_dynamic_linear_{eng}"] = (lambda q=q: q(a))
    torch.backends.quantized.engine = prev_engine
    return kernels


def _best_rates(kernels: dict, flops: float, rounds: int, seconds: float) -> dict:
    import torch

    best, slow = {k: 0.0 for k in kernels}, set()
    with torch.inference_mode():
        for k, f in kernels.items():
            t = time.perf_counter()
            f()  # warm-up: oneDNN primitive creation, weight packing
            if time.perf_counter() - t > 10 * seconds:
                slow.add(k)     # emulated (bf16 / fp16 without AVX-512: minutes a round); one timed call
        for i in range(rounds):
            for k, f in kernels.items():
                if i and k in slow:
                    continue
                t, reps = time.perf_counter(), 0
                while True:
                    f()
                    reps += 1
                    dt = time.perf_counter() - t
                    if dt >= seconds:
                        break
                best[k] = max(best[k], flops * reps / dt / 1e9)
    return best


def hardware_ceiling(n: int = 2048, rounds: int = 3, seconds: float = 0.4) -> dict:
    """GEMM rates of this CPU with the current torch threads: an n x n x n matmul in fp32,
    bf16 and fp16, fp32 with oneDNN's bf16 fast-math, and an n -> n Linear on n rows
    dynamically quantised to int8 with per-channel weights (each quantized engine). Kernels
    are interleaved over ``rounds`` rounds; the best rate of each is kept (the one least
    disturbed by other processes). Plus the CPU's AMX / AVX-512 flags, the oneDNN kernels
    chosen, a one-line verdict and the ``auto`` precision with its reason."""
    import torch

    best = _best_rates(_ceiling_kernels(n), 2.0 * n ** 3, rounds, seconds)
    gf = {k: round(v, 2) for k, v in best.items()}
    flags = usable_cpu_flags()  # less the units $ONEDNN_MAX_CPU_ISA switches off
    has = {f: f in flags for f in ISA_FLAGS}
    ours = f"int8_dynamic_linear_{int8_engine()}"
    ratio = {"bf16_over_fp32": round(best["bf16_matmul"] / best["fp32_matmul"], 3),
             "fp16_over_fp32": round(best["fp16_matmul"] / best["fp32_matmul"], 3),
             "fastmath_over_fp32": round(best["fp32_matmul_onednn_bf16_fastmath"] / best["fp32_matmul"], 3)}
    if ours in best:
        ratio["int8_sgmft_over_fp32"] = round(best[ours] / best["fp32_matmul"], 3)
    amx = has["amx_bf16"] and has["amx_tile"]
    if amx:
        verdict = "AMX present: bf16 GEMMs can run on AMX tiles (see onednn.matmul_impl.bf16)."
    elif has["avx512_bf16"]:
        verdict = (f"no AMX (amx_bf16/amx_tile absent): bf16 GEMMs run on AVX-512 BF16 dot products at "
                   f"{ratio['bf16_over_fp32']}x the fp32 GEMM rate, which bounds what a bf16 forward can gain here")
    else:
        verdict = f"neither AMX nor AVX-512 BF16: bf16 GEMMs are emulated ({ratio['bf16_over_fp32']}x fp32)"
        if "int8_sgmft_over_fp32" in ratio:
            verdict += f"; int8 Linears run {ratio['int8_sgmft_over_fp32']}x fp32"
    prec, why = auto_cpu_precision(flags)
    return {"matrix": f"{n}x{n}x{n}", "gflops": gf, "ratio": ratio, "int8_engine_sgmft": int8_engine(),
            "onednn_max_cpu_isa": onednn_isa_cap(),
            "cpu_flags": has, "amx": amx, "onednn": onednn_kernels(), "torch_threads": torch.get_num_threads(),
            "verdict": verdict, "auto_precision": {"cpu": prec, "reason": why},
            "method": f"best of {rounds} interleaved rounds of >= {seconds}s per kernel"}


def explain_hardware(n: int = 1024, rounds: int = 2, seconds: float = 0.2) -> str:
    """The human report of ``sgmft extract --explain-hardware``: ceiling + the auto choice
    (smaller GEMMs than the benchmark's, so it answers in seconds)."""
    c = hardware_ceiling(n=n, rounds=rounds, seconds=seconds)
    flags = ", ".join(f for f, v in c["cpu_flags"].items() if v) or "none of " + ", ".join(ISA_FLAGS)
    lines = [f"CPU flags: {flags}" + (f" (as $ONEDNN_MAX_CPU_ISA={c['onednn_max_cpu_isa']} leaves them)"
                                      if c["onednn_max_cpu_isa"] else ""),
             f"oneDNN: {c['onednn'].get('isa')}; matmul kernels {c['onednn'].get('matmul_impl')}",
             f"GEMM ceiling ({c['matrix']}, {c['torch_threads']} torch threads, {c['method']}):"]
    for k, v in c["gflops"].items():
        lines.append(f"  {k:36s} {v:9.1f} GFLOP/s  ({v / c['gflops']['fp32_matmul']:.2f}x fp32)")
    from sgmft.features.backbones.allocator import allocator_plan

    lines += [f"verdict: {c['verdict']}", f"allocator: {allocator_plan()}",
              f"--precision auto on CPU: {c['auto_precision']['cpu']} ({c['auto_precision']['reason']})"]
    return "\n".join(lines)
