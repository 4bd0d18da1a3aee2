"""benchmarks/paper_schedule.py: per-epoch curve, resumable, summary and plot (tiny store)."""

import csv
import json
import sys

import pytest

from conftest import load_benchmark


def _load():
    return load_benchmark("paper_schedule")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from sgmft.data.simfeat import profile_config, write_simfeat

    path = tmp_path_factory.mktemp("store") / "s"
    write_simfeat(path, profile_config("default", num_posts=120, test_size=40, dim=16, content_dim=8))
    return path


@pytest.mark.slow
def test_schedule_writes_a_curve_and_resumes(tiny_store, tmp_path, monkeypatch):
    mod = _load()
    out = tmp_path / "run"
    argv = ["paper_schedule.py", "--out", str(out), "--store", str(tiny_store), "--epochs", "1", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"] and rows[0]["steps"] == "4"      # 80 train posts / batch 20
    first = rows[0]
    monkeypatch.setattr(sys, "argv", argv[:-3] + ["2", "--threads", "1"])
    mod.main()                                                                 # resumes: only epoch 2 runs
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == first
    assert 0.0 <= float(rows[1]["test_acc"]) <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 8 and summary["train_posts"] == 80
    assert summary["last_epoch_test_acc"] == float(rows[1]["test_acc"])
    assert (out / "curve.png").stat().st_size > 1000
