"""Exceptions a user can fix (bad input, a missing file, unavailable weights).

The messages name the file, field or setting and say what to do. The CLI turns every
exception in :data:`USER_ERRORS` into ``sgmft VERB: error: <message>`` and exit status 2;
anything else is a bug and keeps its traceback. This module imports nothing heavy, so the
CLI can build the tuple before torch is loaded.
"""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """A usage problem found by the front end (e.g. two options that exclude each other)."""


class BackboneUnavailableError(RuntimeError):
    """The backbone's weights or code are not available here; the message says how to fix it."""


class ImageLoadError(Exception):
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


# ValueError covers the library's own input errors (FeatureStoreError, ManifestError,
# CheckpointError, BackboneMismatchError, config validation); KeyError an unknown name in a
# registry or preset list.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
    BackboneUnavailableError, ImageLoadError,
)

__all__ = ["USER_ERRORS", "BackboneUnavailableError", "ImageLoadError", "SgmftNote", "SgmftWarning", "UserError"]
