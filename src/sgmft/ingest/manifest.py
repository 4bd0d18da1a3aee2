"""The post manifest: the documented input format for raw posts (``docs/posts-manifest.md``).

A manifest is JSONL (one JSON object per line; ``.jsonl``/``.ndjson``/``.json``) or CSV
(``.csv``, UTF-8, header row) with the fields ``id`` (required, unique), ``user``, ``text``,
``images`` (paths relative to the manifest's directory; CSV: ``|``-separated; ``image`` = one
path), ``label`` and ``split``. :func:`read_manifest` checks every row up front and either
raises one :class:`ManifestError` listing all problems or, with ``on_error="skip"``, drops
the bad rows and returns them as :class:`Reject` records (also written as JSONL).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sgmft.atomic import atomic_file
from sgmft.labels import DEFAULT_LABELS

__all__ = ["DEFAULT_MAX_ID_CHARS", "DEFAULT_MAX_TEXT_CHARS", "DEFAULT_MAX_USER_CHARS", "Post", "Reject",
           "ManifestError", "ManifestChunk", "iter_manifest", "read_manifest", "write_rejects", "SPLITS"]

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "dev": "val", "test": "test"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
_MAX_LISTED = 50
# Field length limits (characters), overridable per call / CLI flag; docs/posts-manifest.md.
DEFAULT_MAX_ID_CHARS = 256
DEFAULT_MAX_USER_CHARS = 256
# A memory guard only, far above any real post (Weibo long posts: a few thousand characters): a
# longer-than-context text is kept and cut for the encoder (CleanConfig.long_text, docs/backbones.md).
DEFAULT_MAX_TEXT_CHARS = 1_000_000


@dataclass(frozen=True)
class Post:
    """One validated post. ``images`` are absolute resolved paths; ``line`` is 1-based."""

    id: str
    user: str
    text: str
    images: tuple[Path, ...]
    label: str | None
    split: str | None
    line: int


@dataclass
class Reject:
    """One problem with one manifest row (a row with several problems gives several)."""

    line: int
    id: str | None
    field: str
    reason: str
    stage: str = "manifest"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


from sgmft.errors import InputError  # noqa: E402  (user errors: SgmftError and ValueError)


class ManifestError(InputError):
    """Raised by :func:`read_manifest` with ``on_error="raise"``; ``.rejects`` has them all."""

    def __init__(self, path: str | Path, rejects: Sequence[Reject]) -> None:
        self.path, self.rejects = Path(path), list(rejects)
        lines = [f"{path}:{r.line}: field '{r.field}': {r.reason}" for r in self.rejects[:_MAX_LISTED]]
        if len(self.rejects) > _MAX_LISTED:
            lines.append(f"... and {len(self.rejects) - _MAX_LISTED} more problem(s)")
        rows = len({r.line for r in self.rejects})
        super().__init__(f"{len(self.rejects)} problem(s) in {rows} row(s) of manifest {path}:\n"
                         + "\n".join(lines))


def write_rejects(path: str | Path, rejects: Iterable[Reject | dict]) -> None:
    """Write ``rejects`` as JSONL (one object per line), atomically (:mod:`sgmft.atomic`)."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        for r in rejects:
            d = r.to_dict() if isinstance(r, Reject) else dict(r)
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


# -- reading ---------------------------------------------------------------------------------
def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, Reject | None]]:
    """(line, object, None) per non-blank line, or (line, None, Reject) for a broken one."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield n, None, Reject(n, None, "json", f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield n, json.loads(line), None
            except json.JSONDecodeError as e:
                yield n, None, Reject(n, None, "json", f"malformed JSON: {e.msg} (column {e.colno})")


def _csv_rows(path: Path) -> Iterator[tuple[int, Any, Reject | None]]:
    """(line, dict, None) per record; ``line`` is where the record starts (header = line 1).
    Streams the file; invalid UTF-8 anywhere raises :class:`ManifestError` naming its line
    (when the reader reaches it)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            yield from _csv_records(path, csv.reader(f))
        except UnicodeDecodeError:
            line, reason = _bad_utf8(path)
            raise ManifestError(path, [Reject(line, None, "csv", f"not valid UTF-8 ({reason})")]) from None


