"""Benchmark the whole-post ONNX export on CPU: onnxruntime fp32 and int8 against sgmft's own pipeline.

Prints (and writes to ``--json-out``) one JSON object. Three ways to predict the same posts, end
to end from the manifest's texts and image files (text cleaning, image decoding, tokenising,
preprocessing, both towers, image choice, head):

* ``sgmft``: :class:`sgmft.predict.PostPredictor` (PyTorch + transformers, fp32);
* ``ort-fp32``: the torch-free runner (:mod:`sgmft.runner.onnx_runner`) on ``sgmft export
  --with-backbone``'s ``model.onnx``;
* ``ort-int8``: the same runner on ``onnxruntime.quantization.quantize_dynamic`` of it (int8
  weights per channel, activations quantised per batch).

They run interleaved: round ``r`` times each once, in turn, on all ``--num-posts`` posts (after a
warm-up batch each), with ``--threads`` threads for torch and onnxruntime alike. Reported:
posts/s per method (over all rounds), the speed-up over ``sgmft`` per round, and how far each
method's probabilities are from ``sgmft``'s (max |difference|, top-1 agreement).

The backbone is a RANDOM Chinese-CLIP built on the spot (``--size base``: ViT-B/16 + 12-layer
text tower shapes, ``tiny`` for a smoke run) under a zero-shot head, so speed is realistic and
the probabilities mean nothing; the int8 accuracy loss on real weights must be measured on real
weights (``--backbone chinese-clip:/path``).

    python benchmarks/bench_onnx_post.py --size base --num-posts 32 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _setup(root: Path, args):
    from sgmft.cli import main
    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.features.backbones.tiny import build_tiny_chinese_clip
    from sgmft.ingest.manifest import read_manifest
    from sgmft.predict.export_post import export_whole_post

    ck = root / "ckpt"
    if not args.backbone and not (ck / "config.json").is_file():
        build_tiny_chinese_clip(ck, size=args.size)
    spec = args.backbone or f"chinese-clip:{ck}"
    t0 = time.perf_counter()
    reused = (root / "export" / "export.json").is_file()
    if not reused:                                          # --work DIR: reuse an earlier export
        assert main(["zero-shot", "--backbone", spec, "--out", str(root / "run"), "--precision", "fp32",
                     "--device", "cpu", "--image-choice", "similar", "--overwrite"]) == 0
        (root / "export.summary.json").write_text(json.dumps(export_whole_post(root / "run", root / "export")))
    s = json.loads((root / "export.summary.json").read_text())
    export_s = time.perf_counter() - t0
    int8 = root / "export-int8"
    t0 = time.perf_counter()
    if not (int8 / "export.json").is_file():
        _quantize(root / "export", int8)
    quant_s = time.perf_counter() - t0
    man = generate_simposts(root / f"posts-{args.num_posts}", SimPostsConfig(num_posts=args.num_posts, seed=4),
                           overwrite=True)
    posts, _ = read_manifest(man)
    sizes = {k: round((root / d / "model.onnx").stat().st_size / 2**20, 1) for k, d in
             (("fp32", "export"), ("int8", "export-int8"))}
    return spec, posts, root / "export", int8, {"export_and_verify_s": None if reused else round(export_s, 1),
                                               "quantize_s": None if reused else round(quant_s, 1),
                                               "export_reused_from_work_dir": reused, "onnx_mib": sizes,
                                               "verified_fp32": s["per_batch"]}


def _quantize(src: Path, dst: Path) -> None:
    """``quantize_dynamic`` (int8 weights per output channel) of ``src/model.onnx`` into ``dst``. The
    exporter's ``value_info`` (intermediate shapes) is dropped first: onnx's shape inference, which
    the quantiser runs, rejects some of it on the base model (768 vs 512), and it is only a hint."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(src / "model.onnx"))
    del m.graph.value_info[:]
    plain = dst / "model.fp32-plain.onnx"
    onnx.save(m, str(plain))
    del m
    quantize_dynamic(str(plain), str(dst / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    plain.unlink()
    for f in ("tokenizer.json", "export.json"):
        (dst / f).write_bytes((src / f).read_bytes())


def _methods(root: Path, export: Path, int8: Path, threads: int, batch: int):
    from sgmft.predict import PostPredictor
    from sgmft.runner.onnx_runner import OnnxPostRunner

    pp = PostPredictor.load(root / "run", device="cpu", batch_size=batch)
    r32, r8 = OnnxPostRunner(export, threads=threads), OnnxPostRunner(int8, threads=threads)

    def runner(r):
        return lambda posts: [x["probs"] for s in range(0, len(posts), batch) for x in r.predict(posts[s:s + batch])]

    return {"sgmft": lambda posts: [x["probs"] for x in pp.predict_posts([(p.text, p.images) for p in posts])],
            "ort-fp32": runner(r32), "ort-int8": runner(r8)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="base", choices=["tiny", "base"])
    ap.add_argument("--backbone", help="a real backbone spec instead of a random model")
    ap.add_argument("--num-posts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", default="benchmarks/results-bench_onnx_post-cpu.json")
    ap.add_argument("--work", help="keep the model, export and int8 files in this folder (and reuse them)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-post-") as td:
        root = Path(args.work or td)
        root.mkdir(parents=True, exist_ok=True)
        spec, posts, export, int8, setup = _setup(root, args)
        methods = _methods(root, export, int8, args.threads, args.batch_size)
        for f in methods.values():                                     # warm-up: one batch each
            f(posts[:args.batch_size])
        times = {k: [] for k in methods}
        probs = {}
        for _ in range(args.rounds):
            for k, f in methods.items():
                t0 = time.perf_counter()
                out = f(posts)
                times[k].append(time.perf_counter() - t0)
                probs[k] = np.array([[p[n] for n in sorted(p)] for p in out])
    n = len(posts)
    ref = probs["sgmft"]
    res = {"benchmark": "bench_onnx_post", "backbone": spec if args.backbone else f"random chinese-clip ({args.size})",
           "num_posts": n, "batch_size": args.batch_size, "rounds": args.rounds, "threads": args.threads,
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "python": sys.version.split()[0], "torch": torch.__version__, **setup, "methods": {}}
    import onnxruntime

    res["onnxruntime"] = onnxruntime.__version__
    for k, ts in times.items():
        res["methods"][k] = {
            "posts_per_s": round(n * len(ts) / sum(ts), 2), "round_s": [round(t, 2) for t in ts],
            "speedup_vs_sgmft_per_round": [round(a / b, 2) for a, b in zip(times["sgmft"], ts)],
            "max_abs_prob_diff_vs_sgmft": float(np.abs(probs[k] - ref).max()),
            "top1_agreement_vs_sgmft": float((probs[k].argmax(1) == ref.argmax(1)).mean())}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
