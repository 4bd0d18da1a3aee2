"""The layout of a training run folder. Every path inside a run is built here.

::

  <run>/
    model/            the exported checkpoint (:mod:`sgmft.checkpoint`): what predict needs
    run.json          store, preset, configs, split sizes, best validation accuracy, timings
    split.npy         the train/val/test assignment used (evaluate reuses it)
    lightning/        Lightning's resumable checkpoints (checkpoints/last.ckpt, best.ckpt)
                      and per-epoch metrics (metrics.csv)
    eval-<split>/     reports of ``sgmft evaluate`` (metrics.json, predictions.csv, figures)

Reading a run needs neither Lightning nor the training code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sgmft import atomic

__all__ = ["RunDir", "cleanup_on_failure", "ids_digest", "locate"]


@dataclass(frozen=True)
class RunDir:
    """Paths of one run folder (nothing is created by building one)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def split(self) -> Path:
        return self.root / "split.npy"

    @property
    def lightning(self) -> Path:
        return self.root / "lightning"

    @property
    def lightning_checkpoints(self) -> Path:
        return self.lightning / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        """Lightning's checkpoint of the last finished epoch: an interrupted run resumes from it."""
        return self.lightning_checkpoints / "last.ckpt"

    @property
    def metrics_csv(self) -> Path:
        return self.lightning / "metrics.csv"

    def eval_dir(self, split: str = "test") -> Path:
        return self.root / f"eval-{split}"

    def read_run_json(self) -> dict | None:
        """``run.json`` as a dict, or None when it is missing or unreadable."""
        try:
            data = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def write_run_json(self, data: dict) -> Path:
        return atomic.write_text(self.run_json, json.dumps(data, indent=2))

    def write_split(self, split: np.ndarray) -> Path:
        with atomic.atomic_file(self.split, "wb") as f:
            np.save(f, split)
        return self.split


@contextlib.contextmanager
def cleanup_on_failure(root):
    """Around a training run: if it fails, remove what this run created in ``root`` and
    ``root`` itself if this run created it, so a failed ``train`` leaves no empty run folder.

    Never touches what was there before (a user's folder, an earlier run's files), and keeps
    everything when a resumable checkpoint (``lightning/checkpoints/last.ckpt``) was written:
    an interrupted run resumes from it."""
    root = Path(root)
    existed = root.exists()
    before = set(root.iterdir()) if existed and root.is_dir() else set()
    try:
        yield
    except BaseException:
        if not RunDir(root).last_checkpoint.exists() and root.is_dir():
            for p in set(root.iterdir()) - before:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):
                    root.rmdir()           # only if empty
        raise


def locate(path) -> tuple[Path, RunDir | None]:
    """A run folder or its ``model/`` folder -> ``(model folder, its run or None)``.

    A bare model folder (copied out of its run) has no run.
    """
    p = Path(path)
    if (p / "model").is_dir() and not (p / "model.safetensors").exists():
        return p / "model", RunDir(p)
    if (p.parent / "run.json").is_file():
        return p, RunDir(p.parent)
    return p, None


def ids_digest(ids: np.ndarray) -> str:
    """A fingerprint of a store's post ids, so a saved split is only reused on the same posts."""
    h = hashlib.sha256()
    for start in range(0, len(ids), 65536):
        h.update("\n".join(map(str, ids[start:start + 65536])).encode("utf-8"))
    return h.hexdigest()[:16]
