"""The `sgmft` command's frame: one verb table, one error path (exit 2, `sgmft VERB: error:`),
and the SimFeat verbs (the parser that used to live in data/simfeat.py)."""

from __future__ import annotations

import argparse
import json

import pytest

from sgmft.cli import VERBS, build_parser, main
from sgmft.errors import USER_ERRORS, BackboneUnavailableError, ImageLoadError, UserError

SMALL = ["--set", "num_posts=300", "--set", "test_size=60", "--set", "dim=64"]


def test_every_verb_of_the_table_is_a_subcommand_running_its_function():
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(VERBS)
    for name, verb in VERBS.items():
        assert sub.choices[name].get_default("func") is verb.run, name
        assert verb.help


def test_user_errors_are_one_tuple():
    for exc in (UserError, FileNotFoundError, FileExistsError, BackboneUnavailableError, ImageLoadError):
        assert issubclass(exc, USER_ERRORS), exc
    for bug in (TypeError, KeyError, AttributeError):   # a bug keeps its traceback (tests/test_errors.py)
        assert not issubclass(bug, USER_ERRORS), bug


def test_user_error_ends_with_exit_2_and_the_verb(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "s"), "--set", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgmft simulate: error: ") and "bogus" in err


def test_simulate_profile_and_overrides(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "s"), "--profile", "hetero", *SMALL, "--set", "content_dim=16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_posts"] == 300 and out["dim"] == 64
    from sgmft.features import FeatureStore

    cfg = FeatureStore.open(tmp_path / "s").meta["extra"]["simfeat"]["config"]
    assert cfg["profile"] == "hetero" and cfg["test_size"] == 60


def test_simfeat_report_prints_one_json_document(capsys):
    assert main(["simfeat-report", *SMALL, "--epochs", "1", "--no-logreg"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["config"]["num_posts"] == 300 and "mlp" in rep
    assert all(0.0 <= v <= 1.0 for v in rep["mlp"].values())


def test_simfeat_module_has_no_parser_of_its_own():
    import sgmft.data.simfeat as simfeat

    assert not hasattr(simfeat, "_main")
    with pytest.raises(SystemExit):
        main(["simfeat-report", "--profile", "no-such-profile"])


def test_bad_set_is_a_user_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--set", "lr=1"]) == 2
    assert capsys.readouterr().err.startswith("sgmft train: error: --set 'lr=1': write model.")


def test_presets_marks_the_default_and_the_docs_agree(capsys):
    """New-user item 5 of issue 19: `sgmft presets` marks the default preset, and "recommended"
    always names the SG-MFT reading (`sgmft`), never the default `trust`."""
    import re
    from pathlib import Path

    from sgmft.config import DEFAULT_PRESET

    assert main(["presets", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["default"] == DEFAULT_PRESET
    assert [p["name"] for p in doc["presets"] if p["default"]] == [DEFAULT_PRESET]
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    marked = [line.split()[1] for line in out.splitlines() if line.startswith("* ") and "arch=" in line]
    assert marked == [DEFAULT_PRESET] and f"default preset: {DEFAULT_PRESET}" in out
    root = Path(__file__).resolve().parents[1]
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    bad = [f"{p.name}: {line.strip()[:100]}" for p in texts if p.is_file()
           for line in p.read_text(encoding="utf-8").splitlines()
           if re.search(r"recommended preset", line, re.I) and not re.search(r"sgmft|SG-MFT", line)]
    assert bad == [], bad
