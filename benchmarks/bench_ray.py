"""Benchmark ``sgmft extract --engine ray`` against ``--engine local`` on this machine.

Prints one JSON object (also written to ``--json-out``). Both engines run the full
pipeline (``extract_features`` / ``extract_features_ray`` with the backbone given as a spec
string, so each loads it: manifest, image hashing, decoding, cleaning, tokenising,
preprocessing, forward, shards, store) on the same fresh SimPosts corpus with an empty
cache, interleaved: round r runs local then Ray (so load from other processes hits both
alike). One local Ray instance (``--ray-cpus``, default all cores) is started once; its
start-up (``ray.init``) is reported but excluded from the Ray throughput. Everything after
it is included: the driver's probe of the backbone, the replicas' model loading, the
pipeline and the store assembly. Both engines use ``--threads`` torch threads in the
process that runs the forward (Ray: one replica, ``--actors``), so the stores must be
byte-identical; the benchmark checks that too.

    python benchmarks/bench_ray.py --size base --num-posts 48 --batch-size 8 --rounds 2

``--size tiny`` (default) is a smoke run; ``--size base`` is a RANDOM Chinese-CLIP with
ViT-B/16 shapes (a realistic forward cost, no download).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "base"])
    ap.add_argument("--num-posts", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the forward")
    ap.add_argument("--actors", type=int, default=1, help="Ray backbone replicas")
    ap.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--json-out", help="also write the JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.features.backbones.tiny import build_tiny_chinese_clip
    from sgmft.features.extract import extract_features
    from sgmft.features.ray_engine import extract_features_ray
    from sgmft.ingest.manifest import read_manifest

    work = Path(tempfile.mkdtemp(prefix="sgmft-bench-ray-"))
    try:
        spec = f"chinese-clip:{build_tiny_chinese_clip(work / 'cc', size=args.size)}"
        manifest = generate_simposts(work / "posts", SimPostsConfig(num_posts=args.num_posts, seed=7))
        posts, _ = read_manifest(manifest)
        n_images = sum(len(p.images) for p in posts)
        t = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=1 << 30)
        ray_startup = time.perf_counter() - t
        kw = dict(batch_size=args.batch_size, threads=args.threads, progress=False)
        local_s, ray_s, ray_detail, identical = [], [], [], []
        for r in range(args.rounds):
            out_l, out_r = work / f"local{r}", work / f"ray{r}"
            t = time.perf_counter()
            res_l = extract_features(manifest, out_l, backbone=spec, **kw)
            local_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            res_r = extract_features_ray(manifest, out_r, backbone=spec, actors=args.actors, **kw)
            ray_s.append(time.perf_counter() - t)
            assert res_l.encoded == res_r.encoded == len(posts), (res_l.encoded, res_r.encoded)
            ray_detail.append({k: round(v, 2) if isinstance(v, float) else v for k, v in res_r.engine.items()})
            identical.append(all(filecmp.cmp(out_l / f.name, out_r / f.name, shallow=False)
                                 for f in out_l.iterdir()))
        cluster = ray.cluster_resources()
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(posts)
    local_tp = n * args.rounds / sum(local_s)
    ray_tp = n * args.rounds / sum(ray_s)
    out = {
        "benchmark": "extract-engines",
        "backbone": f"random-{args.size}-chinese-clip",
        "backbone_note": "RANDOM Chinese-CLIP built for the benchmark: timing only",
        "num_posts": n, "num_images": n_images, "batch_size": args.batch_size, "rounds": args.rounds,
        "threads": args.threads, "ray_actors": args.actors,
        "ray_cluster": {k: v for k, v in cluster.items() if k in ("CPU", "GPU", "memory", "object_store_memory")},
        "timing": ("full extract_features per engine (model loading included), fresh cache, engines interleaved "
                   "within each round; Ray start-up (ray.init, once) excluded from the Ray throughput"),
        "local": {"posts_per_s": round(local_tp, 3), "seconds_per_round": [round(x, 2) for x in local_s]},
        "ray": {"posts_per_s": round(ray_tp, 3), "seconds_per_round": [round(x, 2) for x in ray_s],
                "startup_s": round(ray_startup, 2), "per_round": ray_detail},
        "ray_vs_local": round(ray_tp / local_tp, 3),
        "ray_vs_local_per_round": [round(a / b, 3) for a, b in zip(local_s, ray_s)],
        "stores_byte_identical": all(identical),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "shared with other agents' jobs while measured"},
    }
    js = json.dumps(out, indent=1)
    print(js)
    if args.json_out:
        Path(args.json_out).write_text(js + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
