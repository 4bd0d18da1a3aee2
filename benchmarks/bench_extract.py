"""Benchmark ``sgmft extract``: full-pipeline throughput vs the bare model forward.

Prints one JSON object. The pipeline number is ``extract_features`` end to end on a fresh
SimPosts corpus with an empty cache (manifest, image hashing, decoding, text cleaning,
tokenising, preprocessing, forward, cache shards, store) and the backbone already loaded.
The forward number is the same backbone's ``forward_text`` + ``forward_images`` on the
same preprocessed batches, measured in the same process. ``ratio`` = pipeline / forward
throughput (1.0 = the data pipeline costs nothing on top of the model).

By default the backbone is a RANDOM tiny Chinese-CLIP (``--size tiny``), whose forward is
nearly free, so its ratio mostly measures decoding cost; ``--size base`` builds a random
model with ViT-B/16 shapes (a realistic forward cost, still no download), and
``--backbone chinese-clip:/path`` uses real weights.

    python benchmarks/bench_extract.py [--size tiny|base] [--backbone SPEC] [--num-posts 256]

``--precisions fp32,bf16,int8`` switches to the precision comparison: one backbone per
precision from the SAME checkpoint, the same preprocessed batches (texts and images of
``--num-posts`` SimPosts posts), timed interleaved (round r runs every precision once, in
turn, so load from other processes hits them alike) for ``--rounds`` rounds after a one-batch
warm-up each. Reports each precision's forward throughput, its speed-up over fp32 (total
time and per round) and the cosine similarity of its features to the fp32 features (text
and image rows, mean and min). Written to ``--json-out`` as well as printed.

    python benchmarks/bench_extract.py --precisions fp32,bf16,int8 --size base --num-posts 16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default=None, help="backbone spec; default: a random model built here")
    ap.add_argument("--size", default="tiny", choices=["tiny", "base", "huge"], help="random model size when no --backbone")
    ap.add_argument("--num-posts", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=320, help="side of the SimPosts images (pixels)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=None, help="loader threads (default: extract's default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--precisions", default=None,
                    help="comma list (fp32,bf16,int8): compare precisions against the first one instead")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (--precisions)")
    ap.add_argument("--variants", nargs="?", const="all", default=None, metavar="NAMES",
                    help="(--precisions) also time the other ways to compute bf16 / int8 that sgmft does not "
                         "use (bf16 autocast over fp32 weights, oneDNN bf16 fast-math, plain unpacked bf16 "
                         "Linears, other quantized engines, int8 with bf16 attention); NAMES: a comma list of variant names to keep "
                         "(e.g. bf16:plain-linear), default all")
    ap.add_argument("--compile", default="",
                    help="(--precisions) comma list of precisions to ALSO time under torch.compile "
                         "(e.g. fp32,int8); reports compile time (first pass) and steady-state speed")
    ap.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                    help="(--precisions) skip the hardware GEMM ceiling check")
    ap.add_argument("--json-out", dest="json_out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.precisions:
        out = precision_main(args)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
        return out

    import numpy as np
    import torch

    from sgmft.features.backbones import load_backbone
    from sgmft.features.backbones.tiny import build_tiny_chinese_clip
    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.features.extract import extract_features
    from sgmft.ingest.images import load_image
    from sgmft.ingest.manifest import read_manifest
    from sgmft.ingest.text import TextCleaner

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="sgmft-bench-") as td:
        td = Path(td)
        if args.backbone:
            spec, note = args.backbone, "user-supplied backbone"
        else:
            spec = f"chinese-clip:{build_tiny_chinese_clip(td / 'model', size=args.size)}"
            note = (f"RANDOM Chinese-CLIP ({args.size} shapes) built for the benchmark: timing only, "
                    "features meaningless" + ("; its forward is nearly free, so the ratio mostly measures "
                                              "image decoding cost" if args.size == "tiny" else ""))
        bb = load_backbone(spec, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
        manifest = generate_simposts(td / "corpus", SimPostsConfig(num_posts=args.num_posts, image_size=args.image_size,
                                                                   seed=1))
        posts, _ = read_manifest(manifest)
        cleaner = TextCleaner()
        cleaner.clean("预热 jieba")  # load the jieba dictionary outside the timings

        # the same batches the pipeline forms: posts in order, `batch_size` at a time
        t = time.perf_counter()
        batches = []
        n_images = 0
        for s in range(0, len(posts), args.batch_size):
            part = posts[s:s + args.batch_size]
            texts = [x for x in (cleaner.clean(p.text) for p in part) if x]
            ims = [load_image(f) for p in part for f in p.images]
            n_images += len(ims)
            pix = [bb.preprocess_images(ims[i:i + bb.batch_size]) for i in range(0, len(ims), bb.batch_size)]
            batches.append((bb.tokenize(texts) if texts else None, pix))
        prep_s = time.perf_counter() - t

        def forward_all():
            for tok, pix in batches:
                if tok is not None:
                    bb.forward_text(tok)
                for x in pix:
                    bb.forward_images(x)

        forward_all()  # warm-up (allocator, kernels)
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        forward_all()
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        fwd_s = time.perf_counter() - t

        t = time.perf_counter()
        res = extract_features(manifest, td / "store", backbone=bb, batch_size=args.batch_size, progress=False,
                               cache_dir=td / "cache", num_workers=args.num_workers, threads=args.threads)
        pipe_s = time.perf_counter() - t
        assert res.cached_hits == 0 and res.encoded == len(posts)

        n = len(posts)
        out = {
            "benchmark": "extract",
            "backbone": spec if args.backbone else f"random-{args.size}-chinese-clip",
            "backbone_note": note,
            "dim": bb.dim, "model_image_size": bb.image_size, "device": str(bb.device), "precision": bb.precision,
            "num_posts": n, "num_images": n_images, "source_image_px": args.image_size,
            "batch_size": args.batch_size,
            "pipeline_posts_per_s": round(n / pipe_s, 2),
            "forward_posts_per_s": round(n / fwd_s, 2),
            "ratio_pipeline_over_forward": round(fwd_s / pipe_s, 3),
            "serial_prepare_posts_per_s": round(n / prep_s, 2),
            "pipeline_s": round(pipe_s, 3), "forward_s": round(fwd_s, 3), "serial_prepare_s": round(prep_s, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "allocator": _allocator(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        }
        if os.getloadavg()[0] > (os.cpu_count() or 1):
            out["warning"] = ("machine busy (load average above the core count): timings are noisy, and "
                              "multi-threaded torch on oversubscribed cores can be far slower than 1 thread "
                              "(try --threads 1)")
    print(json.dumps(out, indent=1))
    return out


def _cosines(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class _Variant:
    """A backbone whose forward runs inside ``ctx()`` (a benchmark-only way to compute a precision)."""

    def __init__(self, bb, ctx):
        self.bb, self.ctx = bb, ctx

    def forward_text(self, x):
        with self.ctx():
            return self.bb.forward_text(x)

    def forward_images(self, x):
        with self.ctx():
            return self.bb.forward_images(x)


def _variants(spec, args, load_backbone):
    """The alternatives to sgmft's bf16 / int8 recipes, for ``--variants`` (those named, or all)."""
    import contextlib
    import warnings

    import torch

    from sgmft.features.backbones.base import int8_engine, unpack_linears

    def load(dtype):
        return load_backbone(spec, device=args.device, dtype=dtype, batch_size=args.batch_size)

    def autocast_fp32_weights():
        bb = load("fp32")
        bb.precision = "bfloat16"  # fp32 weights, bf16 autocast (sgmft's bf16 before bf16 weights)
        return bb

    @contextlib.contextmanager
    def fast_math():
        prev = torch.backends.mkldnn.fp32_precision
        torch.backends.mkldnn.fp32_precision = "bf16"  # oneDNN may run fp32 matmuls/convs in bf16
        try:
            yield
        finally:
            torch.backends.mkldnn.fp32_precision = prev

    def plain_linear():  # bf16 Linears with plain weights: oneDNN reorders each weight on every call
        bb = load("bf16")  # (sgmft's bf16 before PackedLinear)
        unpack_linears(bb.model)
        return bb

    def quantized(eng, scheme):
        bb = load("fp32")
        prev, torch.backends.quantized.engine = torch.backends.quantized.engine, eng
        qc = torch.ao.quantization
        cfg = qc.per_channel_dynamic_qconfig if scheme == "per-channel" else qc.default_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bb.model = qc.quantize_dynamic(bb.model, {torch.nn.Linear: cfg}, dtype=torch.qint8, inplace=True)
        torch.backends.quantized.engine = prev
        return bb

    def per_post_int8():  # sgmft's int8 on CPUs without VNNI (and everywhere before per-token int8)
        from sgmft.features.backbones import base

        keep, base.int8_scheme = base.int8_scheme, lambda flags=None: "per-post"
        try:
            return load("int8")
        finally:
            base.int8_scheme = keep

    def int8_bf16_attention():  # sgmft's int8 with attention (and the patch conv) under bf16 autocast:
        bb = load("int8")         # on AMX, bf16 SDPA runs on tiles while the int8 path keeps it in fp32
        bb._autocast = lambda: torch.autocast(device_type=bb.device.type, dtype=torch.bfloat16)
        return bb

    makers = {"bf16:autocast-fp32-weights": autocast_fp32_weights,
              "int8:per-post": per_post_int8,
              "int8:bf16-attention": int8_bf16_attention,
              "bf16:onednn-fastmath-fp32-model": lambda: _Variant(load("fp32"), fast_math),
              "bf16:plain-linear": plain_linear}
    engines = [e for e in ("onednn", "x86", "fbgemm") if e in torch.backends.quantized.supported_engines]
    for eng, scheme in ([(int8_engine(), "per-tensor")] +
                        [(e, "per-channel") for e in engines if e != int8_engine()]):
        makers[f"int8:{scheme}-{eng}"] = lambda eng=eng, scheme=scheme: quantized(eng, scheme)
    want = list(makers) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in want if v not in makers]
    if unknown:
        raise SystemExit(f"bench_extract.py: unknown --variants {unknown}; choose from {list(makers)}")
    out = {}
    for name in want:
        out[name] = makers[name]()
        _release_memory()
    return out