def _bad_utf8(path: Path) -> tuple[int, str]:
    """(line, reason) of the first invalid UTF-8 byte of ``path``, read in blocks."""
    dec, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            pending = len(dec.getstate()[0])
            try:
                dec.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return line + block[:max(0, e.start - pending)].count(b"\n"), e.reason
            if not block:
                return line, "truncated"
            line += block.count(b"\n")


def _csv_records(path: Path, reader) -> Iterator[tuple[int, Any, Reject | None]]:
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise ManifestError(path, [Reject(1, None, "csv", f"unreadable header: {e}")]) from None
    header = [h.strip() for h in header]
    if "id" not in header:
        raise ManifestError(path, [Reject(1, None, "id", f"the header has no 'id' column (columns: {header})")])
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, None, Reject(start, None, "csv", f"malformed CSV: {e}")
            start = reader.line_num + 1
            continue
        if row and any(c.strip() for c in row):
            if len(row) != len(header):
                yield start, None, Reject(start, None, "csv",
                                          f"row has {len(row)} fields, the header has {len(header)}")
            else:
                obj = dict(zip(header, row))
                if "images" in obj:  # CSV: a "|"-separated list of paths
                    obj["images"] = [p.strip() for p in obj["images"].split("|") if p.strip()]
                yield start, obj, None
        start = reader.line_num + 1


def _opt_str(obj: dict, key: str, problems: list[tuple[str, str]]) -> str | None:
    """A string field that may be absent/null; ints are accepted for id/user."""
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, int) and key not in ("id", "user")):
        problems.append((key, f"must be a string, got {type(v).__name__}"))
        return None
    return str(v).strip()


