"""``sgmft store upgrade STORE [--out NEW]``: convert a version-1 feature store to version 2
(ids and users as UTF-8 bytes + offsets; :func:`sgmft.features.store.upgrade_store`;
registered in :data:`sgmft.cli.VERBS`)."""

from __future__ import annotations

import argparse

HELP = "feature-store maintenance: `store upgrade STORE` converts a version-1 store to version 2"
DESCRIPTION = ("upgrade: rewrite a version-1 feature store (fixed-width ids.npy/users.npy) as version 2 "
               "(UTF-8 bytes + offsets: a long id or user costs only its own row). Features, labels, "
               "masks, splits and meta.json are kept as they are (text.npy and image.npy byte for byte), "
               "so models trained on the store predict the same. In place by default (atomic), or into "
               "--out. See docs/feature-store.md.")


def _size(path) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def cmd_store(args) -> int:
    from sgmft.cli.output import emit
    from sgmft.features.store import FeatureStore, upgrade_store

    before = FeatureStore.open(args.store, validate=False)
    v_before, size_before = before.meta["version"], _size(args.store)
    del before
    out = upgrade_store(args.store, args.out, overwrite=args.overwrite)
    after = FeatureStore.open(out, validate=False)
    doc = {"store": str(out), "source": str(args.store), "version_before": v_before,
           "version": after.meta["version"], "num_posts": len(after), "bytes_before": size_before,
           "bytes_after": _size(out), "changed": v_before != after.meta["version"]}
    text = (f"{args.store}: already version {v_before}; nothing to do" if not doc["changed"] else
            f"{args.store} (version {v_before}, {size_before:,} bytes) -> {out} (version {doc['version']}, "
            f"{doc['bytes_after']:,} bytes, {len(after)} posts)")
    emit(args, doc, text)
    return 0


def store_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("action", choices=["upgrade"], help="upgrade: version 1 -> version 2")
    s.add_argument("store", help="feature-store directory")
    s.add_argument("--out", default=None, help="write the upgraded store here instead of replacing STORE")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