def _rss_breakdown() -> dict:
    """Resident memory now, split into anonymous and file-backed pages (MiB). The weights of
    a safetensors checkpoint are memory-mapped: every backbone loaded from the same file maps
    the same page-cache pages, which RSS counts once per mapping but RAM holds once."""
    out = {}
    try:
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = round(int(v.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def _release_memory() -> None:
    """Hand freed memory (a load's transient fp32 copy) back to the OS (glibc keeps it otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def precision_main(args) -> dict:
    import numpy as np
    import torch

    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.features.backbones import load_backbone
    from sgmft.features.backbones.base import canonical_precision, precision_recipe
    from sgmft.ingest.images import load_image
    from sgmft.ingest.manifest import read_manifest
    from sgmft.ingest.text import TextCleaner

    if args.threads:
        torch.set_num_threads(args.threads)
    precs = [canonical_precision(p.strip()) for p in args.precisions.split(",") if p.strip()]
    compiled = [canonical_precision(p.strip()) for p in args.compile.split(",") if p.strip()]
    ceiling = hardware_ceiling() if args.ceiling else None
    with tempfile.TemporaryDirectory(prefix="sgmft-bench-") as td:
        td = Path(td)
        if args.backbone:
            spec, note = args.backbone, "user-supplied backbone"
        else:  # built in a child process, so its memory (4 GB for huge) is returned before the loads
            import subprocess

            subprocess.run([sys.executable, "-c", "import sys; from sgmft.features.backbones.tiny import "
                            "build_tiny_chinese_clip as b; b(sys.argv[1], size=sys.argv[2])",
                            str(td / "model"), args.size], check=True)
            spec = f"chinese-clip:{td / 'model'}"
            note = f"RANDOM Chinese-CLIP ({args.size} shapes) built for the benchmark: timing only"
        # reduced precisions first: each load holds a transient fp32 copy, so the peak RAM is one fp32 model
        # on top of the smaller ones (matters for --size huge)
        loaded = {}
        for p in sorted(precs, key=lambda p: p == "float32"):
            loaded[p] = load_backbone(spec, device=args.device, dtype=p, batch_size=args.batch_size)
            _release_memory()
        bbs = {p: loaded[p] for p in precs}
        if args.variants:
            bbs.update(_variants(spec, args, load_backbone))
        for p in compiled:
            bb = load_backbone(spec, device=args.device, dtype=p, batch_size=args.batch_size)
            bbs[f"{p}+compile"] = bb.compile_forward()  # what SGMFT_COMPILE=1 extraction runs (precision.maybe_compile)
        manifest = generate_simposts(td / "corpus", SimPostsConfig(num_posts=args.num_posts,
                                                                   image_size=args.image_size, seed=1))
        posts, _ = read_manifest(manifest)
        cleaner = TextCleaner()
        texts = [x for x in (cleaner.clean(p.text) for p in posts) if x]
        ims = [load_image(f) for p in posts for f in p.images]
    ref_name = precs[0]
    ref = bbs[ref_name]
    toks = [ref.tokenize(texts[i:i + args.batch_size]) for i in range(0, len(texts), args.batch_size)]
    pix = [ref.preprocess_images(ims[i:i + args.batch_size]) for i in range(0, len(ims), args.batch_size)]

    def run(bb):
        t = time.perf_counter()
        tf = [bb.forward_text(x) for x in toks]
        imf = [bb.forward_images(x) for x in pix]
        return time.perf_counter() - t, np.concatenate(tf), np.concatenate(imf)

    flops = _model_flops(ref, toks, pix)
    first_pass = {}
    for name, bb in bbs.items():
        if name.endswith("+compile"):  # compiles for every batch shape: a whole first pass, timed
            first_pass[name] = run(bb)[0]
        else:  # warm-up: one full batch of each tower (kernels for these shapes, allocator, oneDNN caches)
            bb.forward_text(toks[0])
            bb.forward_images(pix[0])
    secs = {p: [] for p in bbs}
    feats = {}
    names = list(bbs)
    for r in range(args.rounds):   # each round starts one later: every model runs at every position in turn
        for name in names[r % len(names):] + names[:r % len(names)]:
            s, tf, imf = run(bbs[name])
            secs[name].append(s)
            feats.setdefault(name, (tf, imf))
    n_items = len(texts) + len(ims)
    gemm = _ceiling_rates(ceiling)
    res = {}
    for name in bbs:
        ct, ci = _cosines(feats[name][0], feats[ref_name][0]), _cosines(feats[name][1], feats[ref_name][1])
        allc = np.concatenate([ct, ci])
        tot = sum(secs[name])
        per_round = [a / b for a, b in zip(secs[ref_name], secs[name])]
        res[name] = {
            "items_per_s": round(n_items * args.rounds / tot, 3),
            "posts_per_s": round(len(posts) * args.rounds / tot, 3),
            "seconds_per_round": [round(x, 2) for x in secs[name]],
            "speedup_vs_" + ref_name: round(sum(secs[ref_name]) / tot, 3),
            "speedup_per_round": [round(x, 3) for x in per_round],
            "speedup_median_round": round(float(np.median(per_round)), 3),
            "cosine_mean": round(float(allc.mean()), 6), "cosine_min": round(float(allc.min()), 6),
            "cosine_text_mean": round(float(ct.mean()), 6), "cosine_text_min": round(float(ct.min()), 6),
            "cosine_image_mean": round(float(ci.mean()), 6), "cosine_image_min": round(float(ci.min()), 6),
        }
        best = min(secs[name])
        res[name]["gflops_model_best_round"] = round(flops / best / 1e9, 1)
        rate = gemm.get(name.split(":")[0].split("+")[0])
        if rate:  # achieved model FLOP rate / this precision's 2048^3 GEMM rate
            res[name]["fraction_of_gemm_ceiling"] = round(flops / best / 1e9 / rate, 3)
        if name in precs:
            res[name]["fingerprint"] = bbs[name].fingerprint()[:16]
            res[name]["recipe"] = precision_recipe(name) or "model as stored"
        elif ":" in name:
            res[name]["recipe"] = "alternative (--variants), not what sgmft runs"
        if name in first_pass:
            res[name]["first_pass_s_incl_compile"] = round(first_pass[name], 2)
            res[name]["compile_s_approx"] = round(first_pass[name] - min(secs[name]), 2)
    out = {
        "benchmark": "extract-precision",
        "backbone": spec if args.backbone else f"random-{args.size}-chinese-clip", "backbone_note": note,
        "dim": ref.dim, "model_image_size": ref.image_size, "device": str(ref.device),
        "num_posts": len(posts), "num_texts": len(texts), "num_images": len(ims), "batch_size": args.batch_size,
        "model_gflop_per_round": round(flops / 1e9, 2), "rounds": args.rounds, "timing": "bare forward (forward_text + forward_images) on the same preprocessed "
                                         "batches, precisions interleaved within each round (round r starts "
                                         "with the r-th, so none always follows the same one), one process",
        "precisions": res,
        "hardware_ceiling": ceiling,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_end_mib": _rss_breakdown(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "allocator": _allocator(),
        "load_average_1min_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(), "torch": torch.__version__,
        "command": "python benchmarks/bench_extract.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(out, indent=1))
    return out


def _model_flops(bb, toks, pix) -> float:
    """FLOPs of one round (every text and image batch), counted by torch's FlopCounterMode on
    the fp32-free path of ``bb`` (matmuls, convolutions and SDPA; element-wise ops are not
    counted, as in any GEMM-ceiling comparison)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        for x in toks:
            bb.forward_text(x)
        for x in pix:
            bb.forward_images(x)
    return float(fc.get_total_flops())


def _ceiling_rates(ceiling) -> dict:
    """precision -> the GEMM rate (GFLOP/s) it can reach here (None: no ceiling measured)."""
    if not ceiling:
        return {}
    g = ceiling["gflops"]
    return {"float32": g.get("fp32_matmul"), "bfloat16": g.get("bf16_matmul"), "float16": g.get("fp16_matmul"),
            "int8": g.get(f"int8_dynamic_linear_{ceiling['int8_engine_sgmft']}")}


def _allocator() -> dict:
    """Whether glibc keeps freed activation blocks (set when a CPU backbone loads; SGMFT_MALLOC=system
    keeps glibc's defaults, for a before/after pair of runs)."""
    from sgmft.features.backbones.allocator import allocator_state

    return allocator_state()


def hardware_ceiling(**kw) -> dict:
    """The GEMM ceiling report (moved into the library for ``sgmft extract --explain-hardware``)."""
    from sgmft.features.backbones.precision import hardware_ceiling as hc

    return hc(**kw)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
