"""What every verb shares for its output: ``--json`` (stdout is exactly one JSON document)
and progress bars only on a terminal (``--progress`` / ``--no-progress`` override)."""

from __future__ import annotations

import contextlib
import json
import sys

__all__ = ["emit", "progress_on", "quiet_stdout"]


def emit(args, doc, text: str | None = None) -> None:
    """Print the verb's result: ``doc`` as JSON with ``--json`` (or when there is no ``text``),
    else ``text`` (nothing when ``text`` is empty)."""
    if getattr(args, "json", False) or text is None:
        print(json.dumps(doc, indent=2, ensure_ascii=False, default=str))
    elif text:
        print(text)


def quiet_stdout(args):
    """With ``--json``, whatever the library prints goes to stderr, keeping stdout for the one
    JSON document."""
    if getattr(args, "json", False):
        return contextlib.redirect_stdout(sys.stderr)
    return contextlib.nullcontext()


def progress_on(args) -> bool:
    """``--progress`` / ``--no-progress`` win; otherwise bars only when stderr is a terminal."""
    from sgmft.config import progress_enabled

    return progress_enabled(getattr(args, "progress", None))
