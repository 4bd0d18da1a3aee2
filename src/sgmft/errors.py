"""Exceptions a user can fix (bad input, a missing file, unavailable weights), and the one
warning channel.

Every error a user can fix derives from :class:`SgmftError`; its message names the file,
field or setting and says what to do. The CLI turns those, and the operating system's file
errors (:data:`USER_ERRORS`), into ``sgmft VERB: error: <message>`` and exit status 2.
Anything else (a bare ``ValueError``, ``KeyError``, ``TypeError`` ...) is a bug: it keeps its
traceback and exits 1.

The library's input errors also subclass :class:`ValueError` (unknown names:
:class:`KeyError`), so ``except ValueError`` in user code keeps working.

Notes and warnings go out through one channel, :mod:`warnings` with :class:`SgmftWarning`
/ :class:`SgmftNote` (see :func:`note`); the CLI prints them as ``sgmft VERB: warning|note: ...``.

This module imports nothing heavy, so the CLI can build the tuple before torch is loaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path


class SgmftError(Exception):
    """Base of every error a user can fix. The CLI prints its message on one line, exit 2."""

    def __str__(self) -> str:                       # KeyError subclasses: no quotes around the message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InputError(SgmftError, ValueError):
    """Bad input or settings: a file, field, option or value that the user gives."""


class UserError(InputError):
    """A usage problem found by the front end (e.g. two options that exclude each other)."""


class ConfigError(InputError):
    """An invalid configuration: a preset, ``--set`` override or config field."""


class UnknownNameError(SgmftError, KeyError):
    """A name that is not in a registry or list (preset, architecture, table ...); the message
    lists the known names."""


class BackboneUnavailableError(SgmftError, RuntimeError):
    """The backbone's weights or code are not available here; the message says how to fix it."""


class BackboneMismatchError(InputError):
    """The backbone given for prediction (or on a Ray node) is not the one the features came from.
    The same class locally and on Ray."""


class PrecisionMismatchError(BackboneMismatchError):
    """Features or a backbone at another precision (fp32/bf16/int8) than the training features'."""


class ImageLoadError(SgmftError):
    """An image file that cannot be used. ``reason`` is short and human-readable."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # picklable (it crosses processes: Ray tasks, spawned workers)
        return type(self), (self.path, self.reason)


class SgmftWarning(UserWarning):
    """Something the user should know that does not stop the command (a class with no
    training posts, a modality missing everywhere). The CLI prints ``sgmft VERB: warning: ...``."""


class SgmftNote(SgmftWarning):
    """Information about what a command did on its own (resumed a run, took over a stale
    lock). The CLI prints ``sgmft VERB: note: ...``."""


def note(message: str, stacklevel: int = 2) -> None:
    """Send ``message`` through the one warning channel as a :class:`SgmftNote`."""
    warnings.warn(message, SgmftNote, stacklevel=stacklevel + 1)


# The OS's file errors a user fixes by giving another path (or permissions); other OSErrors
# (a full disk, an I/O error) are reported with their traceback.
FILE_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
)
USER_ERRORS: tuple[type[BaseException], ...] = (SgmftError, *FILE_ERRORS)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS)


__all__ = ["FILE_ERRORS", "USER_ERRORS", "BackboneMismatchError", "BackboneUnavailableError", "ConfigError",
           "ImageLoadError", "InputError", "PrecisionMismatchError", "SgmftError", "SgmftNote", "SgmftWarning", "UnknownNameError",
           "UserError", "is_user_error", "note"]
