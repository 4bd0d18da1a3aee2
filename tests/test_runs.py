"""sgmft.runs: the rows of a split (``split_rows``), taken the same way by ``evaluate`` and
``predict --store --split``, and the one reader of a run's evaluation reports."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import make_store
from sgmft.cli import main
from sgmft.runs import RunDir, RunError, split_rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained on a store WITHOUT split.npy (as `sgmft extract` makes one from a manifest
    without split fields): the run carves its own split and saves it."""
    from sgmft.config import apply_overrides, load_preset
    from sgmft.train import train

    root = tmp_path_factory.mktemp("runs")
    store = make_store(root / "store", n=200, dim=16, k=4, with_split=False)
    p = load_preset("concat")
    p.model = apply_overrides(p.model, ["classifier_hidden=[16]"])
    p.train.epochs, p.train.progress = 1, False
    train(store, root / "run", p)
    return {"root": root, "store": store, "run": root / "run"}


def _ids(path):
    with open(path, encoding="utf-8", newline="") as f:
        return [r["id"] for r in csv.DictReader(f)]


def test_predict_store_split_test_gives_the_rows_of_evaluate(run, tmp_path, capsys):
    """docs/training.md: `predict --store STORE --split test` gives the same rows as `evaluate`,
    also on a store without split.npy (the run's own split)."""
    from sgmft.features import FeatureStore

    assert FeatureStore.open(run["store"]).split is None
    assert main(["evaluate", str(run["run"]), str(run["store"]), "--out", str(tmp_path / "ev"),
                 "--tsne-points", "20", "--no-progress"]) == 0
    assert main(["predict", str(run["run"]), "--store", str(run["store"]), "--split", "test",
                 "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    capsys.readouterr()
    ev, pr = _ids(tmp_path / "ev" / "predictions.csv"), _ids(tmp_path / "p.csv")
    saved = np.load(RunDir(run["run"]).split)
    assert len(pr) == int((saved == "test").sum()) > 0 and pr == ev
    # the run's val split too (carved by training for model selection)
    assert main(["predict", str(run["run"]), "--store", str(run["store"]), "--split", "val",
                 "--out", str(tmp_path / "v.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["posts"] == int((saved == "val").sum())


def test_split_rows_other_store_and_no_split(run, tmp_path):
    from sgmft.features import FeatureStore

    fs = FeatureStore.open(run["store"])
    r = RunDir(run["run"])
    assert np.array_equal(split_rows(fs, r, "all"), np.arange(len(fs)))
    assert np.array_equal(split_rows(fs, r, "train"), np.flatnonzero(np.load(r.split) == "train"))
    other = FeatureStore.open(make_store(tmp_path / "other", n=50, dim=16, k=4, seed=3, with_split=False))
    other_ids = FeatureStore.open(make_store(tmp_path / "o2", n=50, dim=16, k=4, seed=3, with_split=True))
    with pytest.raises(RunError, match="not the store this model was trained on"):
        split_rows(other, r, "test")
    with pytest.raises(RunError, match="no training-run split was found"):
        split_rows(other, None, "test")
    assert np.array_equal(split_rows(other_ids, r, "test"), other_ids.indices("test"))   # its own split.npy
    with pytest.raises(ValueError):               # still a ValueError for callers that catch that
        split_rows(other, None, "val")


def test_evaluations_reads_every_report_once(run, tmp_path):
    r = RunDir(tmp_path / "r")
    (r.root / "eval-test").mkdir(parents=True)
    (r.root / "eval-test" / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "store": "/s/a"}))
    (r.root / "eval-x").mkdir()
    (r.root / "eval-x" / "metrics.json").write_text("{not json")
    (r.root / "eval-old").mkdir()
    (r.root / "eval-old" / "metrics.json").write_text(json.dumps({"accuracy": 0.25, "split": "all"}))
    ev = r.evaluations()
    assert [(e["split"], e["store"], e["accuracy"]) for e in ev] == [("all", None, 0.25), ("test", "/s/a", 0.5)]
