"""On-disk feature store: a directory of plain ``.npy`` files plus ``meta.json``.

The format (docs/feature-store.md) is deliberately numpy-only so that any program can
produce it, and every array is memory-mapped on read so that a store may exceed RAM.
Writers build the store in a temporary sibling directory, validate it, then rename it
into place, so a reader never sees a half-written store.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sgmft.atomic import replace_dir

FORMAT, VERSION = "sgmft-features", 1
FLOAT_DTYPES = ("float32", "float16")
SPLITS = ("train", "val", "test")
_OPTIONAL = ("users", "labels", "split", "text_mask", "image_mask", "regime")
_CHUNK_BYTES = 64 * 2**20  # content checks read this much at a time, so they work on memmaps > RAM
# Largest |feature value| a store may hold. Stored features are the model's inputs after the
# store's normalisation: L2-normalised CLIP features are <= 1 in absolute value, raw encoder
# outputs rarely exceed 100. Values beyond 1e4 are garbage (a wrong dtype, an unnormalised
# sum, a corrupt file) that would overflow training to NaN (docs/feature-store.md).
MAX_ABS_FEATURE = 1e4


log = logging.getLogger("sgmft.features")


def _lock_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".lock")   # beside the temp folder, never inside the store


def _lock_tmp(tmp: Path):
    """Hold an advisory lock beside ``tmp`` while its writer is alive (POSIX); None elsewhere."""
    try:
        import fcntl
    except ImportError:  # Windows: orphans are recognised by age instead
        return None
    f = open(_lock_path(tmp), "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def _unlock_tmp(tmp: Path, f) -> None:
    if f is not None:
        try:
            os.unlink(_lock_path(tmp))
        except OSError:
            pass
        f.close()


def _is_orphan(tmp: Path) -> bool:
    """True if no live writer holds ``tmp`` (its lock is free; without fcntl: older than a day)."""
    try:
        import fcntl
    except ImportError:
        import time

        return time.time() - tmp.stat().st_mtime > 86400
    lp = _lock_path(tmp)
    if not lp.exists():
        return True
    try:
        with open(lp, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a live writer
            fcntl.flock(f, fcntl.LOCK_UN)
            return True
    except OSError:
        return False


def clean_orphan_tmp(path: Path) -> list[Path]:
    """Delete ``.<name>.tmp-*`` folders beside the store ``path`` that no live writer holds
    (left by a run killed while it assembled the store); a note names each one."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in sorted(path.parent.glob(f".{path.name}.tmp-*")):
        if tmp.name.endswith(".lock") or not tmp.is_dir() or tmp.is_symlink() or not _is_orphan(tmp):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.unlink(_lock_path(tmp))
        except OSError:
            pass
        log.warning("note: removed %s, an unfinished store left by an interrupted run", tmp)
        removed.append(tmp)
    return removed


class FeatureStoreError(ValueError):
    """A feature store is missing, malformed or inconsistent; the message names the file."""


def _fail(path: Path, problem: str) -> FeatureStoreError:
    return FeatureStoreError(f"{path}: {problem}")


