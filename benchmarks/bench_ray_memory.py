"""Driver memory of ``sgmft extract --engine ray`` (``--mode extract``) and of ``sgmft predict
--manifest --engine ray`` (``--mode predict``) against the corpus size (issue 22, item 4).

For each ``--sizes`` N, in a fresh driver process: write a text-only manifest of N posts
(short Chinese texts, no images), extract it with the tiny random backbone on a local Ray
instance (``--ray-cpus``), and report the driver's peak RSS (``ru_maxrss``: anonymous and
file-backed pages, so the store's memory-mapped files count too), its RSS at the end, and
the peak RSS sampled (every 0.2 s) in each phase of the driver: Ray start and backbone
probe, streaming the manifest into the spill file, the Ray run, the store assembly.
Prints one JSON object with the ratio of the largest to the smallest size.

    python benchmarks/bench_ray_memory.py --sizes 100000,1000000 [--ray-cpus 2]

``--mode predict``: a small run is trained first, in its own process (80 SimPosts extracted with
the same tiny backbone, a 1-epoch ``concat`` model), then each driver predicts the N-post
manifest to a CSV with ``predict_manifest_ray`` (the CLI's ``--engine ray``, batch 64, one
replica of one thread). Phases: Ray start and model load, spilling the streamed manifest,
the Ray run with the in-order writing of the predictions.

    python benchmarks/bench_ray_memory.py --mode predict --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r'''
import json, os, resource, sys, time, warnings
warnings.simplefilter("ignore")
n, root, cpus = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else "extract"
from pathlib import Path
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.features.ray_engine import extract_features_ray
ckpt = Path(root) / "tinycc" if mode == "predict" else build_tiny_chinese_clip(Path(root) / "tinycc")
man = Path(root) / "m.jsonl"
words = ["学校", "上课", "电影", "健身房", "跑步", "旅行", "海边", "吃饭", "公司", "加班"]
with open(man, "w", encoding="utf-8") as f:
    for i in range(n):
        f.write(json.dumps({"id": f"p{i:08d}", "user": f"u{i % 997}", "label": "home",
                            "text": " ".join(words[(i + k) % 10] for k in range(6))}, ensure_ascii=False) + "\n")
import threading
import sgmft.features.shards as S
import sgmft.features.ray_engine as R
phase, peaks = ["start"], {}
def _rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
def _sample():
    while True:
        peaks[phase[0]] = max(peaks.get(phase[0], 0), _rss()); time.sleep(0.2)
def _phase(mod, fn, name):
    f = getattr(mod, fn)
    def g(*a, **k):
        phase[0] = name
        try:
            return f(*a, **k)
        finally:
            peaks[name] = max(peaks.get(name, 0), _rss())
    setattr(mod, fn, g)
threading.Thread(target=_sample, daemon=True).start()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if mode == "predict":
    import sgmft.predict.ray_predict as P
    from sgmft.predict import PostPredictor
    _phase(P, "spill_batches", "spill"); _phase(R, "run_spilled", "ray_run")
    run, kw = Path(root) / "run", {"batch_size": 64, "device": "cpu"}
    pp = PostPredictor.load(run, **kw)
    s = P.predict_manifest_ray(pp, man, Path(root) / "preds.csv", run_dir=run, load_kwargs=kw, num_cpus=cpus,
                               threads=1, actors=1)
    posts = s["posts"]
else:
    _phase(R, "spill_manifest", "spill"); _phase(R, "_run_extract", "ray_run"); _phase(S, "assemble_store", "assemble")
    res = extract_features_ray(man, Path(root) / "store", backbone=f"chinese-clip:{ckpt}", batch_size=64,
                               num_cpus=cpus, threads=1, progress=False)
    posts = res.num_posts
status = {k: v for k, v in (l.split(":", 1) for l in open("/proc/self/status")) if k in ("VmRSS", "VmHWM")}
print(json.dumps({"n": n, "mode": mode, "posts": posts, "seconds": round(time.perf_counter() - t, 1),
                  "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "driver_rss_before_mib": round(rss0 / 1024, 1),
                  "driver_rss_end_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
                  "phase_peak_rss_mib": {k: round(v, 1) for k, v in peaks.items()}}))
'''


SETUP_PREDICT = r'''
import sys
from pathlib import Path
from sgmft.cli import main
from sgmft.data.simposts import SimPostsConfig, generate_simposts
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
root = Path(sys.argv[1])
spec = f"chinese-clip:{build_tiny_chinese_clip(root / 'tinycc')}"
man = generate_simposts(root / "train-posts", SimPostsConfig(num_posts=80, seed=2))
assert main(["extract", str(man), "--out", str(root / "train-store"), "--backbone", spec, "--batch-size", "16",
             "--no-progress"]) == 0
assert main(["train", str(root / "train-store"), "--out", str(root / "run"), "--preset", "concat", "--epochs", "1",
             "--batch-size", "16", "--no-progress"]) == 0
'''


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--ray-cpus", dest="ray_cpus", type=int, default=2)
    ap.add_argument("--mode", choices=("extract", "predict"), default="extract",
                    help="the Ray driver measured: sgmft extract (default) or sgmft predict --manifest")
    args = ap.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    runs = []
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="sgmft-raymem-") as td:
            if args.mode == "predict":   # the trained run, made in another process (its memory is not the driver's)
                _run([sys.executable, "-c", SETUP_PREDICT, td], env)
            r = _run([sys.executable, "-c", CHILD, str(n), td, str(args.ray_cpus), args.mode], env)
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    name = "ray-driver-memory" if args.mode == "extract" else "ray-predict-driver-memory"
    out = {"benchmark": name, "runs": runs,
           "peak_rss_ratio_largest_over_smallest": round(runs[-1]["driver_peak_rss_mib"] / runs[0]["driver_peak_rss_mib"], 3),
           "driver_kib_per_post": round((runs[-1]["driver_peak_rss_mib"] - runs[0]["driver_peak_rss_mib"]) * 1024
                                        / max(1, runs[-1]["n"] - runs[0]["n"]), 2),
           "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/bench_ray_memory.py " + " ".join(sys.argv[1:])}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
