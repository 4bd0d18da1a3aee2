"""sgmft.errors: one base (SgmftError) for what a user can fix, one warning channel, and the
CLI's two exits: a user error is one line and exit 2, anything else a traceback and exit 1."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import pytest

from sgmft import errors
from sgmft.cli import VERBS, main
from sgmft.errors import (USER_ERRORS, BackboneMismatchError, BackboneUnavailableError, ImageLoadError,
                          InputError, PrecisionMismatchError, SgmftError, SgmftNote, UnknownNameError, UserError)


def test_user_errors_share_one_base_and_keep_their_builtin_class():
    for exc in (InputError, UserError, BackboneMismatchError, PrecisionMismatchError):
        assert issubclass(exc, SgmftError) and issubclass(exc, ValueError), exc
    assert issubclass(UnknownNameError, SgmftError) and issubclass(UnknownNameError, KeyError)
    assert issubclass(BackboneUnavailableError, SgmftError) and issubclass(ImageLoadError, SgmftError)
    # a KeyError subclass prints its message, not its repr
    assert str(UnknownNameError("unknown preset 'x'")) == "unknown preset 'x'"
    # they cross process boundaries (Ray tasks, spawned workers) as themselves
    e = pickle.loads(pickle.dumps(BackboneMismatchError("backbone differs")))
    assert type(e) is BackboneMismatchError and str(e) == "backbone differs"


def test_the_library_error_classes_are_sgmft_errors():
    from sgmft.atomic import OutputCollisionError
    from sgmft.checkpoint import CheckpointError
    from sgmft.features.store import FeatureStoreError
    from sgmft.ingest.manifest import ManifestError
    from sgmft.predict import BackboneMismatchError as Predict
    from sgmft.runs import RunError

    for exc in (OutputCollisionError, CheckpointError, FeatureStoreError, ManifestError, RunError):
        assert issubclass(exc, SgmftError) and issubclass(exc, ValueError), exc
    assert Predict is BackboneMismatchError          # the same class locally and on Ray


def test_unknown_names_are_user_errors():
    from sgmft.config import load_preset
    from sgmft.models import MODELS

    with pytest.raises(UnknownNameError, match="unknown preset 'nope'"):
        load_preset("nope")
    with pytest.raises(KeyError):                     # still a KeyError for existing callers
        MODELS.get("nope")


def _boom_verb(exc):
    def run(args):
        raise exc
    return run


@pytest.fixture
def verb(monkeypatch):
    """Replace the `presets` verb's command with one that raises the given exception."""
    import dataclasses

    def install(exc):
        monkeypatch.setitem(VERBS, "presets", dataclasses.replace(VERBS["presets"], run=_boom_verb(exc)))
    return install


def test_internal_key_error_is_a_bug_with_traceback(verb, capsys):
    verb(KeyError("x"))
    with pytest.raises(KeyError):                     # main() lets it through: the traceback, exit 1
        main(["presets"])
    verb(ValueError("an internal invariant"))
    with pytest.raises(ValueError):
        main(["presets"])
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("exc", [UserError("two options exclude each other"),
                                 UnknownNameError("unknown preset 'x'; known: a, b"),
                                 FileNotFoundError(2, "No such file or directory", "/no/such"),
                                 PermissionError(13, "Permission denied", "/root/x")])
def test_user_error_is_one_line_and_exit_2(verb, capsys, exc):
    verb(exc)
    assert main(["presets"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgmft presets: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "'unknown" not in err                      # KeyError subclasses: no quotes around the message


def test_the_installed_command_exits_1_with_a_traceback_on_a_bug(tmp_path):
    """Through the real entry point: an internal KeyError -> traceback, status 1; a user error
    -> one line, status 2."""
    code = ("import dataclasses, sys; from sgmft import cli\n"
            "def run(a): raise KeyError('internal')\n"
            "cli.VERBS['presets'] = dataclasses.replace(cli.VERBS['presets'], run=run)\n"
            "sys.exit(cli.main(['presets']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'internal'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sgmft.cli", "train", "--preset", "nope", "--print-config"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("sgmft train: error: unknown preset 'nope'")
    assert "Traceback" not in r.stderr


def test_notes_go_through_the_warning_channel():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        errors.note("resumed the run")
    assert [(x.category, str(x.message)) for x in w] == [(SgmftNote, "resumed the run")]


def test_no_print_of_notes_left_in_the_library():
    import pathlib
    import re

    import sgmft

    root = pathlib.Path(sgmft.__file__).parent
    hits = [f"{p.relative_to(root)}" for p in root.rglob("*.py")
            if re.search(r"""print\(f?["']note: """, p.read_text(encoding="utf-8"))]
    assert hits == [], f"notes printed directly instead of errors.note(): {hits}"


def test_file_errors_only_those_a_user_fixes():
    assert issubclass(FileNotFoundError, USER_ERRORS) and issubclass(IsADirectoryError, USER_ERRORS)
    assert not issubclass(OSError, USER_ERRORS)       # a full disk or an I/O error keeps its traceback
