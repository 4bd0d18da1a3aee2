"""Driver memory of ``sgmft extract --engine ray`` against the corpus size (issue 22, item 4).

For each ``--sizes`` N, in a fresh driver process: write a text-only manifest of N posts
(short Chinese texts, no images), extract it with the tiny random backbone on a local Ray
instance (``--ray-cpus``), and report the driver's peak RSS (``ru_maxrss``: anonymous and
file-backed pages, so the store's memory-mapped files count too), its RSS at the end, and
the peak RSS sampled (every 0.2 s) in each phase of the driver: Ray start and backbone
probe, streaming the manifest into the spill file, the Ray run, the store assembly.
Prints one JSON object with the ratio of the largest to the smallest size.

    python benchmarks/bench_ray_memory.py --sizes 100000,1000000 [--ray-cpus 2]
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
from pathlib import Path
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.features.ray_engine import extract_features_ray
ckpt = build_tiny_chinese_clip(Path(root) / "tinycc")
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
_phase(R, "spill_manifest", "spill"); _phase(R, "_run_extract", "ray_run"); _phase(S, "assemble_store", "assemble")
threading.Thread(target=_sample, daemon=True).start()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
res = extract_features_ray(man, Path(root) / "store", backbone=f"chinese-clip:{ckpt}", batch_size=64,
                           num_cpus=cpus, threads=1, progress=False)
status = {k: v for k, v in (l.split(":", 1) for l in open("/proc/self/status")) if k in ("VmRSS", "VmHWM")}
print(json.dumps({"n": n, "posts": res.num_posts, "seconds": round(time.perf_counter() - t, 1),
                  "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "driver_rss_before_mib": round(rss0 / 1024, 1),
                  "driver_rss_end_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
                  "phase_peak_rss_mib": {k: round(v, 1) for k, v in peaks.items()}}))
'''


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--ray-cpus", dest="ray_cpus", type=int, default=2)
    args = ap.parse_args(argv)
    runs = []
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="sgmft-raymem-") as td:
            r = subprocess.run([sys.executable, "-c", CHILD, str(n), td, str(args.ray_cpus)], capture_output=True,
                               text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
            if r.returncode != 0:
                raise SystemExit(r.stderr[-3000:])
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    out = {"benchmark": "ray-driver-memory", "runs": runs,
           "peak_rss_ratio_largest_over_smallest": round(runs[-1]["driver_peak_rss_mib"] / runs[0]["driver_peak_rss_mib"], 3),
           "driver_kib_per_post": round((runs[-1]["driver_peak_rss_mib"] - runs[0]["driver_peak_rss_mib"]) * 1024
                                        / max(1, runs[-1]["n"] - runs[0]["n"]), 2),
           "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/bench_ray_memory.py " + " ".join(sys.argv[1:])}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
