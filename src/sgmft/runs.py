"""The layout of a training run folder. Every path inside a run is built here.

::

  <run>/
    model/            the exported checkpoint (:mod:`sgmft.checkpoint`): what predict needs
    run.json          store, preset, configs, split sizes, best validation accuracy, timings
    split.npy         the train/val/test assignment used (evaluate reuses it)
    run.lock          present while ``sgmft train`` writes the run (holds the writer's pid)
    lightning/        checkpoints/last.ckpt: the resume state of a finished epoch, at most about 10 s old
                      (safetensors + JSON, never a pickle: :mod:`sgmft.train.resume`),
                      checkpoints/best.safetensors: the weights of the best epoch so far,
                      metrics.csv: one row per finished epoch (while training, up to last.ckpt's),
                      kept across resumes
    eval-<split>/     reports of ``sgmft evaluate`` (metrics.json, predictions.csv, figures)

Reading a run needs neither Lightning nor the training code. This module also holds what
makes a run folder safe to write into (docs/training.md, "Resuming"): the run's
:func:`fingerprint` (config, store contents, seed), the writer's :class:`RunLock`, and the
checks that decide whether ``train`` starts, resumes, refuses, or has nothing to do.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sgmft import atomic

try:                                  # POSIX; elsewhere the lock falls back to a pid check
    import fcntl
except ImportError:                   # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunDir", "RunError", "RunLock", "cleanup_on_failure", "describe_differences", "fingerprint",
           "ids_digest", "locate", "split_rows", "store_digest"]


from sgmft.errors import InputError  # noqa: E402  (user errors: SgmftError and ValueError)


class RunError(InputError):
    """A run folder that cannot be written as asked; the message names it and says what to do."""


MAX_JSON_BYTES = 64 * 2**20


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
    def tensorboard(self) -> Path:
        """TensorBoard event files (``train.tensorboard`` / ``sgmft train --tensorboard``)."""
        return self.root / "tensorboard"

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
    def best_weights(self) -> Path:
        """The model weights (safetensors) of the best validation epoch so far."""
        return self.lightning_checkpoints / "best.safetensors"

    @property
    def metrics_csv(self) -> Path:
        return self.lightning / "metrics.csv"

    @property
    def lock_file(self) -> Path:
        return self.root / "run.lock"

    # entries of a run folder that sgmft writes (``--overwrite`` removes exactly these)
    OWNED = ("model", "run.json", "split.npy", "lightning", "tensorboard", "candidates", "cv")   # both: train/select.py

    def owned_entries(self) -> list[Path]:
        """What ``train``/``evaluate`` wrote here (model/, run.json, ..., eval-*/), existing ones only."""
        if not self.root.is_dir():
            return []
        out = [self.root / n for n in self.OWNED if (self.root / n).exists() or (self.root / n).is_symlink()]
        out += sorted(p for p in self.root.glob("eval-*") if p.is_dir())
        return out

    def foreign_entries(self) -> list[Path]:
        """Entries that are neither sgmft's nor its temporary files (a user's own files)."""
        if not self.root.is_dir():
            return []
        mine = {p.name for p in self.owned_entries()} | {self.lock_file.name}
        return sorted(p for p in self.root.iterdir() if p.name not in mine and not _is_temp(p.name))

    def clear(self) -> None:
        """Remove everything sgmft wrote in this run (``--overwrite``); other files stay."""
        for p in self.owned_entries():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        self.remove_orphans()

    def remove_orphans(self) -> list[Path]:
        """Delete temporary files and folders that a killed writer left (atomic writes' temp
        siblings ``.NAME.*.tmp`` and ``.NAME.old-*``) in the run folder and lightning/."""
        gone = []
        for folder in (self.root, self.lightning, self.lightning_checkpoints):
            if not folder.is_dir() or folder.is_symlink():
                continue
            for p in folder.iterdir():
                if _is_temp(p.name):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                    gone.append(p)
        return gone

    def eval_dir(self, split: str = "test") -> Path:
        return self.root / f"eval-{split}"

    def evaluations(self) -> list[dict]:
        """The reports of ``sgmft evaluate`` kept in this run: one dict per readable
        ``eval-*/metrics.json`` that holds an ``accuracy``, in folder order, with its metrics,
        ``report`` (the folder), ``split`` (recorded, else the folder's name after ``eval-``) and
        ``store`` (the evaluated store's path as recorded, else None). The one reader of these
        reports (the model card and the service use it)."""
        out = []
        for d in sorted(self.root.glob("eval-*")):
            f = d / "metrics.json"
            try:
                if not f.is_file() or f.stat().st_size > MAX_JSON_BYTES:
                    continue
                m = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                continue
            if isinstance(m, dict) and "accuracy" in m:
                out.append({**m, "report": str(d), "split": m.get("split") or d.name.removeprefix("eval-"),
                            "store": m.get("store")})
        return out

    def read_run_json(self) -> dict | None:
        """``run.json`` as a dict, or None when it is missing, unreadable, not a regular file
        (a FIFO would block) or larger than 64 MiB."""
        try:
            if not self.run_json.is_file() or self.run_json.stat().st_size > MAX_JSON_BYTES:
                return None
            data = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def symlinked_entries(self) -> list[Path]:
        """sgmft's files and folders in this run that are symbolic links: writing through them
        would write (or delete) outside the run, so training refuses them."""
        paths = [self.root / n for n in self.OWNED] + [
            self.lock_file, self.lightning_checkpoints, self.metrics_csv, self.last_checkpoint, self.best_weights]
        return [p for p in paths if p.is_symlink()]

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


def split_rows(store, run: "RunDir | None", split: str) -> np.ndarray:
    """Rows of ``split`` (``all``, ``train``, ``val``, ``test``) of a feature store (any object
    with ``path``, ``ids``, ``split``, ``indices()`` and ``len()``), as ``evaluate`` and
    ``predict --store`` both take them: the run's own saved split when the run was trained on
    this very store (same post ids; its ``val`` is the part carved for model selection), else
    the store's ``split.npy``. ``all``: every row."""
    if split == "all":
        return np.arange(len(store))
    saved = None if run is None else run.split
    if saved is not None and saved.exists():
        if (run.read_run_json() or {}).get("store_ids") == ids_digest(store.ids):
            return np.flatnonzero(np.load(saved) == split)
    if store.split is not None:
        return store.indices(split)
    if saved is None or not saved.exists():
        raise RunError(f"{store.path}: the store has no split.npy and no training-run split was found next to "
                       f"the checkpoint, so split {split!r} is undefined; use split 'all' (--split all) or give "
                       "the run folder")
    raise RunError(f"{store.path}: not the store this model was trained on (post ids differ), so the run's "
                   f"saved split does not apply and the store has no split.npy; use split 'all' (--split all)")


def _is_temp(name: str) -> bool:
    """A temporary sibling written by :mod:`sgmft.atomic` (``.NAME.xxxx.tmp``, ``.NAME.old-xxxx``)."""
    return name.startswith(".") and (name.endswith(".tmp") or ".old-" in name)


def ids_digest(ids: np.ndarray) -> str:
    """A fingerprint of a store's post ids, so a saved split is only reused on the same posts."""
    h = hashlib.sha256()
    for start in range(0, len(ids), 65536):
        h.update("\n".join(map(str, ids[start:start + 65536])).encode("utf-8"))
    return h.hexdigest()[:16]


# -- fingerprint ---------------------------------------------------------------------------------
FINGERPRINT_VERSION = 1
# train settings that cannot change the trained weights (progress bars, loader processes,
# TensorBoard files),
# and `epochs`: a run may be extended to more epochs (the result equals a run that had the
# larger count from the start); train() checks it separately
COSMETIC_TRAIN_FIELDS = ("progress", "num_workers", "tensorboard", "epochs")
# train fields added after runs were recorded, left out of the fingerprint at the value that gives the old
# behaviour, so those runs keep their fingerprint (and resume, and count as done)
TRAIN_FIELDS_ADDED = {"select_on": "val_acc", "calibration_holdout": 0.0}
_HASH_CHUNK = 8 * 2**20


def store_digest(store_path) -> str:
    """SHA-256 of a feature store's contents: every top-level file (``meta.json``, the
    ``.npy`` arrays, anything else there), by name and bytes, read in 8 MiB chunks. Hidden
    files are skipped. Moving or copying the store keeps the digest; changing one byte does not."""
    root = Path(store_path)
    h = hashlib.sha256()
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode("utf-8"))
        with open(p, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _plain(obj):
    """JSON-normal form (tuples become lists) so that stored and fresh inputs compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def fingerprint_inputs(model: dict, train: dict, store_path, digest: str | None = None) -> dict:
    """What a run's result depends on: the model config, the train config (seed included;
    cosmetic fields left out) and the store's contents."""
    train = {k: v for k, v in train.items() if k not in COSMETIC_TRAIN_FIELDS
             and not (k in TRAIN_FIELDS_ADDED and v == TRAIN_FIELDS_ADDED[k])}
    return _plain({"version": FINGERPRINT_VERSION, "model": model, "train": train,
                   "store": digest or store_digest(store_path)})


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def describe_differences(old: dict | None, new: dict, limit: int = 6) -> list[str]:
    """``["train.lr: 0.0005 -> 0.01", "store contents: ab12.. -> cd34.."]`` (at most ``limit``)."""
    a, b = _flatten(old or {}), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            name = "store contents" if key == "store" else key
            va, vb = a.get(key, "<unset>"), b.get(key, "<unset>")
            if key == "store":
                va, vb = str(va)[:12] + "...", str(vb)[:12] + "..."
            diffs.append(f"{name}: {va} -> {vb}")
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


# -- the writer's lock ---------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``run.lock``: one writer per run folder.

    On POSIX the lock is an advisory ``flock`` on the file, which the kernel drops when the
    holder dies (even by SIGKILL), so a lock file left by a dead writer is simply taken over
    (``note`` then says so). The file holds the writer's pid, host and start time for the
    message a second writer gets. Without ``fcntl`` a lock whose pid no longer runs on this
    host is taken over. ``release()`` deletes the file.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.path = run.lock_file
        self.note: str | None = None
        self._fd: int | None = None

    def _read(self) -> dict:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _busy(self, info: dict) -> RunError:
        who = (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
               if info.get("pid") else "another process")
        return RunError(f"{self.run.root}: another sgmft train is writing this run ({who}; lock file "
                        f"{self.path}). Wait for it to finish, or train into another --out.")

    def _stale_note(self, info: dict) -> None:
        if info.get("pid"):
            self.note = (f"{self.path}: a previous writer (pid {info.get('pid')} on {info.get('host')}, "
                         f"started {info.get('started')}) is no longer running; taking over its lock")

    def acquire(self) -> "RunLock":
        self.run.root.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if fcntl is None:                                    # pragma: no cover - Windows
            return self._acquire_by_pid(me)
        while True:
            try:                                             # never through a symlink (it could
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:                             # truncate someone's file)
                raise RunError(f"{self.path}: cannot be opened as the run's lock file ({e.strerror}); "
                               "remove it if it is a link or not a regular file") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise RunError(f"{self.path}: is not a regular file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._busy(self._read()) from None
            try:                                             # still the file at the path? (a releasing
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino   # writer unlinks it)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._stale_note(self._read())
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode("utf-8"))
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_by_pid(self, me: dict) -> "RunLock":      # pragma: no cover - Windows
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = self._read()
                pid = info.get("pid")
                if info.get("host") == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    self._stale_note(info)
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy(info) from None
            os.write(fd, json.dumps(me).encode("utf-8"))
            os.fsync(fd)
            self._fd = fd
            return self
        raise self._busy(self._read())

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)               # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
