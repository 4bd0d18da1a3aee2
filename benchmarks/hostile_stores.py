"""Stores a new user brings, made hostile one phenomenon at a time, and what `sgmft train` does with each.

From one SimFeat store this writes variants that real data has and SimFeat lacks, trains a preset on each with
the command line (`python -m sgmft train VARIANT --out RUN --preset P`, one process per variant) and prints one
JSON line per variant: the exit status (0 trained, 2 an error the user can fix, anything else a bug with its
traceback), the seconds, the test accuracy where it trained, and the warnings and errors it printed. No
variant should give a traceback: a bug there is a crash a user would meet. The variants:

* ``scale``: text features x 1,000 and image features + 5 (features not L2-normalised, a large offset);
* ``lowrank``: the text in a rank-8 subspace (a tiny or collapsed encoder);
* ``dup``: the text features a copy of the image's (one encoder fed twice);
* ``constant_image``: one placeholder image for every post;
* ``half_missing``: no image for half the posts (``image_mask`` False);
* ``absent_place``: one place with test posts but no training post;
* ``rare_place``: 77 % of posts at one place and a place with a single training post;
* ``tiny``: 60 posts of 8 places (fewer validation posts than places at 10 %);
* ``two_places``: two of the eight places only;
* ``noise_labels``: labels shuffled (nothing to learn: the run should say so).

    python benchmarks/hostile_stores.py --workdir W --preset lda            # closed-form: about a minute
    python benchmarks/hostile_stores.py --workdir W                         # the default, `auto`: about an hour
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sgmft.features import FeatureStore, write_feature_store


def _variants(cols: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, dict]]:
    """name -> (rows kept, columns replaced), from the base store's columns."""
    rng = np.random.default_rng(0)
    lab, split, text, image = cols["labels"], cols["split"], cols["text"], cols["image"]
    n = len(lab)
    every = np.ones(n, bool)
    basis = rng.standard_normal((text.shape[1], 8)).astype(np.float32)
    tiny = np.zeros(n, bool)
    tiny[rng.choice(n, 60, replace=False)] = True
    rare = (lab == 0) | (rng.random(n) < 0.04)
    six = np.flatnonzero(rare & (lab == 6) & (split == "train"))[:1]      # place 6 keeps one training post
    rare &= (lab != 6) | np.isin(np.arange(n), six)
    return {
        "scale": (every, {"text": text * 1000, "image": image + 5}),
        "lowrank": (every, {"text": (text @ basis) @ basis.T / 100}),
        "dup": (every, {"text": image.copy()}),
        "constant_image": (every, {"image": np.repeat(image[:1], n, 0)}),
        "half_missing": (every, {"text_mask": every, "image_mask": rng.random(n) >= 0.5}),
        "absent_place": (~((lab == 3) & (split == "train")), {}),
        "rare_place": (rare, {}),
        "tiny": (tiny, {}),
        "two_places": (lab < 2, {}),
        "noise_labels": (every, {"labels": rng.permutation(lab)}),
    }


def write_variants(base: Path, workdir: Path) -> list[Path]:
    fs = FeatureStore.open(base)
    cols = {"ids": np.asarray(fs.ids), "text": np.asarray(fs.text, np.float32),
            "image": np.asarray(fs.image, np.float32), "labels": np.asarray(fs.labels),
            "users": np.asarray(fs.users), "split": np.asarray(fs.split)}
    out = []
    for name, (keep, over) in _variants(cols).items():
        data = {k: v[keep] for k, v in {**cols, **over}.items()}
        write_feature_store(workdir / name, label_names=fs.label_names, overwrite=True, **data)
        out.append(workdir / name)
    return out


def train_one(store: Path, preset: str, timeout: int) -> dict:
    run = store.parent / f"run-{store.name}"
    cmd = [sys.executable, "-m", "sgmft", "train", str(store), "--out", str(run), "--preset", preset,
           "--overwrite", "--no-progress"]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    lines = [ln for ln in err.splitlines() if ": warning: " in ln or ": error: " in ln or "Error" in ln]
    row = {"variant": store.name, "preset": preset, "rc": rc, "seconds": round(time.time() - t0, 1),
           "messages": sorted(set(lines))[:8]}
    if rc == 0:
        info = json.loads((run / "run.json").read_text())
        row["chosen"] = info.get("chosen_preset", preset)
        ev = subprocess.run([sys.executable, "-m", "sgmft", "evaluate", str(run), str(store), "--json"],
                            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if ev.returncode == 0:
            row["test_accuracy"] = round(json.loads(ev.stdout).get("accuracy", float("nan")), 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="stores and runs are written here")
    ap.add_argument("--preset", default="auto", help="preset to train on each variant (default: the default)")
    ap.add_argument("--variants", nargs="*", help="only these variants (default: all)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per command")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = args.workdir / "base"
    if not (base / "meta.json").exists():   # SimFeat hetero, 1,500 posts, D = 320 (hetero needs D > 258)
        subprocess.run([sys.executable, "-m", "sgmft", "simulate", str(base), "--num-posts", "1500", "--dim", "320",
                        "--profile", "hetero", "--overwrite"], check=True, capture_output=True)
    for store in write_variants(base, args.workdir):
        if not args.variants or store.name in args.variants:
            print(json.dumps(train_one(store, args.preset, args.timeout), ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
