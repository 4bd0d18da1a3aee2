"""Benchmark peak memory of ``sgmft extract`` and ``sgmft predict --manifest`` on an
adversarial corpus (issue 9): many large, highly compressible images (one colour,
``--side`` x ``--side`` px, PNG and JPEG, a few hundred KB each on disk but 64 Mpx when
decoded), several per post, the same files listed again and again.

Each measured command runs in its own child process (``python -m sgmft.cli ...``); its
peak RSS comes from ``os.wait4`` (the kernel's ``ru_maxrss``). Linux carries a process's
RSS high-water mark across ``fork``/``exec``, so this parent stays small: it imports
neither torch nor PIL, and the inputs are built in a separate child. A watchdog polls
``/proc/<pid>/status`` and kills the child if its RSS passes ``--kill-mb`` (so a
regression cannot take a shared machine down). A control corpus with the same posts
but small (320 px) images is measured the same way in the same run, so the figures
compare like with like.

    python benchmarks/bench_memory.py [--posts 24] [--images-per-post 3] [--side 8000]
                                      [--json-out benchmarks/results-bench_memory.json]

Prints one JSON object (also written to ``--json-out`` when given). ``ok`` is true when
every adversarial peak is <= ``--target-mb`` (2048).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(cmd: list[str], kill_mb: float, env: dict) -> dict:
    """Run ``cmd``; return its exit status, wall time and peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed = {"by_watchdog": False, "seen_mb": 0.0}

    def watch():
        while proc.poll() is None:
            mb = _rss_mb(proc.pid)
            killed["seen_mb"] = max(killed["seen_mb"], mb)
            if mb > kill_mb:
                killed["by_watchdog"] = True
                proc.kill()
                return
            time.sleep(0.05)

    out_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    w = threading.Thread(target=watch, daemon=True)
    w.start()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    w.join(timeout=1)
    out = b"".join(out_chunks).decode("utf-8", "replace")
    return {"cmd": " ".join(cmd[2:]), "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "killed_by_watchdog": killed["by_watchdog"],
            "output_tail": out[-600:] if proc.returncode else out[-300:]}


def build_inputs(root: Path, posts: int, per_post: int, side: int, env: dict) -> dict:
    """Tiny random backbone, a trained tiny run, the adversarial and the control corpora."""
    from PIL import Image

    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.features.backbones.tiny import build_tiny_chinese_clip

    spec = f"chinese-clip:{build_tiny_chinese_clip(root / 'tinycc')}"
    train_man = generate_simposts(root / "train", SimPostsConfig(num_posts=80, seed=1))
    py = sys.executable
    for cmd in (["extract", str(train_man), "--out", str(root / "train-store"), "--backbone", spec, "--no-progress"],
                ["train", str(root / "train-store"), "--out", str(root / "run"), "--epochs", "1",
                 "--set", "model.n_tokens=8", "--no-progress"]):
        subprocess.run([py, "-m", "sgmft.cli", *cmd], env=env, check=True, stdout=subprocess.DEVNULL)

    big = root / "adversarial"
    (big / "img").mkdir(parents=True)
    im = Image.new("RGB", (side, side), (200, 40, 90))  # one colour: tiny on disk, huge decoded
    im.save(big / "img" / "big.png", compress_level=9)
    im.save(big / "img" / "big.jpg", quality=90)
    Image.new("RGBA", (side, side), (10, 120, 30, 128)).save(big / "img" / "big-rgba.png", compress_level=9)
    del im
    small = root / "control"
    (small / "img").mkdir(parents=True)
    Image.new("RGB", (320, 320), (200, 40, 90)).save(small / "img" / "big.png")
    Image.new("RGB", (320, 320), (200, 40, 90)).save(small / "img" / "big.jpg", quality=90)
    Image.new("RGBA", (320, 320), (10, 120, 30, 128)).save(small / "img" / "big-rgba.png")
    names = ["img/big.png", "img/big.jpg", "img/big-rgba.png"]
    for folder in (big, small):
        with open(folder / "manifest.jsonl", "w", encoding="utf-8") as f:
            for i in range(posts):
                f.write(json.dumps({"id": f"p{i}", "text": f"第{i}条微博 在图书馆学习",
                                    "images": [names[(i + k) % 3] for k in range(per_post)]}) + "\n")
    sizes = {p.name: p.stat().st_size for p in (big / "img").iterdir()}
    return {"spec": spec, "run": str(root / "run"), "adversarial": str(big / "manifest.jsonl"),
            "control": str(small / "manifest.jsonl"), "file_bytes": sizes}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", type=int, default=24)
    ap.add_argument("--images-per-post", dest="per_post", type=int, default=3)
    ap.add_argument("--side", type=int, default=8000, help="side of the adversarial images (pixels)")
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    ap.add_argument("--target-mb", dest="target_mb", type=float, default=2048)
    ap.add_argument("--kill-mb", dest="kill_mb", type=float, default=4096,
                    help="watchdog: kill a measured command above this RSS")
    ap.add_argument("--json-out", dest="json_out", help="also write the JSON here")
    ap.add_argument("--_build", dest="build", help=argparse.SUPPRESS)  # internal: build inputs in ROOT
    args = ap.parse_args(argv)
    if args.build:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        print(json.dumps(build_inputs(Path(args.build), args.posts, args.per_post, args.side, env)))
        return {"ok": True}

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="sgmft-benchmem-") as td:
        root = Path(td)
        built = subprocess.run([py, __file__, "--_build", str(root), "--posts", str(args.posts), "--images-per-post",
                                str(args.per_post), "--side", str(args.side)], env=env, check=True,
                               stdout=subprocess.PIPE, text=True)
        inp = json.loads(built.stdout.strip().splitlines()[-1])
        runs = {}
        for corpus in ("control", "adversarial"):
            man = str(inp[corpus])
            runs[f"extract_{corpus}"] = measure(
                [py, "-m", "sgmft.cli", "extract", man, "--out", str(root / f"store-{corpus}"), "--backbone",
                 inp["spec"], "--batch-size", str(args.batch_size), "--no-progress"], args.kill_mb, env)
            runs[f"predict_{corpus}"] = measure(
                [py, "-m", "sgmft.cli", "predict", str(inp["run"]), "--manifest", man, "--out",
                 str(root / f"preds-{corpus}.jsonl"), "--batch-size", str(args.batch_size), "--no-progress"],
                args.kill_mb, env)
    adv = [runs["extract_adversarial"], runs["predict_adversarial"]]
    res = {
        "benchmark": "bench_memory",
        "corpus": {"posts": args.posts, "images_per_post": args.per_post, "side_px": args.side,
                   "decoded_mpx_per_image": round(args.side * args.side / 1e6, 1),
                   "decoded_bytes_listed_mb": round(args.posts * args.per_post * args.side ** 2 * 4 / 2**20),
                   "file_bytes": inp["file_bytes"]},
        "runs": runs,
        "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in runs.items()},
        "ratio_adversarial_over_control": {
            v: round(runs[f"{v}_adversarial"]["peak_rss_mb"] / max(1e-9, runs[f"{v}_control"]["peak_rss_mb"]), 3)
            for v in ("extract", "predict")},
        "target_mb": args.target_mb,
        "ok": all(r["rc"] == 0 and r["peak_rss_mb"] <= args.target_mb for r in adv),
        "parent_peak_rss_mb": round(__import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    text = json.dumps(res, indent=1, ensure_ascii=False)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
