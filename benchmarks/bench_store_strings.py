"""Feature store version 1 (fixed-width unicode ids/users) vs version 2 (UTF-8 + offsets):
bytes on disk, open time (full validation) and time to decode every id and user, interleaved
over ``--rounds``. Prints one JSON object.

    python benchmarks/bench_store_strings.py [--rows 100000] [--long 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--long", type=int, default=256, help="length of the one long id (0: none)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    from sgmft.features import FeatureStore, write_feature_store

    n = args.rows
    ids = np.array([f"weibo:{i:09d}" for i in range(n - 1)] + ["x" * max(1, args.long)])
    users = np.array([f"用户{i % 5000}" for i in range(n)])
    kw = dict(ids=ids, users=users, text=np.zeros((n, 8), np.float32), image=np.zeros((n, 8), np.float32),
              label_names=["a"])
    out: dict = {"rows": n, "long_id_chars": args.long, "versions": {}}
    with tempfile.TemporaryDirectory() as td:
        paths = {v: write_feature_store(Path(td) / f"v{v}", version=v, **kw) for v in (1, 2)}
        times = {v: {"open_s": [], "decode_s": []} for v in paths}
        for _ in range(args.rounds):
            for v, p in paths.items():
                t = time.perf_counter()
                fs = FeatureStore.open(p)
                t1 = time.perf_counter()
                a, u = np.asarray(fs.ids), np.asarray(fs.users)
                times[v]["open_s"].append(round(t1 - t, 3))
                times[v]["decode_s"].append(round(time.perf_counter() - t1, 3))
                assert (a == ids).all() and (u == users).all()
        for v, p in paths.items():
            files = {f.name: f.stat().st_size for f in p.iterdir() if f.name.startswith(("ids", "users"))}
            out["versions"][v] = {"string_files": files, "string_bytes": sum(files.values()), **times[v]}
    out["size_ratio_v1_over_v2"] = round(out["versions"][1]["string_bytes"] / out["versions"][2]["string_bytes"], 1)
    out["command"] = "python benchmarks/bench_store_strings.py " + " ".join(sys.argv[1:])
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
