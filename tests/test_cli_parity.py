"""The command line and the Python API agree (new-user items 6-8 of issue 19): extract's
progress default, JSON key names and --label-names; a manifest whose rows are (almost) all
rejected; evaluate's default report folder and --progress / --no-progress."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from conftest import make_store
from sgmft.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sgmft.features.backbones.tiny import build_tiny_chinese_clip

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("parity")
    yield {"root": root, "spec": f"chinese-clip:{build_tiny_chinese_clip(root / 'tinycc')}"}
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


def _manifest(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def test_extract_python_and_cli_give_the_same_json_and_no_bars_off_a_terminal(tiny, tmp_path, capsys):
    from sgmft.features.extract import extract_features

    man = _manifest(tmp_path / "m.jsonl", [{"id": str(i), "text": f"今天去看电影 {i}", "label": "cinema"}
                                           for i in range(6)] + [{"id": "bad", "text": "x", "label": "moon"}])
    res = extract_features(man, tmp_path / "py", backbone=tiny["spec"], batch_size=4)   # progress: default
    err = capsys.readouterr().err
    assert "%|" not in err and "it/s" not in err                     # stderr is not a terminal here: no bars
    assert main(["extract", str(man), "--out", str(tmp_path / "cli"), "--backbone", tiny["spec"],
                 "--batch-size", "4", "--json", "--no-progress"]) == 0
    cli = json.loads(capsys.readouterr().out)
    py = res.to_dict()
    assert set(py) <= set(cli)                                        # one set of key names
    for k in ("num_posts", "rejects", "cached", "encoded", "rows_rejected", "text_missing", "image_missing"):
        assert py[k] == cli[k], k
    assert py["rejects"] == res.num_rejects == 1 and py["cached"] == res.cached_hits
    assert {"backbone", "dim", "image_choice", "engine"} <= set(cli) - set(py)


def test_extract_label_names_flag(tiny, tmp_path, capsys):
    from sgmft.features import FeatureStore

    rows = [{"id": str(i), "text": "好吃的火锅" if i % 2 else "在家休息", "label": "餐厅" if i % 2 else "家"}
            for i in range(8)]
    man = _manifest(tmp_path / "zh.jsonl", rows)
    # without the flag every row is rejected: an error, not a store of nothing
    assert main(["extract", str(man), "--out", str(tmp_path / "no"), "--backbone", tiny["spec"],
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgmft extract: error: 8 of 8 manifest rows were rejected (100 %")
    assert "label" in err and "--max-rejected" in err
    assert main(["extract", str(man), "--out", str(tmp_path / "zh"), "--backbone", tiny["spec"],
                 "--label-names", "家,餐厅", "--no-progress"]) == 0
    fs = FeatureStore.open(tmp_path / "zh")
    assert fs.label_names == ["家", "餐厅"] and sorted(set(fs.labels.tolist())) == [0, 1] and len(fs) == 8
    (tmp_path / "names.txt").write_text("家\n餐厅\n学校\n", encoding="utf-8")
    assert main(["extract", str(man), "--out", str(tmp_path / "zh2"), "--backbone", tiny["spec"],
                 "--label-names", f"@{tmp_path / 'names.txt'}", "--no-progress"]) == 0
    assert FeatureStore.open(tmp_path / "zh2").label_names == ["家", "餐厅", "学校"]
    capsys.readouterr()
    assert main(["extract", str(man), "--out", str(tmp_path / "x"), "--backbone", tiny["spec"],
                 "--label-names", "家,家"]) == 2
    assert "repeated: ['家']" in capsys.readouterr().err


def test_mostly_rejected_manifest_fails_and_the_threshold_is_an_option(tiny, tmp_path, capsys):
    rows = [{"id": "ok", "text": "看电影", "label": "cinema"}] + [{"id": f"b{i}", "text": "x", "label": "moon"}
                                                                  for i in range(9)]
    man = _manifest(tmp_path / "m.jsonl", rows)
    assert main(["extract", str(man), "--out", str(tmp_path / "s"), "--backbone", tiny["spec"],
                 "--no-progress", "--json"]) == 2
    cap = capsys.readouterr()
    assert "9 of 10 manifest rows were rejected (90 %, over --max-rejected 0.5)" in cap.err
    assert json.loads(cap.out)["error"].startswith("9 of 10")          # --json: still one document
    assert main(["extract", str(man), "--out", str(tmp_path / "s"), "--backbone", tiny["spec"],
                 "--no-progress", "--max-rejected", "1", "--overwrite"]) == 0
    assert "extracted 1 posts" in capsys.readouterr().out


def test_split_notice_is_a_prefixed_warning(tiny, tmp_path, capsys):
    rows = [{"id": str(i), "text": "看电影", "label": "cinema", **({"split": "train"} if i < 2 else {})}
            for i in range(4)]
    man = _manifest(tmp_path / "m.jsonl", rows)
    assert main(["extract", str(man), "--out", str(tmp_path / "s"), "--backbone", tiny["spec"],
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "sgmft extract: warning: split field omitted from the store: 2 of 4 posts have one" in err


# -- evaluate ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from sgmft.config import apply_overrides, load_preset
    from sgmft.train import train

    root = tmp_path_factory.mktemp("ev")
    store = make_store(root / "store", n=160, dim=16, k=4, with_split=True)
    p = load_preset("concat")
    p.model = apply_overrides(p.model, ["classifier_hidden=[16]"])
    p.train = dataclasses.replace(p.train, epochs=1, progress=False)
    train(store, root / "run", p)
    return {"store": store, "run": root / "run"}


def test_evaluate_python_default_report_folder_is_the_clis(run, capsys):
    from sgmft.eval.run import default_report_dir, evaluate

    m = evaluate(run["run"], run["store"], split="val", tsne_max_points=20)      # no out_dir: the CLI's default
    assert default_report_dir(run["run"], "val") == run["run"] / "eval-val"
    assert json.loads((run["run"] / "eval-val" / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    assert main(["evaluate", str(run["run"] / "model"), str(run["store"]), "--split", "val", "--tsne-points", "20",
                 "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(run["run"] / "eval-val")   # the run's, not model/


def test_evaluate_progress_flags(run, tmp_path, capsys):
    assert main(["evaluate", str(run["run"]), str(run["store"]), "--out", str(tmp_path / "a"), "--tsne-points",
                 "20", "--progress"]) == 0
    assert "evaluate:" in capsys.readouterr().err and (tmp_path / "a" / "metrics.json").is_file()
    assert main(["evaluate", str(run["run"]), str(run["store"]), "--out", str(tmp_path / "b"), "--tsne-points",
                 "20", "--no-progress"]) == 0
    assert "evaluate:" not in capsys.readouterr().err
