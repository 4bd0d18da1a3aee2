"""Write a small, valid sgmft feature store using numpy and the standard library only.

This is the reference for producing a store from another program (see
docs/feature-store.md): it does not import sgmft. Features are random but
class-dependent (a per-class centre plus noise), so a model trained on them can learn.

    python examples/write_features_numpy.py out/toy-store --n 400 --dim 64
    python -c "from sgmft.features import validate_feature_store as v; print(v('out/toy-store'))"
"""
import argparse
import json
import os
import shutil
import tempfile

import numpy as np

LABELS = ["home", "work", "school", "restaurant", "cinema", "gym", "shopping", "travel"]


def l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="store directory to create (must not exist)")
    ap.add_argument("--n", type=int, default=400, help="number of posts (>= 10)")
    ap.add_argument("--dim", type=int, default=64, help="feature width D")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.n < 10 or args.dim < 1:
        raise SystemExit("--n must be >= 10 (so train and test are non-empty) and --dim >= 1")
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out} already exists")
    rng = np.random.default_rng(args.seed)
    n, d, k = args.n, args.dim, len(LABELS)

    labels = (np.arange(n) % k).astype(np.int64)          # every class present
    rng.shuffle(labels)
    labels[rng.random(n) < 0.05] = -1                      # a few unlabelled posts
    cls = np.where(labels < 0, rng.integers(0, k, n), labels)
    text = l2(rng.normal(size=(k, d))[cls] + 0.8 * rng.normal(size=(n, d))).astype(np.float32)
    image = l2(rng.normal(size=(k, d))[cls] + 0.8 * rng.normal(size=(n, d))).astype(np.float32)
    image_mask = rng.random(n) >= 0.1                      # 10% of posts have no image ...
    image[~image_mask] = 0.0                               # ... and their rows hold zeros, never NaN

    ids = np.array([f"post{i:06d}" for i in range(n)])     # dtype <U10: unicode, no pickle
    users = np.array([f"user{i % max(1, n // 5):04d}" for i in range(n)])
    split = np.array(["train", "train", "train", "train", "train", "train", "train", "val", "test", "test"])[
        np.arange(n) % 10]

    meta = {"format": "sgmft-features", "version": 1, "num_posts": n, "dim": d, "dtype": "float32",
            "backbone": "random-numpy", "normalization": "l2", "label_names": LABELS,
            "extra": {"seed": args.seed, "generator": "examples/write_features_numpy.py"}}

    # Write into a temporary sibling directory, then rename: readers never see a partial store.
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-store-", dir=parent)
    try:
        arrays = {"ids": ids, "users": users, "text": text, "image": image, "labels": labels,
                  "split": split, "image_mask": image_mask}
        for name, arr in arrays.items():
            np.save(os.path.join(tmp, name + ".npy"), arr, allow_pickle=False)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.rename(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {n} posts, D={d}, to {args.out}")


if __name__ == "__main__":
    main()
