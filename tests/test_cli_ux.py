"""The command line as a new user meets it (issue 8, each item reproduced by the issue's author):
simulate's test size, failed runs, evaluate's split and stdout, --json, progress bars, help
texts, --version, --devices, presets, one-seed tables, demo --quick, and predicting with a
run that has no raw-post backbone."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from sgmft.cli import VERBS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "concat", "--epochs", "1", "--set", "model.classifier_hidden=[16]"]


@pytest.fixture(scope="module")
def simfeat(tmp_path_factory):
    """A small SimFeat store: its split.npy has train and test only (no val)."""
    from sgmft.data.simfeat import SimFeatConfig, write_simfeat

    return write_simfeat(tmp_path_factory.mktemp("sf") / "store", SimFeatConfig(num_posts=300, test_size=60, dim=32))


@pytest.fixture(scope="module")
def run(simfeat, tmp_path_factory):
    from sgmft.config import apply_overrides, load_preset
    from sgmft.train import train

    p = load_preset("concat")
    p.model = apply_overrides(p.model, ["classifier_hidden=[16]"])
    p.train.epochs, p.train.progress = 1, False
    out = tmp_path_factory.mktemp("run") / "r"
    train(simfeat, out, p)
    return out


def subparsers():
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


# -- simulate ------------------------------------------------------------------------------------
def test_simulate_num_posts_alone_keeps_the_20_percent_test_part(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "s"), "--num-posts", "600", "--dim", "32", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["num_posts"] == 600 and doc["test_size"] == 120
    assert main(["simulate", str(tmp_path / "t"), "--num-posts", "600", "--dim", "32",
                 "--set", "test_size=600"]) == 2                    # an explicit bad size: a clear error
    err = capsys.readouterr().err
    assert "test_size=600" in err and "num_posts=600" in err


def test_simulate_takes_its_folder_as_out_too_as_every_other_verb_does(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "s"), "--num-posts", "200", "--dim", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["store"] == str(tmp_path / "s")
    assert (tmp_path / "s" / "meta.json").is_file()
    assert main(["simulate", "--num-posts", "200"]) == 2                   # neither spelling
    assert "sgmft simulate OUT (or --out OUT)" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 2
    assert "two output folders" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_an_unknown_option_is_refused_by_the_verb_with_its_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "run", "store", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: sgmft evaluate")
    assert "sgmft evaluate: error: unrecognized arguments: --bogus" in err and "sgmft evaluate --help" in err


# -- train ---------------------------------------------------------------------------------------
def _failing_train(monkeypatch, checkpoint: bool = False):
    import sgmft.train.fit as fit

    def boom(model_cfg, train_cfg):
        if checkpoint:
            from sgmft.runs import RunDir

            ck = RunDir(boom.out).last_checkpoint
            ck.parent.mkdir(parents=True)
            ck.write_bytes(b"resumable")
        raise RuntimeError("boom")

    monkeypatch.setattr(fit, "LitClassifier", boom)
    return boom


def test_failed_train_leaves_no_run_folder(simfeat, tmp_path, monkeypatch):
    from sgmft.train import train

    _failing_train(monkeypatch)
    out = tmp_path / "runs" / "new"
    with pytest.raises(RuntimeError, match="boom"):
        train(simfeat, out, "concat")
    assert not out.exists()                                         # created by the run: gone


def test_failed_train_never_removes_a_users_folder(simfeat, tmp_path, monkeypatch):
    from sgmft.train import train

    _failing_train(monkeypatch)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError):
        train(simfeat, out, "concat")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]   # only what the run made is gone


def test_failed_train_keeps_a_resumable_checkpoint(simfeat, tmp_path, monkeypatch):
    from sgmft.train import train

    boom = _failing_train(monkeypatch, checkpoint=True)
    boom.out = out = tmp_path / "r"
    with pytest.raises(RuntimeError):
        train(simfeat, out, "concat")
    assert (out / "lightning" / "checkpoints" / "last.ckpt").exists()


def test_train_json_is_one_document_and_no_bars_off_a_terminal(simfeat, tmp_path, capsys):
    assert main(["train", str(simfeat), "--out", str(tmp_path / "r"), *TINY, "--json"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert Path(doc["checkpoint"]).is_dir() and 0.0 <= doc["best_val_acc"] <= 1.0
    assert "%|" not in cap.err                                      # stderr is not a TTY here


def test_progress_flag_turns_bars_on(simfeat, tmp_path, capsys):
    assert main(["train", str(simfeat), "--out", str(tmp_path / "r"), *TINY, "--progress"]) == 0
    assert "%|" in capsys.readouterr().err


def test_progress_flags_are_one_tri_state_on_every_verb_with_bars():
    subs = subparsers()
    for name, verb in VERBS.items():
        opts = {o for a in subs[name]._actions for o in a.option_strings}
        if verb.progress:
            assert {"--progress", "--no-progress"} <= opts, name
    base = {"train": ["train", "s", "--out", "o"], "experiments": ["experiments"], "demo": ["demo"],
            "extract": ["extract", "m", "--out", "o", "--backbone", "b"], "predict": ["predict", "r"],
            "demo-raw": ["demo-raw"]}
    ap = build_parser()
    for name, argv in base.items():
        assert VERBS[name].progress, name
        assert ap.parse_args(argv).progress is None                # default: decided by the terminal
        assert ap.parse_args(argv + ["--progress"]).progress is True   # experiments' old flag still works
        assert ap.parse_args(argv + ["--no-progress"]).progress is False


# -- evaluate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("split,key", [("val", "num_val"), ("train", "num_train"), ("test", "num_test")])
def test_evaluate_uses_the_runs_own_split(run, simfeat, tmp_path, capsys, split, key):
    """SimFeat's split.npy has no val; the run carved one from train and saved it."""
    assert main(["evaluate", str(run), str(simfeat), "--split", split, "--out", str(tmp_path / split),
                 "--tsne-points", "30"]) == 0
    doc = json.loads(capsys.readouterr().out)                       # stdout is exactly one JSON document
    recorded = json.loads((run / "run.json").read_text())
    assert doc["num_samples"] == recorded[key] and doc["split"] == split


