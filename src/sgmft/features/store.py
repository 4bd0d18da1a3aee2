"""On-disk feature store: a directory of plain ``.npy`` files plus ``meta.json``.

The format (docs/feature-store.md) is deliberately numpy-only so that any program can
produce it, and every array is memory-mapped on read so that a store may exceed RAM.
Writers build the store in a temporary sibling directory, validate it, then rename it
into place, so a reader never sees a half-written store.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sgmft.atomic import replace_dir

FORMAT, VERSION = "sgmft-features", 2   # the version written; readers accept READ_VERSIONS
READ_VERSIONS = (1, 2)
# Version 2 stores these string columns as UTF-8 bytes plus row offsets (``ids.utf8.npy`` +
# ``ids.offsets.npy``), so a long value costs only its own row; version 1 as fixed-width
# unicode (``ids.npy``, every row padded to the longest value). ``split`` stays ``<U5``.
STRING_COLUMNS = ("ids", "users")
FLOAT_DTYPES = ("float32", "float16")
SPLITS = ("train", "val", "test")
_OPTIONAL = ("users", "labels", "split", "text_mask", "image_mask", "regime")
_CHUNK_BYTES = 16 * 2**20  # content checks read this much at a time, so they work on memmaps > RAM
_RELEASE_BYTES = 8 * 2**20  # the writer lets its written pages go after this many bytes (_drop_pages)
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


from sgmft.errors import InputError  # noqa: E402  (user errors: SgmftError and ValueError)


class FeatureStoreError(InputError):
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
    if meta.get("version") not in READ_VERSIONS:
        raise _fail(p, f"unsupported version {meta.get('version')!r} (this sgmft reads versions "
                    f"{', '.join(map(str, READ_VERSIONS))})")
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


class StringColumn:
    """A version-2 string column: UTF-8 bytes (``<name>.utf8.npy``, uint8) and ``N + 1`` row
    offsets into them (``<name>.offsets.npy``, int64), both memory-mapped. Reads like a 1-D
    numpy unicode array: ``col[i]`` is a ``np.str_``, ``col[a:b]`` / ``col[rows]`` /
    ``np.asarray(col)`` decode just those rows into a ``<U`` array; ``dtype`` is that of the
    whole column decoded (``<U`` + the longest value's length, from ``meta.string_chars``)."""

    ndim = 1

    def __init__(self, data: np.ndarray, offsets: np.ndarray, max_chars: int = 1):
        self.data, self.offsets = data, offsets
        self.dtype = np.dtype(f"<U{max(1, int(max_chars))}")

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __len__(self) -> int:
        return max(0, len(self.offsets) - 1)

    def _row(self, i: int) -> str:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return bytes(self.data[a:b]).decode("utf-8")

    def _rows(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            s, e, step = rows.indices(len(self))
            if step == 1:  # one contiguous read of the bytes
                off = np.asarray(self.offsets[s:e + 1] if e > s else [0], dtype=np.int64)
                return _decode(np.asarray(self.data[off[0]:off[-1]]), off - off[0])
            rows = range(s, e, step)
        idx = np.arange(len(self))[rows] if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        vals = [self._row(int(i)) for i in idx.reshape(-1)]
        return (np.array(vals, dtype=str) if vals else np.zeros(0, dtype="<U1")).reshape(idx.shape)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {int(key)} out of range for {len(self)} rows")
            return np.str_(self._row(i))
        return self._rows(key)

    def __iter__(self):
        for s in range(0, len(self), 65536):
            yield from self._rows(slice(s, s + 65536)).tolist()

    def __array__(self, dtype=None, copy=None):
        a = self._rows(slice(0, len(self))) if len(self) else np.zeros(0, dtype=self.dtype)
        want = self.dtype if dtype is None else np.dtype(dtype)
        return a if a.dtype == want else a.astype(want)

    def raw(self) -> np.ndarray:
        """Every row's UTF-8 bytes as one ``S`` array (equal strings <=> equal bytes): what
        the duplicate check sorts, at one byte per UTF-8 byte instead of four per character."""
        return _raw(np.asarray(self.data), np.asarray(self.offsets, dtype=np.int64))

    def __repr__(self) -> str:
        return f"StringColumn(N={len(self)}, bytes={len(self.data)})"


def _decode(buf: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Rows ``buf[off[i]:off[i+1]]`` (UTF-8) -> a ``<U`` array, without a Python loop: the
    bytes are scattered into an ``(n, longest)`` byte matrix viewed as ``S`` strings, then
    cast (ASCII) or decoded (``np.char.decode``, raising ``UnicodeDecodeError`` on bad bytes).
    Like numpy's own unicode arrays, trailing NUL characters are not kept."""
    if len(off) < 2:
        return np.zeros(0, dtype="<U1")
    raw = _raw(buf, off)
    if not (buf > 127).any():
        return raw.astype(f"<U{raw.dtype.itemsize}")
    return np.char.decode(raw, "utf-8")


def _raw(buf: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Rows ``buf[off[i]:off[i+1]]`` as an ``S`` (bytes) array, one row per value."""
    lens = np.diff(off)
    n, w = len(lens), max(1, int(lens.max())) if len(lens) else 1
    mat = np.zeros((n, w), np.uint8)
    step = max(1, 2**20 // w)   # rows at a time: the scatter indices (24 bytes a byte) stay ~24 MiB at most
    for s in range(0, n, step):
        e, o0 = min(n, s + step), int(off[s])
        ln, o1 = lens[s:e], int(off[min(n, s + step)])
        mat[s + np.repeat(np.arange(e - s), ln), np.arange(o1 - o0) - np.repeat(off[s:e] - o0, ln)] = buf[o0:o1]
    return mat.view(f"S{w}").reshape(n)


def _load_strings(root: Path, name: str, meta: dict, required: bool):
    """A string column: ``<name>.npy`` (version 1) or :class:`StringColumn` (version 2)."""
    if meta["version"] == 1:
        return _load(root, name, required)
    data, off = root / f"{name}.utf8.npy", root / f"{name}.offsets.npy"
    if not data.is_file() and not off.is_file():
        if required:
            raise _fail(off, f"missing required array {name}.offsets.npy (with {name}.utf8.npy)")
        return None
    d, o = _load(root, f"{name}.utf8", True), _load(root, f"{name}.offsets", True)
    if d.ndim != 1 or d.dtype != np.uint8:
        raise _fail(data, f"must be a 1-D uint8 array of UTF-8 bytes, got shape {d.shape} dtype {d.dtype.str}")
    if o.ndim != 1 or o.dtype.kind != "i" or o.dtype.itemsize != 8:
        raise _fail(off, f"must be a 1-D int64 array of row offsets, got shape {o.shape} dtype {o.dtype.str}")
    chars = meta.get("string_chars", {}).get(name, 1) if isinstance(meta.get("string_chars"), dict) else 1
    return StringColumn(d, o, chars if isinstance(chars, int) else 1)


def _chunks(n: int, row_bytes: int, *release):
    """Row ranges of about _CHUNK_BYTES; after each, the pages of the memory-mapped ``release``
    arrays are dropped from the process (:func:`_drop_pages`)."""
    step = max(1, _CHUNK_BYTES // max(1, row_bytes))
    for s in range(0, n, step):
        yield s, min(n, s + step)
        _drop_pages(*release)


def _drop_pages(*arrays) -> None:
    """Let the kernel drop memory-mapped arrays' pages from this process (flushed first; the
    data stays in the file and the page cache), so that writing or scanning a store does not
    grow the process's resident memory with the store's size (issue 22: Ray driver memory)."""
    for a in arrays:
        mm = getattr(a, "_mmap", None)
        if isinstance(mm, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            if a.flags.writeable:
                a.flush()
            mm.madvise(mmap.MADV_DONTNEED)


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
        arrays = {n: _load(root, n, True) for n in ("text", "image")}
        arrays.update({n: _load(root, n, False) for n in _OPTIONAL if n not in STRING_COLUMNS})
        arrays.update({n: _load_strings(root, n, meta, n == "ids") for n in STRING_COLUMNS})
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
        if name in STRING_COLUMNS and isinstance(getattr(self, name, None), StringColumn):
            return self.path / f"{name}.utf8.npy"
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
            if isinstance(a, StringColumn):
                self._check_offsets_shape(name, a, n)
                continue
            if a.ndim != 1 or a.shape[0] != n:
                raise _fail(self._file(name), f"shape {a.shape}, expected ({n},): wrong row count")
            if a.dtype.kind != kind:
                want = {"U": "unicode (<U...)", "i": "signed integer (int8/int16/int64)", "b": "bool"}[kind]
                raise _fail(self._file(name), f"dtype {a.dtype.str} is not {want}")

    def _check_offsets_shape(self, name: str, col: StringColumn, n: int) -> None:
        off = self.path / f"{name}.offsets.npy"
        if len(col.offsets) != n + 1:
            raise _fail(off, f"shape {col.offsets.shape}, expected ({n + 1},) (N + 1 offsets): wrong row count")
        if n >= 0 and (int(col.offsets[0]) != 0 or int(col.offsets[-1]) != len(col.data)):
            raise _fail(off, f"offsets must start at 0 and end at the byte count of {name}.utf8.npy "
                        f"({len(col.data)}), got {int(col.offsets[0])}..{int(col.offsets[-1])}")

    def _check_string_contents(self, name: str, col: StringColumn) -> None:
        """Offsets never decrease and every row is valid UTF-8 (chunked: works on memmaps > RAM)."""
        n = len(col)
        for s, e in _chunks(n, 64, col.offsets, col.data):
            off = np.asarray(col.offsets[s:e + 1])
            bad = np.diff(off) < 0
            if bad.any():
                r = s + int(np.argmax(bad))
                raise _fail(self.path / f"{name}.offsets.npy", f"offsets decrease at row {r}")
            buf = np.asarray(col.data[off[0]:off[-1]])
            if not (buf > 127).any():
                continue  # ASCII is valid UTF-8
            try:
                col._rows(slice(s, e))
            except UnicodeDecodeError:
                for r in range(s, e):
                    try:
                        col._row(r)
                    except UnicodeDecodeError as err:
                        raise _fail(self.path / f"{name}.utf8.npy", f"row {r} is not valid UTF-8 ({err.reason})") from None

    def _check_contents(self) -> None:
        n = len(self)
        for name in STRING_COLUMNS:
            if isinstance(getattr(self, name), StringColumn):
                self._check_string_contents(name, getattr(self, name))
        for name in ("text", "image"):
            a = getattr(self, name)
            for s, e in _chunks(n, a.shape[1] * a.itemsize, a):
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
            for s, e in _chunks(n, 8, self.labels):
                blk = np.asarray(self.labels[s:e])
                bad = (blk < -1) | (blk >= k)
                if bad.any():
                    r = s + int(np.argmax(bad))
                    raise _fail(self._file("labels"), f"unknown label {int(blk[r - s])} in row {r} "
                                f"(id {str(self.ids[r])!r}); valid are -1 (unlabelled) and 0..{k - 1}")
        if self.regime is not None:
            k = len(self.regime_names)
            for s, e in _chunks(n, self.regime.itemsize, self.regime):
                blk = np.asarray(self.regime[s:e])
                bad = (blk < 0) | (blk >= k)
                if bad.any():
                    r = s + int(np.argmax(bad))
                    raise _fail(self._file("regime"), f"regime code {int(blk[r - s])} in row {r} (id "
                                f"{str(self.ids[r])!r}) is not an index into meta.regime_names (0..{k - 1})")
        keys = self.ids.raw() if isinstance(self.ids, StringColumn) else np.asarray(self.ids)
        order = np.argsort(keys, kind="stable")
        srt = keys[order]
        dup = np.flatnonzero(srt[1:] == srt[:-1])
        if dup.size:
            i = int(dup[0])
            raise _fail(self._file("ids"), f"duplicate id {str(self.ids[int(order[i])])!r} (rows {int(order[i])} and {int(order[i + 1])})")
        if self.split is not None:
            seen: set[str] = set()
            for s, e in _chunks(n, self.split.itemsize, self.split):
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


def _as_str(values, width: int | None, what: str, start: int, path: Path) -> np.ndarray:
    arr = np.asarray(values).astype(str)
    if width is not None and arr.size and int(np.char.str_len(arr).max()) > width:
        r = int(np.argmax(np.char.str_len(arr) > width))
        raise _fail(path / f"{what}.npy", f"{what} {str(arr[r])!r} in row {start + r} is longer than "
                    f"{'user' if what == 'users' else 'id'}_width={width}")
    return arr


class _StringSink:
    """Writes one version-2 string column: rows arrive as chunks (in any order; a chunk that
    is not the next one waits, encoded, until the gap before it is filled), their UTF-8 bytes
    are appended to a raw file and their end offsets to a memory-mapped ``offsets.npy``."""

    def __init__(self, tmp: Path, name: str, n: int):
        self.tmp, self.name, self.n = tmp, name, n
        self.raw_path = tmp / f".{name}.utf8.raw"
        self.raw = open(self.raw_path, "wb")
        self.offsets = np.lib.format.open_memmap(tmp / f"{name}.offsets.npy", mode="w+", dtype="<i8", shape=(n + 1,))
        self.offsets[0] = 0
        self.next = self.pos = 0
        self.max_chars = 1
        self.pending: dict[int, list[bytes]] = {}

    def put(self, start: int, values: np.ndarray, path: Path) -> None:
        if start < self.next or start in self.pending:
            raise _fail(path, f"rows from {start} were already written (a version-2 string column takes each "
                        "row once)")
        if values.size:
            self.max_chars = max(self.max_chars, int(np.char.str_len(values).max()))
        self.pending[start] = [v.encode("utf-8") for v in values.tolist()]
        while self.next in self.pending:
            chunk = self.pending.pop(self.next)
            lens = np.fromiter(map(len, chunk), np.int64, len(chunk))
            self.offsets[self.next + 1:self.next + 1 + len(chunk)] = self.pos + np.cumsum(lens)
            self.raw.write(b"".join(chunk))
            self.pos += int(lens.sum())
            self.next += len(chunk)

    def close(self) -> None:
        """``<name>.utf8.npy`` = an .npy header + the raw bytes; the raw file is removed."""
        self.raw.close()
        if self.next != self.n:
            raise _fail(self.tmp / f"{self.name}.utf8.npy", f"rows overlap: rows {self.next}.. were written "
                        "by chunks that do not start where the previous one ended")
        self.offsets.flush()
        del self.offsets
        with open(self.tmp / f"{self.name}.utf8.npy", "wb") as f, open(self.raw_path, "rb") as r:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (self.pos,)})
            shutil.copyfileobj(r, f, 1 << 20)
        os.unlink(self.raw_path)

    def abort(self) -> None:
        self.raw.close()


class FeatureStoreWriter:
    """Streaming writer: preallocates memory-mapped files and fills them chunk by chunk.

    ``version=2`` (default) writes ids and users as UTF-8 bytes plus offsets (a long value
    costs only its own row; ``id_width``/``user_width`` are then not limits); ``version=1``
    writes fixed-width ``<U`` arrays of ``id_width``/``user_width`` characters.

    Use as a context manager; the store is validated and renamed into place on a clean
    exit (or ``close()``), and the temporary directory is discarded on an exception.
    """

    def __init__(self, path, *, num_posts: int, dim: int, label_names: Sequence[str], backbone: str = "unknown",
                 normalization: str = "l2", dtype: str = "float32", with_labels: bool = True,
                 with_users: bool = True, with_split: bool = False, with_masks: bool = False,
                 extra: dict | None = None, overwrite: bool = False, id_width: int = 64,
                 regime_names: Sequence[str] | None = None, user_width: int | None = None,
                 version: int = VERSION):
        self.path, self.overwrite = Path(path), overwrite
        self._check_target()
        if dtype not in FLOAT_DTYPES:
            raise FeatureStoreError(f"{self.path}: dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        if version not in READ_VERSIONS:
            raise FeatureStoreError(f"{self.path}: version must be one of {READ_VERSIONS}, got {version!r}")
        self.version = int(version)
        self.meta = {"format": FORMAT, "version": self.version, "num_posts": int(num_posts), "dim": int(dim),
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
        self._unreleased = 0
        self._strings: dict[str, _StringSink] = {}
        try:
            if self.version >= 2:
                for k in STRING_COLUMNS:
                    if specs.pop(k, None) is not None:
                        self._strings[k] = _StringSink(self._tmp, k, n)
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
        v1 = self.version == 1
        ids = _as_str(ids, self.id_width if v1 else None, "ids", start, tmp)
        n, end = len(ids), start + len(ids)
        if start < 0 or end > n_all:
            raise _fail(tmp / "ids.npy", f"rows {start}:{end} outside 0:{n_all}")
        given = {"labels": labels, "users": users, "split": split, "text_mask": text_mask, "image_mask": image_mask,
                 "regime": regime}
        for k, v in given.items():
            if v is not None and k not in a and k not in self._strings:
                raise _fail(tmp / f"{k}.npy", f"{k} given but the writer was created without it")
            if v is None and (k in a or k in self._strings) and k not in ("text_mask", "image_mask"):
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
            out["users"] = _as_str(users, self.user_width if v1 else None, "users", start, tmp)
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
        for k, v in out.items():
            if k in self._strings:
                self._strings[k].put(start, v, tmp / f"{k}.utf8.npy")
            else:
                a[k][start:end] = v
        self._written[start:end] = True
        self._unreleased += sum(v.nbytes for v in out.values())
        if self._unreleased > _RELEASE_BYTES:   # written rows leave this process's memory (_drop_pages)
            _drop_pages(*self._arrays.values(), *(sink.offsets for sink in self._strings.values()))
            self._unreleased = 0

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
            for sink in self._strings.values():
                sink.close()
            if self._strings:
                self.meta["string_chars"] = {k: sink.max_chars for k, sink in self._strings.items()}
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
        for sink in getattr(self, "_strings", {}).values():
            sink.abort()
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
                        regime=None, regime_names: Sequence[str] | None = None, version: int = VERSION) -> Path:
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
                            user_width=uwidth, version=version) as w:
        w.write(0, ids=ids, text=text, image=image, labels=labels, users=users, split=split,
                text_mask=text_mask, image_mask=image_mask, regime=regime)
    return Path(path)


def upgrade_store(path, out=None, *, overwrite: bool = False, chunk_rows: int = 65536) -> Path:
    """Convert a version-1 store to version 2 (ids and users as UTF-8 bytes + offsets).

    Every other array is copied value for value through the streaming writer (same dtype and
    shape, so ``text.npy``/``image.npy`` and the rest come out byte-identical), ``meta.json``
    keeps every key but ``version`` (and gains ``string_chars``). ``out=None`` upgrades in
    place (atomically: the new store replaces the old one only once it is complete and valid).
    Returns the path written; a store already at version 2 is left alone (returns ``path``)."""
    src = FeatureStore.open(path, validate=True)
    if src.meta["version"] >= 2:
        if out is not None and Path(out) != Path(path):
            raise _fail(Path(path) / "meta.json", "is already version 2; nothing to upgrade (copy it instead)")
        return Path(path)
    dst = Path(path) if out is None else Path(out)
    meta, n = src.meta, len(src)
    opt = {k: getattr(src, k) is not None for k in ("labels", "users", "split")}
    with FeatureStoreWriter(dst, num_posts=n, dim=src.dim, label_names=meta["label_names"], backbone=meta["backbone"],
                            normalization=meta["normalization"], dtype=meta["dtype"], with_labels=opt["labels"],
                            with_users=opt["users"], with_split=opt["split"],
                            with_masks=src.text_mask is not None or src.image_mask is not None,
                            extra=meta.get("extra"), overwrite=overwrite or out is None,
                            regime_names=meta.get("regime_names"), version=2) as w:
        w.meta.update({k: v for k, v in meta.items() if k not in w.meta and k != "string_chars"})
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            rows = {k: None if getattr(src, k) is None else np.asarray(getattr(src, k)[s:e])
                    for k in ("labels", "users", "split", "text_mask", "image_mask", "regime")}
            w.write(s, ids=np.asarray(src.ids[s:e]), text=np.asarray(src.text[s:e]),
                    image=np.asarray(src.image[s:e]), **rows)
    return dst
