"""Atomic writes: a file or folder appears complete at its final path, or not at all.

Everything is first written to a hidden temporary sibling (same folder, hence same file
system), flushed and fsync'ed, then moved into place with :func:`os.replace` (atomic on
POSIX and Windows); the parent folder is fsync'ed where the OS allows it. On an exception
the temporary file or folder is removed and the target is left as it was. A reader (or a
crash) never sees a half-written file.

* :func:`atomic_file`  - context manager yielding an open temp file;
* :func:`write_bytes`, :func:`write_text`, :func:`write_json` - one call;
* :func:`atomic_dir`   - context manager yielding a temp folder to fill;
* :func:`replace_dir`  - move a finished temp folder over a (possibly existing) folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["OutputCollisionError", "atomic_dir", "atomic_file", "check_outputs", "file_mode", "replace_dir",
           "share_tree", "write_bytes", "write_json", "write_text"]


from sgmft.errors import InputError  # noqa: E402  (user errors: SgmftError and ValueError)


class OutputCollisionError(InputError):
    """An output path names an input (or another output): refused before anything is written."""


def _same_or_inside(out: Path, inp: Path) -> bool:
    """True if writing ``out`` (a file, or a folder that replaces ``out``) would touch ``inp``:
    the same file after resolving symlinks (also hard links), or ``inp`` lies inside ``out``."""
    try:
        ro, ri = out.resolve(), inp.resolve()
    except OSError:
        return False
    if ro == ri or ri.is_relative_to(ro):
        return True
    try:
        return out.exists() and inp.exists() and os.path.samefile(out, inp)
    except OSError:
        return False


def check_outputs(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Raise :class:`OutputCollisionError` if an output path would overwrite an input
    (same file after resolving symlinks, hard links included, or an output folder that
    contains an input) or two outputs are the same file. ``None`` entries are ignored;
    the keys describe each path in the message ("the manifest", "--out", ...)."""
    ins = {k: Path(v) for k, v in inputs.items() if v is not None}
    outs = {k: Path(v) for k, v in outputs.items() if v is not None}
    for on, op in outs.items():
        for iname, ip in ins.items():
            if _same_or_inside(op, ip):
                raise OutputCollisionError(
                    f"{on} {op} would overwrite {iname} {ip}; choose another output path "
                    "(nothing was written)")
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if outs[a].resolve() == outs[b].resolve():
                raise OutputCollisionError(f"{a} and {b} are the same file {outs[a]}; choose different paths")


def _umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux
    /proc/self/status), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode(directory: bool = False) -> int:
    """The mode a plain ``open()`` / ``mkdir()`` would give under the user's umask (0644 /
    0755 with the usual 022): what every output file and folder gets, so a colleague given a
    copy can read it. ``mkstemp``/``mkdtemp`` and safetensors would leave 0600 / 0700."""
    return (0o777 if directory else 0o666) & ~_umask()


def share_tree(root: str | os.PathLike) -> None:
    """Give ``root`` and every file and folder below it :func:`file_mode` (symbolic links are
    left alone). For folders that libraries write (``save_pretrained``, safetensors)."""
    root = Path(root)
    fmode, dmode = file_mode(), file_mode(directory=True)
    if root.is_file() and not root.is_symlink():
        os.chmod(root, fmode)
        return
    for dirpath, dirnames, files in os.walk(root):
        os.chmod(dirpath, dmode)
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)


def _fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (a folder); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None,
                newline: str | None = None, perms: int | None = None) -> Iterator[IO[Any]]:
    """``with atomic_file(p, "w", encoding="utf-8") as f: f.write(...)``; ``"wb"`` for bytes.

    The file gets ``perms``, by default :func:`file_mode` (what ``open()`` gives under the
    umask; ``mkstemp`` would leave 0600, and outputs are meant to be shared).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if "b" in mode:
            f = os.fdopen(fd, mode)
        else:
            f = os.fdopen(fd, mode, encoding=encoding or "utf-8", newline=newline)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode() if perms is None else perms)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_file(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **kw) -> Path:
    """``obj`` as JSON (UTF-8, a final newline); ``kw`` go to :func:`json.dumps`."""
    kw.setdefault("ensure_ascii", False)
    return write_text(path, json.dumps(obj, indent=indent, **kw) + "\n")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``path`` (a sibling), replacing what is there.

    Files are fsync'ed first. An existing ``path`` is renamed aside, ``tmp`` renamed into
    place and the old folder deleted; if the second rename fails the old folder is put back.
    """
    tmp, path = Path(tmp), Path(path)
    _fsync_tree(tmp)
    if path.exists():
        aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, aside)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(aside, path)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(p) as tmp: <write files into tmp>``; on success ``tmp`` replaces ``p``,
    its files and folders readable under the umask (:func:`share_tree`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        share_tree(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