def test_evaluate_json_and_human_line_on_stderr(run, simfeat, tmp_path, capsys):
    assert main(["evaluate", str(run), str(simfeat), "--out", str(tmp_path / "e"), "--tsne-points", "30",
                 "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["report"] == str(tmp_path / "e") and "report written to" in cap.err


def test_evaluate_tsne_points_zero_skips_the_tsne_plot(run, simfeat, tmp_path, capsys):
    """--tsne-points 0: no t-SNE (the slow part of a report); a negative count is a one-line error."""
    assert main(["evaluate", str(run), str(simfeat), "--out", str(tmp_path / "e"), "--tsne-points", "0", "--json"]) == 0
    assert (tmp_path / "e" / "metrics.json").is_file() and (tmp_path / "e" / "confusion.png").is_file()
    assert not (tmp_path / "e" / "tsne.png").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run), str(simfeat), "--tsne-points", "-3"])
    assert e.value.code == 2 and "'-3': expected a whole number >= 0" in capsys.readouterr().err


# -- --json on every verb --------------------------------------------------------------------------
def test_every_verb_but_the_server_has_json():
    subs = subparsers()
    for name, verb in VERBS.items():
        opts = {o for a in subs[name]._actions for o in a.option_strings}
        assert ("--json" in opts) == verb.json, name
    assert [n for n, v in VERBS.items() if not v.json] == ["serve"]