class _SeenIds:
    """The ids read so far and the line of each, in about 24 bytes an id whatever its length:
    128-bit BLAKE2b digests (a collision is as unlikely as in the shard cache's SHA-256 keys)
    in sorted numpy arrays, plus a dict of the recent ones, inserted into the arrays when it
    reaches 16,384 entries or 1/32 of them. So a streamed manifest's duplicate check does
    not keep its ids as Python strings."""

    def __init__(self) -> None:
        self.hi = np.empty(0, np.uint64)   # first 8 digest bytes (little-endian), sorted
        self.lo = np.empty(0, np.uint64)   # last 8, in the same order
        self.lines = np.empty(0, np.int64)
        self.recent: dict[bytes, int] = {}

    @staticmethod
    def _digest(pid: str) -> bytes:
        return hashlib.blake2b(pid.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def first_line(self, pid: str) -> int | None:
        """The line ``pid`` was first seen on, or None (then record it with :meth:`add`)."""
        d = self._digest(pid)
        if d in self.recent:
            return self.recent[d]
        hi, lo = int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")
        i = int(np.searchsorted(self.hi, np.uint64(hi)))
        while i < len(self.hi) and int(self.hi[i]) == hi:
            if int(self.lo[i]) == lo:
                return int(self.lines[i])
            i += 1
        return None

    def add(self, pid: str, line: int) -> None:
        self.recent[self._digest(pid)] = line
        if len(self.recent) >= max(16384, len(self.hi) // 32):
            new = np.frombuffer(b"".join(self.recent), dtype="<u8").reshape(-1, 2)
            lines = np.fromiter(self.recent.values(), np.int64, len(self.recent))
            order = np.argsort(new[:, 0], kind="stable")
            at = np.searchsorted(self.hi, new[order, 0])
            self.hi = np.insert(self.hi, at, new[order, 0])
            self.lo = np.insert(self.lo, at, new[order, 1])
            self.lines = np.insert(self.lines, at, lines[order])
            self.recent = {}


@dataclass
class _RowChecker:
    """The checks of one manifest row (:func:`iter_manifest`), with the state they share."""

    base: Path
    label_map: dict[str, str] | None
    require_labels: bool
    check_images: bool
    confine: Path | None
    limits: tuple[int | None, int | None, int | None]   # max id / user / text characters
    seen: _SeenIds

    def check(self, line: int, obj: Any) -> tuple[Post | None, list[Reject]]:
        if not isinstance(obj, dict):
            return None, [Reject(line, None, "json", f"expected a JSON object, got {type(obj).__name__}")]
        problems: list[tuple[str, str]] = []
        pid = self._id(obj, line, problems)
        user = _opt_str(obj, "user", problems) or ""
        text = obj.get("text")
        if text is None:
            text = ""
        elif not isinstance(text, str):
            problems.append(("text", f"must be a string, got {type(text).__name__}"))
        for fname, val, lim in zip(("id", "user", "text"), (pid, user, text), self.limits):
            if lim is not None and isinstance(val, str) and len(val) > lim:
                flag = f"--max-{fname}-chars"
                problems.append((fname, f"{len(val)} characters, more than the limit of {lim} ({flag})"))
        label = self._label(obj, problems)
        split = _opt_str(obj, "split", problems) or None
        if split is not None:
            if split.lower() in _SPLIT_ALIASES:
                split = _SPLIT_ALIASES[split.lower()]
            else:
                problems.append(("split", f"unknown split {split!r}; use train, val or test"))
        images = _images(obj, self.base, self.check_images, problems, self.confine)
        if problems:
            max_id = self.limits[0]
            shown_id = pid if not pid or max_id is None or len(pid) <= max_id else pid[:64] + "..."
            return None, [Reject(line, shown_id or None, f, r) for f, r in problems]
        return Post(pid, user, text, images, label, split, line), []

    def _id(self, obj: dict, line: int, problems: list[tuple[str, str]]) -> str | None:
        pid = _opt_str(obj, "id", problems)
        if not pid and not any(f == "id" for f, _ in problems):
            problems.append(("id", "missing or empty"))
        elif pid:
            first = self.seen.first_line(pid)
            if first is not None:
                problems.append(("id", f"duplicate id {pid!r}; first seen on line {first}"))
            else:
                self.seen.add(pid, line)
        return pid

    def _label(self, obj: dict, problems: list[tuple[str, str]]) -> str | None:
        label = _opt_str(obj, "label", problems) or None
        if label is not None and self.label_map is not None:
            if label.lower() in self.label_map:
                label = self.label_map[label.lower()]
            else:
                problems.append(("label", f"unknown label {label!r}; known: {', '.join(self.label_map.values())}"))
        if label is None and self.require_labels and not any(f == "label" for f, _ in problems):
            problems.append(("label", "missing (require_labels=True)"))
        return label


@dataclass
class ManifestChunk:
    """One piece of a streamed manifest (:func:`iter_manifest`): up to ``chunk_size`` valid
    posts in file order, and the rejects of the rows read since the previous chunk."""

    posts: list[Post]
    rejects: list[Reject]


def iter_manifest(path: str | Path, *, chunk_size: int = 4096, label_names: Sequence[str] | None = DEFAULT_LABELS,
                  require_labels: bool = False, check_images: bool = True, on_error: str = "raise",
                  image_root: str | Path | None = None, allow_any_path: bool = False,
                  max_id_chars: int | None = DEFAULT_MAX_ID_CHARS,
                  max_user_chars: int | None = DEFAULT_MAX_USER_CHARS,
                  max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS) -> Iterator[ManifestChunk]:
    """Read and validate a post manifest as a stream of :class:`ManifestChunk` (every chunk
    but the last holds exactly ``chunk_size`` posts), with the checks and rejects of
    :func:`read_manifest` (which is this function, collected). Memory does not grow with
    the file, except for the duplicate-id check (about 24 bytes an id) and the rejects.

    ``on_error="raise"``: after the last chunk, :class:`ManifestError` listing every problem
    if there was any; so a consumer that must not act on a bad manifest commits nothing
    before the iterator is exhausted. ``on_error="skip"``: bad rows are only reported in
    the chunks' ``rejects``. File-level problems (a CSV header without ``id``, invalid
    UTF-8 in a CSV) raise :class:`ManifestError` when they are reached, in both modes.
    """
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if int(chunk_size) < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    base = path.resolve().parent
    root = base
    if image_root is not None:
        root = Path(image_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image root (--image-root) is not a folder: {image_root}")
        root = root.resolve()
    checker = _RowChecker(base, None if label_names is None else {str(n).lower(): str(n) for n in label_names},
                          require_labels, check_images, None if allow_any_path else root,
                          (max_id_chars, max_user_chars, max_text_chars), _SeenIds())
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    posts: list[Post] = []
    rejects: list[Reject] = []
    all_rejects: list[Reject] = []   # on_error="raise" only
    for line, obj, broken in rows:
        post, bad = (None, [broken]) if broken is not None else checker.check(line, obj)
        if post is not None:
            posts.append(post)
        rejects.extend(bad)
        if on_error == "raise":
            all_rejects.extend(bad)
        if len(posts) == chunk_size:
            yield ManifestChunk(posts, rejects)
            posts, rejects = [], []
    if posts or rejects:
        yield ManifestChunk(posts, rejects)
    if all_rejects:
        raise ManifestError(path, all_rejects)


def read_manifest(path: str | Path, *, label_names: Sequence[str] | None = DEFAULT_LABELS,
                  require_labels: bool = False, check_images: bool = True,
                  on_error: str = "raise", rejects_path: str | Path | None = None,
                  image_root: str | Path | None = None, allow_any_path: bool = False,
                  max_id_chars: int | None = DEFAULT_MAX_ID_CHARS,
                  max_user_chars: int | None = DEFAULT_MAX_USER_CHARS,
                  max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS,
                  ) -> tuple[list[Post], list[Reject]]:
    """Read and validate a post manifest.

    Every row is checked before anything is returned: JSON/CSV syntax, ``id`` present and
    unique (a repeat is rejected and names the first line), field types, ``label`` among
    ``label_names`` (case-insensitive; ``None`` = any label accepted), ``split`` in
    train/val/test (aliases training/valid/validation/dev), ``images`` a list of strings,
    and (``check_images``) every listed image file exists. A post with no images is valid.

    Image paths are confined: each must resolve, after following symlinks, inside the
    manifest's folder, or inside ``image_root`` when given (relative paths are still
    relative to the manifest's folder); anything else (``../../etc/passwd``, an absolute
    path elsewhere, a symlink pointing out) is a reject of field ``images``/``image``.
    ``allow_any_path=True`` turns the check off. ``id``, ``user`` and ``text`` longer than
    ``max_*_chars`` characters are rejects too (``None`` = no limit).

    ``on_error="raise"``: raise :class:`ManifestError` if there is any problem.
    ``on_error="skip"``: drop bad rows; return ``(posts, rejects)``. In both modes the
    rejects are written to ``rejects_path`` when given (an empty file if all is well).
    The same checks as a stream of chunks: :func:`iter_manifest`.
    """
    posts: list[Post] = []
    rejects: list[Reject] = []
    chunks = iter_manifest(path, chunk_size=1 << 30, label_names=label_names, require_labels=require_labels,
                           check_images=check_images, on_error="skip", image_root=image_root,
                           allow_any_path=allow_any_path, max_id_chars=max_id_chars,
                           max_user_chars=max_user_chars, max_text_chars=max_text_chars)
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    for chunk in chunks:
        posts.extend(chunk.posts)
        rejects.extend(chunk.rejects)
    if rejects_path is not None:
        write_rejects(rejects_path, rejects)
    if rejects and on_error == "raise":
        raise ManifestError(path, rejects)
    return posts, rejects


def _images(obj: dict, base: Path, check: bool, problems: list[tuple[str, str]],
            confine: Path | None = None) -> tuple[Path, ...]:
    many, one = obj.get("images"), obj.get("image")
    if many not in (None, []) and one not in (None, ""):
        problems.append(("images", "give either 'images' (a list) or 'image' (one path), not both"))
        return ()
    if many in (None, []):
        many = [] if one in (None, "") else [one]
        key = "image"
    else:
        key = "images"
    if not isinstance(many, list) or not all(isinstance(p, str) for p in many):
        what = "a string" if key == "image" else "a list of strings"
        problems.append((key, f"must be {what}, got {json.dumps(many, ensure_ascii=False)[:80]}"))
        return ()
    out: list[Path] = []
    for rel in many:
        if not rel.strip():
            problems.append((key, "empty image path"))
            continue
        p = (base / rel.strip()).resolve()  # an absolute path stays absolute; symlinks are followed
        if confine is not None and not p.is_relative_to(confine):
            problems.append((key, f"image path {rel!r} resolves to {p}, outside the allowed folder {confine} "
                                  "(image paths must stay inside the manifest's folder or --image-root; "
                                  "--allow-any-path turns this check off)"))
            continue
        if check and not p.is_file():
            problems.append((key, f"image file not found: {rel}"))
        out.append(p)
    return tuple(out)