def _check_label_names(names, p: Path) -> None:
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise _fail(p, f"label_names must be a non-empty list of non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise _fail(p, f"label_names are not unique ({next(n for n in names if names.count(n) > 1)!r} repeated)")


def _read_meta(root: Path) -> dict:
    """Parse and check meta.json (cheap; no array is read)."""
    p = root / "meta.json"
    if not root.is_dir():
        raise _fail(root, "feature store directory does not exist")
    if not p.is_file():
        raise _fail(p, "missing meta.json")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(p, f"invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _fail(p, "top level must be a JSON object")
    if meta.get("format") != FORMAT:
        raise _fail(p, f"format must be {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("version") != VERSION:
        raise _fail(p, f"unsupported version {meta.get('version')!r} (this sgmft reads version {VERSION})")
    for key, low in (("num_posts", 0), ("dim", 1)):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise _fail(p, f"{key} must be an integer >= {low}, got {v!r}")
    if meta.get("dtype") not in FLOAT_DTYPES:
        raise _fail(p, f"dtype must be one of {FLOAT_DTYPES}, got {meta.get('dtype')!r}")
    _check_label_names(meta.get("label_names"), p)
    for key in ("backbone", "normalization"):
        if not isinstance(meta.setdefault(key, "unknown"), str):
            raise _fail(p, f"{key} must be a string")
    if not isinstance(meta.setdefault("extra", {}), dict):
        raise _fail(p, "extra must be a JSON object")
    if "regime_names" in meta:
        _check_regime_names(meta["regime_names"], p)
    return meta


def _check_regime_names(names, p: Path) -> None:
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise _fail(p, f"regime_names must be a non-empty list of non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise _fail(p, f"regime_names are not unique ({next(n for n in names if names.count(n) > 1)!r} repeated)")


def _load(root: Path, name: str, required: bool) -> np.ndarray | None:
    p = root / f"{name}.npy"
    if not p.is_file():
        if required:
            raise _fail(p, f"missing required array {name}.npy")
        return None
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _fail(p, f"cannot read as a plain (non-pickle) .npy array: {e}") from None


def _chunks(n: int, row_bytes: int):
    step = max(1, _CHUNK_BYTES // max(1, row_bytes))
    for s in range(0, n, step):
        yield s, min(n, s + step)


class FeatureStore:
    """A memory-mapped, read-only view of a feature store directory."""

    def __init__(self, path: Path, meta: dict, arrays: dict[str, np.ndarray | None]):
        self.path, self.meta = path, meta
        self.ids, self.text, self.image = arrays["ids"], arrays["text"], arrays["image"]
        self.users, self.labels, self.split = arrays["users"], arrays["labels"], arrays["split"]
        self.text_mask, self.image_mask = arrays["text_mask"], arrays["image_mask"]
        self.regime = arrays.get("regime")  # (N,) int codes into regime_names, or None

    @property
    def regime_names(self) -> list[str] | None:
        """Names of the per-post regimes (``regime.npy`` indexes this list), or None."""
        names = self.meta.get("regime_names")
        return None if names is None else list(names)

    def regimes(self, rows=None) -> np.ndarray | None:
        """(len(rows),) str regime name of each row (all rows when ``rows`` is None), or None
        when the store has no ``regime.npy``."""
        if self.regime is None:
            return None
        codes = np.asarray(self.regime if rows is None else self.regime[np.asarray(rows)])
        return np.asarray(self.regime_names, dtype=str)[codes]

    label_names = property(lambda self: list(self.meta["label_names"]), doc="Class names; labels index this list.")
    dim = property(lambda self: int(self.meta["dim"]), doc="Feature width D of text and image.")
    backbone = property(lambda self: str(self.meta["backbone"]), doc="Name of the feature extractor.")

    def __len__(self) -> int:
        return int(self.meta["num_posts"])

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, N={len(self)}, D={self.dim}, backbone={self.backbone!r})"

    @classmethod
    def open(cls, path, validate: bool = True) -> "FeatureStore":
        """Open a store. Shapes, dtypes and meta are always checked (cheap); ``validate``
        additionally scans the contents (finite values, label range, unique ids, splits)."""
        root = Path(path)
        meta = _read_meta(root)
        arrays = {n: _load(root, n, True) for n in ("ids", "text", "image")}
        arrays.update({n: _load(root, n, False) for n in _OPTIONAL})
        store = cls(root, meta, arrays)
        store._check_structure()
        if validate:
            store._check_contents()
        return store

    def indices(self, split: str) -> np.ndarray:
        """Row indices (int64) whose split value equals ``split``."""
        if self.split is None:
            raise _fail(self.path / "split.npy", "store has no split.npy, so it has no fixed split")
        if split not in SPLITS:
            raise _fail(self.path / "split.npy", f"unknown split {split!r}; expected one of {SPLITS}")
        return np.flatnonzero(np.asarray(self.split) == split).astype(np.int64)

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.npy"

    def _check_structure(self) -> None:
        n, d, fdt = len(self), self.dim, np.dtype(self.meta["dtype"])
        for name in ("text", "image"):
            a = getattr(self, name)
            if a.ndim != 2 or a.shape[0] != n:
                raise _fail(self._file(name), f"shape {a.shape}, expected ({n}, {d}): wrong row count")
            if a.shape[1] != d:
                raise _fail(self._file(name), f"width {a.shape[1]} != meta.dim {d}")
            if a.dtype != fdt:
                raise _fail(self._file(name), f"dtype {a.dtype.str} != meta.dtype {fdt.str} ({fdt})")
        if (self.regime is None) != ("regime_names" not in self.meta):
            if self.regime is None:
                raise _fail(self._file("regime"), "meta.json has regime_names but regime.npy is missing")
            raise _fail(self.path / "meta.json", "regime.npy exists but meta.json has no regime_names")
        kinds = {"ids": "U", "users": "U", "split": "U", "labels": "i", "text_mask": "b", "image_mask": "b",
                 "regime": "i"}
        for name, kind in kinds.items():
            a = getattr(self, name)
            if a is None:
                continue
            if a.ndim != 1 or a.shape[0] != n:
                raise _fail(self._file(name), f"shape {a.shape}, expected ({n},): wrong row count")
            if a.dtype.kind != kind:
                want = {"U": "unicode (<U...)", "i": "signed integer (int8/int16/int64)", "b": "bool"}[kind]
                raise _fail(self._file(name), f"dtype {a.dtype.str} is not {want}")

    def _check_contents(self) -> None:
        n = len(self)
        for name in ("text", "image"):
            a = getattr(self, name)
            for s, e in _chunks(n, a.shape[1] * a.itemsize):
                blk = a[s:e]
                with np.errstate(invalid="ignore"):
                    bad = ~(np.abs(blk) <= MAX_ABS_FEATURE).all(axis=1)     # NaN compares False
                if bad.any():
                    r = s + int(np.argmax(bad))
                    row = np.asarray(blk[r - s], dtype=np.float64)
                    if not np.isfinite(row).all():
                        raise _fail(self._file(name), f"non-finite value (NaN or Inf) in row {r} (id {str(self.ids[r])!r})")
                    col = int(np.argmax(np.abs(row)))
                    raise _fail(self._file(name), f"value {row[col]:.3g} in row {r} (id {str(self.ids[r])!r}), column "
                                f"{col}, is outside +-{MAX_ABS_FEATURE:g}: far outside any encoder's range "
                                "(L2-normalised CLIP features are within +-1); normalise the features")
        if self.labels is not None:
            k = len(self.label_names)
            for s, e in _chunks(n, 8):
                blk = np.asarray(self.labels[s:e])
                bad = (blk < -1) | (blk >= k)
                if bad.any():
                    r = s + int(np.argmax(bad))
                    raise _fail(self._file("labels"), f"unknown label {int(blk[r - s])} in row {r} "
                                f"(id {str(self.ids[r])!r}); valid are -1 (unlabelled) and 0..{k - 1}")
        if self.regime is not None:
            k = len(self.regime_names)
            for s, e in _chunks(n, self.regime.itemsize):
                blk = np.asarray(self.regime[s:e])
                bad = (blk < 0) | (blk >= k)
                if bad.any():
                    r = s + int(np.argmax(bad))
                    raise _fail(self._file("regime"), f"regime code {int(blk[r - s])} in row {r} (id "
                                f"{str(self.ids[r])!r}) is not an index into meta.regime_names (0..{k - 1})")
        order = np.argsort(self.ids, kind="stable")
        srt = np.asarray(self.ids)[order]
        dup = np.flatnonzero(srt[1:] == srt[:-1])
        if dup.size:
            i = int(dup[0])
            raise _fail(self._file("ids"), f"duplicate id {str(srt[i])!r} (rows {int(order[i])} and {int(order[i + 1])})")
        if self.split is not None:
            seen: set[str] = set()
            for s, e in _chunks(n, self.split.itemsize):
                blk = np.asarray(self.split[s:e])
                bad = ~np.isin(blk, SPLITS)
                if bad.any():
                    r = s + int(np.argmax(bad))
                    raise _fail(self._file("split"), f"invalid split value {str(blk[r - s])!r} in row {r}; expected one of {SPLITS}")
                seen.update(str(v) for v in np.unique(blk))
            for need in ("train", "test"):
                if need not in seen:
                    raise _fail(self._file("split"), f"empty split: no row is {need!r} ('train' and 'test' must be non-empty)")


def validate_feature_store(path) -> FeatureStore:
    """Fully validate the store at ``path``; return it opened, or raise FeatureStoreError."""
    return FeatureStore.open(path, validate=True)


def _as_str(values, width: int, what: str, start: int, path: Path) -> np.ndarray:
    arr = np.asarray(values).astype(str)
    if arr.size and int(np.char.str_len(arr).max()) > width:
        r = int(np.argmax(np.char.str_len(arr) > width))
        raise _fail(path / f"{what}.npy", f"{what} {str(arr[r])!r} in row {start + r} is longer than "
                    f"{'user' if what == 'users' else 'id'}_width={width}")
    return arr


class FeatureStoreWriter:
    """Streaming writer: preallocates memory-mapped files and fills them chunk by chunk.

    Use as a context manager; the store is validated and renamed into place on a clean
    exit (or ``close()``), and the temporary directory is discarded on an exception.
    """

    def __init__(self, path, *, num_posts: int, dim: int, label_names: Sequence[str], backbone: str = "unknown",
                 normalization: str = "l2", dtype: str = "float32", with_labels: bool = True,
                 with_users: bool = True, with_split: bool = False, with_masks: bool = False,
                 extra: dict | None = None, overwrite: bool = False, id_width: int = 64,
                 regime_names: Sequence[str] | None = None, user_width: int | None = None):
        self.path, self.overwrite = Path(path), overwrite
        self._check_target()
        if dtype not in FLOAT_DTYPES:
            raise FeatureStoreError(f"{self.path}: dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        self.meta = {"format": FORMAT, "version": VERSION, "num_posts": int(num_posts), "dim": int(dim),
                     "dtype": dtype, "backbone": backbone, "normalization": normalization,
                     "label_names": [str(x) for x in label_names], "extra": dict(extra or {})}
        _check_label_names(self.meta["label_names"], self.path / "meta.json")
        self._label_index = {name: i for i, name in enumerate(self.meta["label_names"])}
        self._regime_index = None
        if regime_names is not None:
            self.meta["regime_names"] = [str(x) for x in regime_names] if isinstance(regime_names, (list, tuple, np.ndarray)) else regime_names
            _check_regime_names(self.meta["regime_names"], self.path / "meta.json")
            if len(self.meta["regime_names"]) > np.iinfo(np.int16).max:
                raise _fail(self.path / "meta.json", "more than 32767 regime_names")
            self._regime_index = {name: i for i, name in enumerate(self.meta["regime_names"])}
        self.id_width, n = int(id_width), int(num_posts)
        # users get their own width (default: id_width), so a long user name does not pad ids.npy
        self.user_width = int(user_width) if user_width is not None else self.id_width
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.orphans_removed = clean_orphan_tmp(self.path)
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir()
        self._lockf = _lock_tmp(self._tmp)
        self._done: Path | None = None
        specs = {"ids": (f"<U{self.id_width}", (n,)), "text": (dtype, (n, dim)), "image": (dtype, (n, dim))}
        if with_users:
            specs["users"] = (f"<U{self.user_width}", (n,))
        if with_labels:
            specs["labels"] = ("<i8", (n,))
        if with_split:
            specs["split"] = ("<U5", (n,))
        if with_masks:
            specs["text_mask"] = specs["image_mask"] = ("|b1", (n,))
        if regime_names is not None:
            specs["regime"] = ("<i2", (n,))  # codes into meta.regime_names: 2 bytes a row whatever the names
        self._written = np.zeros(n, dtype=bool)
        try:
            self._arrays = {k: np.lib.format.open_memmap(self._tmp / f"{k}.npy", mode="w+", dtype=dt, shape=shp)
                            for k, (dt, shp) in specs.items()}
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            _unlock_tmp(self._tmp, self._lockf)
            raise

    def _check_target(self) -> None:
        p = self.path
        if p.exists() and not self.overwrite:
            raise _fail(p, "already exists; pass overwrite=True to replace it")
        if p.exists() and not (p.is_dir() and ((p / "meta.json").is_file() or not any(p.iterdir()))):
            raise _fail(p, "exists and is not a feature store (no meta.json); refusing to replace it")

    def write(self, start: int, *, ids, text, image, labels=None, users=None, split=None,
              text_mask=None, image_mask=None, regime=None) -> None:
        """Write rows ``start : start + len(ids)``. Labels may be indices or label names;
        regimes may be indices into ``regime_names`` or the names themselves."""
        if self._done is not None or not self._tmp.is_dir():
            raise FeatureStoreError(f"{self.path}: writer is already closed or aborted")
        a, n_all, tmp = self._arrays, len(self._written), self.path  # errors name the final path
        ids = _as_str(ids, self.id_width, "ids", start, tmp)
        n, end = len(ids), start + len(ids)
        if start < 0 or end > n_all:
            raise _fail(tmp / "ids.npy", f"rows {start}:{end} outside 0:{n_all}")
        given = {"labels": labels, "users": users, "split": split, "text_mask": text_mask, "image_mask": image_mask,
                 "regime": regime}
        for k, v in given.items():
            if v is not None and k not in a:
                raise _fail(tmp / f"{k}.npy", f"{k} given but the writer was created without it")
            if v is None and k in a and k not in ("text_mask", "image_mask"):
                raise _fail(tmp / f"{k}.npy", f"{k} missing for rows {start}:{end}")
        out = {"ids": ids}
        for k, v in (("text", text), ("image", image)):
            v = np.asarray(v)
            if v.shape != (n, self.meta["dim"]):
                raise _fail(tmp / f"{k}.npy", f"chunk shape {v.shape}, expected ({n}, {self.meta['dim']})")
            out[k] = v
        if labels is not None:
            out["labels"] = self._label_indices(labels, start)
        if regime is not None:
            out["regime"] = self._regime_codes(regime, start)
        if users is not None:
            out["users"] = _as_str(users, self.user_width, "users", start, tmp)
        if split is not None:
            out["split"] = np.asarray(split).astype(str)
            if not np.isin(out["split"], SPLITS).all():
                r = int(np.argmax(~np.isin(out["split"], SPLITS)))
                raise _fail(tmp / "split.npy", f"invalid split value {str(out['split'][r])!r} in row {start + r}")
        for k, v in (("text_mask", text_mask), ("image_mask", image_mask)):
            if k in a:
                out[k] = np.ones(n, bool) if v is None else np.asarray(v, dtype=bool)
        for k, v in out.items():
            if len(v) != n:
                raise _fail(tmp / f"{k}.npy", f"chunk has {len(v)} rows, expected {n} (len(ids))")
            a[k][start:end] = v
        self._written[start:end] = True

    def _label_indices(self, labels, start: int) -> np.ndarray:
        lab = np.asarray(labels)
        if lab.dtype.kind in "USO":
            out = np.empty(len(lab), dtype=np.int64)
            for i, name in enumerate(lab.tolist()):
                if name not in self._label_index:
                    raise _fail(self.path / "labels.npy", f"unknown label {name!r} in row {start + i}; "
                                f"known: {list(self._label_index)}")
                out[i] = self._label_index[name]
            return out
        if lab.dtype.kind not in "iu":
            raise _fail(self.path / "labels.npy", f"labels must be integers or label names, got dtype {lab.dtype}")
        bad = (lab < -1) | (lab >= len(self._label_index))
        if bad.any():
            r = int(np.argmax(bad))
            raise _fail(self.path / "labels.npy", f"unknown label {int(lab[r])} in row {start + r}")
        return lab.astype(np.int64)

    def _regime_codes(self, regime, start: int) -> np.ndarray:
        reg, p = np.asarray(regime), self.path / "regime.npy"
        names = self.meta["regime_names"]
        if reg.dtype.kind in "USO":
            out = np.empty(len(reg), dtype=np.int16)
            for i, name in enumerate(reg.tolist()):
                if name not in self._regime_index:
                    raise _fail(p, f"unknown regime {name!r} in row {start + i}; known: {names}")
                out[i] = self._regime_index[name]
            return out
        if reg.dtype.kind not in "iu":
            raise _fail(p, f"regime must be integers or regime names, got dtype {reg.dtype}")
        bad = (reg < 0) | (reg >= len(names))
        if bad.any():
            r = int(np.argmax(bad))
            raise _fail(p, f"regime code {int(reg[r])} in row {start + r} is not an index into regime_names (0..{len(names) - 1})")
        return reg.astype(np.int16)

    def close(self) -> Path:
        """Flush, validate and atomically move the store into place; return its path."""
        if self._done is not None:
            return self._done
        if not self._tmp.is_dir():
            raise FeatureStoreError(f"{self.path}: writer was aborted; nothing to close")
        try:
            if not self._written.all():
                r = int(np.argmin(self._written))
                raise _fail(self.path, f"{int((~self._written).sum())} rows never written (first: row {r})")
            for arr in self._arrays.values():
                arr.flush()
            self._arrays.clear()
            (self._tmp / "meta.json").write_text(json.dumps(self.meta, indent=1), encoding="utf-8")
            try:
                validate_feature_store(self._tmp)
            except FeatureStoreError as e:  # report the final path, not the temp dir
                raise FeatureStoreError(str(e).replace(str(self._tmp), str(self.path))) from None
            self._check_target()
            replace_dir(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        _unlock_tmp(self._tmp, self._lockf)
        self._lockf = None
        self._done = self.path
        return self.path

    def abort(self) -> None:
        """Discard everything written so far (the target path is untouched)."""
        self._arrays.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)
        _unlock_tmp(self._tmp, getattr(self, "_lockf", None))
        self._lockf = None

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_feature_store(path, *, ids, text, image, label_names, labels=None, users=None, split=None,
                        text_mask=None, image_mask=None, backbone: str = "unknown", normalization: str = "l2",
                        dtype: str = "float32", extra: dict[str, Any] | None = None, overwrite: bool = False,
                        regime=None, regime_names: Sequence[str] | None = None) -> Path:
    """Write a whole in-memory store at once (validated, atomic). Labels may be names.

    ``regime`` (optional): one regime per post, as names (then ``regime_names`` defaults to
    the sorted distinct names) or as indices into ``regime_names``; stored as ``regime.npy``
    (int16 codes) plus ``meta.regime_names`` (docs/feature-store.md)."""
    ids = np.asarray(ids).astype(str)
    text = np.asarray(text)
    if text.ndim != 2:
        raise FeatureStoreError(f"{path}/text.npy: text must be 2-D (N, D), got shape {text.shape}")
    users_s = np.asarray(users).astype(str) if users is not None else None
    width = max([1] + ([int(np.char.str_len(ids).max())] if ids.size else []))
    uwidth = max([1] + ([int(np.char.str_len(users_s).max())] if users_s is not None and users_s.size else []))
    if regime is not None and regime_names is None:
        reg = np.asarray(regime)
        if reg.dtype.kind not in "USO":
            raise FeatureStoreError(f"{path}/regime.npy: integer regime codes need regime_names")
        regime_names = sorted({str(x) for x in reg.tolist()})
    elif regime is None and regime_names is not None:
        raise FeatureStoreError(f"{path}/regime.npy: regime_names given without regime")
    with FeatureStoreWriter(path, num_posts=len(ids), dim=text.shape[1], label_names=label_names,
                            backbone=backbone, normalization=normalization, dtype=dtype,
                            with_labels=labels is not None, with_users=users is not None,
                            with_split=split is not None,
                            with_masks=text_mask is not None or image_mask is not None,
                            extra=extra, overwrite=overwrite, id_width=width, regime_names=regime_names,
                            user_width=uwidth) as w:
        w.write(0, ids=ids, text=text, image=image, labels=labels, users=users, split=split,
                text_mask=text_mask, image_mask=image_mask, regime=regime)
    return Path(path)