def test_presets_json_lists_presets_architectures_and_fusions(capsys):
    assert main(["presets", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"sgmft", "paper", "concat"} <= {p["name"] for p in doc["presets"]}
    assert {"sgmft", "concat"} <= set(doc["architectures"])
    assert {"sfm", "concat", "coattn", "merge_attn", "asym_coattn"} <= set(doc["fusions"])
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "registered fusions" in out and "merge_attn" in out and "registered architectures" in out


def test_user_error_with_json_still_gives_one_json_document(capsys):
    assert main(["train", "--print-config", "--json", "--preset", "sgmft", "--set", "model.use_sim=maybe"]) == 2
    cap = capsys.readouterr()
    assert "maybe" in json.loads(cap.out)["error"] and cap.err.startswith("sgmft train: error:")


# -- help, version, devices ----------------------------------------------------------------------
def test_every_option_of_every_verb_has_help_and_no_none_or_doubled_default():
    for name, parser in subparsers().items():
        text = parser.format_help()
        assert "default: None" not in text, name
        assert parser.description, name
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert action.help and action.help.strip(), f"{name} {action.dest}: no help text"
            expanded = formatter._expand_help(action) if action.help else ""
            assert expanded.count("(default:") <= 1, f"{name} {action.dest}: {expanded!r}"
            added = expanded.count("(default:") > action.help.count("(default:")
            assert not (added and "default" in action.help), f"{name} {action.dest}: said twice: {expanded!r}"
            assert "(default: False)" not in expanded and "(default: None)" not in expanded


def test_defaults_are_shown_once_where_they_exist():
    text = subparsers()["extract"].format_help()
    assert re.search(r"--batch-size BATCH_SIZE\s+posts per batch \(default: 32\)", text)
    assert "(default: <out>.cache)" in " ".join(text.split())


def test_version(capsys):
    from sgmft import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sgmft {__version__}"


def test_python_dash_m_sgmft_is_the_command_line():
    import subprocess
    import sys

    from sgmft import __version__

    r = subprocess.run([sys.executable, "-m", "sgmft", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"sgmft {__version__}"
    r = subprocess.run([sys.executable, "-m", "sgmft", "no-such-verb"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no-such-verb" in r.stderr


def test_devices_accepts_lists_ints_and_auto():
    ap = build_parser()
    base = ["train", "s", "--out", "o"]
    assert ap.parse_args(base + ["--devices", "0,1"]).devices == [0, 1]
    assert ap.parse_args(base + ["--devices", "2"]).devices == 2
    assert ap.parse_args(base + ["--devices", "auto"]).devices == "auto"
    with pytest.raises(SystemExit):
        ap.parse_args(base + ["--devices", "gpu"])


# -- tables, README, predicting without a raw-post backbone -----------------------------------
def test_one_seed_tables_print_no_zero_spread():
    from sgmft.experiments.runner import format_table
    from sgmft.experiments.tables import _pm

    one = [{"row": "a", "seeds": 1, "accuracy_mean": 0.8, "accuracy_std": 0.0, "macro_f1_mean": 0.7,
            "macro_f1_std": 0.0}]
    assert "±" not in format_table(one) and "80.00" in format_table(one)
    two = [{**one[0], "seeds": 2, "accuracy_std": 0.01}]
    assert "80.00 ± 1.00" in format_table(two)
    assert _pm({"seeds": 1, "accuracy_mean": 0.8, "accuracy_std": 0.0}, "accuracy") == "80.00"


def test_readme_shows_demo_quick_and_the_verbs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "sgmft demo --quick" in readme
    for name in VERBS:
        assert f"sgmft {name}" in readme, name


def test_predicting_a_post_with_a_simfeat_run_says_why_and_what_to_do(run, capsys):
    assert main(["predict", str(run), "--text", "看电影"]) == 2
    err = capsys.readouterr().err
    assert "'simfeat'" in err and "not a raw-post backbone" in err and "predict RUN --store STORE" in err


def test_a_repeated_warning_or_note_is_printed_once(monkeypatch, capsys):
    """A run's candidates and cross-validation folds raise the same warning (a rare class, a constant modality)
    once each; the command prints each distinct line once."""
    import warnings

    from sgmft.cli import _show_warnings
    from sgmft.errors import SgmftWarning, note

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)   # restored after the test
    _show_warnings("train")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn("class(es) 6 have one post", SgmftWarning)
            note("chose 'lda'")
        warnings.warn("class(es) 7 have one post", SgmftWarning)
    err = capsys.readouterr().err.splitlines()
    assert err == ["sgmft train: warning: class(es) 6 have one post", "sgmft train: note: chose 'lda'",
                   "sgmft train: warning: class(es) 7 have one post"], err
