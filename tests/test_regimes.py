"""Per-post regime labels in the feature store, per-regime evaluation, the demo's and the
experiment suite's per-regime columns, and the learning curve (issue 7)."""

import csv
import json

import numpy as np
import pytest
import yaml

from sgmft.eval.metrics import accuracy_by_regime, regime_table
from sgmft.features import FeatureStore, FeatureStoreError, write_feature_store

NAMES = ["home", "work", "gym"]


def _arrays(n=12, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return dict(ids=[f"p{i}" for i in range(n)], text=rng.normal(size=(n, d)).astype(np.float32),
                image=rng.normal(size=(n, d)).astype(np.float32), label_names=NAMES,
                labels=rng.integers(0, 3, n))


# --------------------------------------------------------------------------- store
def test_regime_names_round_trip_as_int16_codes(tmp_path):
    reg = ["both", "a long regime name with spaces", "both", "é"] * 3
    write_feature_store(tmp_path / "s", regime=reg, **_arrays())
    fs = FeatureStore.open(tmp_path / "s")
    assert fs.regime_names == sorted(set(reg))
    assert fs.regime.dtype == np.int16                     # 2 bytes a row, however long the names
    assert list(fs.regimes()) == reg
    assert list(fs.regimes([1, 3])) == [reg[1], reg[3]]
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["regime_names"] == fs.regime_names


def test_regime_codes_with_given_names_and_absent_regime(tmp_path):
    write_feature_store(tmp_path / "s", regime=[1, 0] * 6, regime_names=["x", "y", "unused"], **_arrays())
    fs = FeatureStore.open(tmp_path / "s")
    assert fs.regime_names == ["x", "y", "unused"] and list(fs.regimes()[:2]) == ["y", "x"]
    write_feature_store(tmp_path / "t", **_arrays())
    plain = FeatureStore.open(tmp_path / "t")
    assert plain.regime is None and plain.regime_names is None and plain.regimes() is None
    assert not (tmp_path / "t" / "regime.npy").exists()


def test_writer_rejects_bad_regimes_naming_the_file(tmp_path):
    with pytest.raises(FeatureStoreError, match=r"regime\.npy: unknown regime 'z' in row 1"):
        write_feature_store(tmp_path / "a", regime=["x", "z"] + ["x"] * 10, regime_names=["x"], **_arrays())
    with pytest.raises(FeatureStoreError, match=r"regime\.npy: regime code 5 in row 2"):
        write_feature_store(tmp_path / "b", regime=[0, 0, 5] + [0] * 9, regime_names=["x"], **_arrays())
    with pytest.raises(FeatureStoreError, match=r"regime\.npy: integer regime codes need regime_names"):
        write_feature_store(tmp_path / "c", regime=[0] * 12, **_arrays())
    with pytest.raises(FeatureStoreError, match=r"meta\.json: regime_names are not unique"):
        write_feature_store(tmp_path / "d", regime=[0] * 12, regime_names=["x", "x"], **_arrays())
    with pytest.raises(FeatureStoreError, match=r"regime\.npy: chunk has 3 rows, expected 12"):
        write_feature_store(tmp_path / "e", regime=["x"] * 3, **_arrays())
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_reader_validates_regime_file_and_names(tmp_path):
    write_feature_store(tmp_path / "s", regime=["x", "y"] * 6, **_arrays())
    root = tmp_path / "s"
    meta = json.loads((root / "meta.json").read_text())
    codes = np.load(root / "regime.npy")

    np.save(root / "regime.npy", codes[:5])
    with pytest.raises(FeatureStoreError, match=r"regime\.npy: shape \(5,\), expected \(12,\)"):
        FeatureStore.open(root)
    np.save(root / "regime.npy", np.full(12, 2, np.int16))
    with pytest.raises(FeatureStoreError, match=r"regime\.npy: regime code 2 in row 0 \(id 'p0'\)"):
        FeatureStore.open(root)
    np.save(root / "regime.npy", np.zeros(12, np.float32))
    with pytest.raises(FeatureStoreError, match=r"regime\.npy: dtype <f4 is not signed integer"):
        FeatureStore.open(root)
    np.save(root / "regime.npy", codes)
    (root / "meta.json").write_text(json.dumps({**meta, "regime_names": ["x", ""]}))
    with pytest.raises(FeatureStoreError, match=r"meta\.json: regime_names must be a non-empty list"):
        FeatureStore.open(root)
    (root / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "regime_names"}))
    with pytest.raises(FeatureStoreError, match=r"meta\.json: regime\.npy exists but meta\.json has no regime_names"):
        FeatureStore.open(root)
    (root / "meta.json").write_text(json.dumps(meta))
    (root / "regime.npy").unlink()
    with pytest.raises(FeatureStoreError, match=r"regime\.npy: meta\.json has regime_names but regime\.npy is missing"):
        FeatureStore.open(root)


def test_simfeat_writes_its_fine_regimes(tmp_path):
    from sgmft.data.simfeat import generate_simfeat, write_simfeat
    from sgmft.experiments.runner import simfeat_config

    cfg = simfeat_config("hetero", num_posts=300, test_size=60, dim=32, mc_samples=2000)
    fs = FeatureStore.open(write_simfeat(tmp_path / "s", cfg))
    d = generate_simfeat(cfg)
    assert list(fs.regimes()) == list(d.regime)
    assert set(fs.regime_names) <= set(cfg.regimes)


# --------------------------------------------------------------------------- metrics
def test_accuracy_by_regime_by_hand():
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    p = np.array([0, 1, 0, 0, 2, 2, 1])
    reg = np.array(["b", "b", "b", "zeta", "zeta", "a", "a"])
    got = accuracy_by_regime(y, p, reg, names=["a", "b", "zeta", "absent"], oracle={"b": 0.9, "absent": 0.5})
    assert list(got) == ["a", "b", "zeta", "absent"]
    assert got["a"] == {"n": 2, "accuracy": 0.5, "oracle_accuracy": None}
    assert got["b"] == {"n": 3, "accuracy": pytest.approx(2 / 3), "oracle_accuracy": 0.9}
    assert got["zeta"]["accuracy"] == 0.5 and got["absent"] == {"n": 0, "accuracy": None, "oracle_accuracy": 0.5}
    md = regime_table({"m": got})
    assert md.splitlines()[0] == "| model | a (n=2) | b (n=3) | zeta (n=2) | absent (n=0) |"
    assert md.splitlines()[2] == "| m | 50.0 | 66.7 | 50.0 | n/a |"
    assert md.splitlines()[3] == "| oracle | n/a | 90.0 | n/a | 50.0 |"
    with pytest.raises(ValueError, match="differ in length"):
        accuracy_by_regime(y, p, reg[:3])


def _hand_store(tmp_path, n=240, d=16):
    """A learnable store whose regimes are arbitrary strings, with a SimFeat-like oracle block."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, n)
    centres = rng.normal(size=(3, d)) * 0.35   # overlapping classes: accuracies differ by regime
    text = (centres[y] + rng.normal(size=(n, d))).astype(np.float32)
    image = (centres[y] + rng.normal(size=(n, d))).astype(np.float32)
    split = np.array(["train"] * (n - 60) + ["test"] * 60)
    reg = np.array(["α-regime", "plain", "third one"])[rng.integers(0, 3, n)]
    oracle = {"test_accuracy": 0.8, "test_accuracy_by_regime": {"plain": 0.75, "α-regime": 0.85}}
    write_feature_store(tmp_path / "store", ids=[f"q{i}" for i in range(n)], text=text, image=image,
                        label_names=NAMES, labels=y, split=split, regime=reg,
                        extra={"simfeat": {"oracle": oracle}})
    return tmp_path / "store", y, reg


def test_evaluate_per_regime_matches_predictions_and_oracle_only_on_test(tmp_path, capsys):
    from sgmft.cli import main
    from sgmft.config import load_preset
    from sgmft.eval.run import evaluate
    from sgmft.train import train
    import dataclasses

    store, y, reg = _hand_store(tmp_path)
    p = load_preset("concat")
    p.train = dataclasses.replace(p.train, epochs=2, progress=False, batch_size=32)
    train(store, tmp_path / "run", p)
    m = evaluate(tmp_path / "run", store, tmp_path / "ev", tsne_max_points=30)
    rows = list(csv.DictReader((tmp_path / "ev" / "predictions.csv").read_text().splitlines()))
    idx = [int(r["id"][1:]) for r in rows]
    hit = np.array([r["true"] == r["pred"] for r in rows])
    by = m["accuracy_by_regime"]
    assert set(by) == {"α-regime", "plain", "third one"}
    for name, v in by.items():
        sel = reg[idx] == name
        assert v["n"] == int(sel.sum()) and v["accuracy"] == pytest.approx(hit[sel].mean())
    assert 0.3 < m["accuracy"] < 1  # not a trivial store
    assert by["plain"]["oracle_accuracy"] == 0.75 and by["third one"]["oracle_accuracy"] is None
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["accuracy_by_regime"] == by

    m2 = evaluate(tmp_path / "run", store, tmp_path / "ev2", split="train", tsne_max_points=30)
    assert all(v["oracle_accuracy"] is None for v in m2["accuracy_by_regime"].values())  # not the oracle's split
    assert sum(v["n"] for v in m2["accuracy_by_regime"].values()) == m2["num_samples"] > 60

    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), str(store), "--out", str(tmp_path / "ev3"),
                 "--tsne-points", "30"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["accuracy_by_regime"] == by              # stdout: one JSON document
    out = cap.err                                                       # stderr: the table
    assert "accuracy by regime" in out and "| plain (n=" in out and "| oracle | 75.0 | 85.0 | n/a |" in out


# --------------------------------------------------------------------------- learning curve
def test_learning_curve_tiny_fixed_test_set_and_resume(tmp_path, monkeypatch, capsys):
    from sgmft.cli import main

    out = tmp_path / "lc"
    argv = ["learning-curve", "--profile", "hetero", "--sizes", "150,300", "--models", "concat,text_only",
            "--epochs", "2", "--set", "num_posts=500", "--set", "test_size=100", "--set", "dim=16",
            "--set", "mc_samples=2000", "--out", str(out)]
    assert main(argv) == 0
    cap = capsys.readouterr()
    log = cap.out + cap.err
    assert "cell 4/4" in log and "fixed 100 test posts" in log
    recs = list(csv.DictReader((out / "learning_curve.csv").read_text().splitlines()))
    assert [(r["size"], r["model"]) for r in recs] == [("150", "concat"), ("150", "text_only"),
                                                       ("300", "concat"), ("300", "text_only")]
    assert [r["n_train_posts"] for r in recs] == ["120", "120", "240", "240"]
    assert len({r["oracle_accuracy"] for r in recs}) == 1 and recs[0]["oracle_accuracy"] != ""
    for r in recs:
        assert float(r["accuracy_over_oracle"]) == pytest.approx(float(r["accuracy"]) / float(r["oracle_accuracy"]))
        assert any(k.startswith("acc_") for k in r)
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert not (out / "data" / "size150").exists()                         # subset stores removed when done
    # every cell was scored on the same test posts, and the training subsets are nested
    big = FeatureStore.open(out / "data" / "simfeat")
    test_ids = set(np.asarray(big.ids)[big.indices("test")])
    for size in (150, 300):
        preds = (out / f"size{size}" / "runs" / "concat" / "seed0" / "eval-test" / "predictions.csv").read_text()
        assert {r["id"] for r in csv.DictReader(preds.splitlines())} == test_ids

    # resume: nothing is trained again, the CSV is the same
    import sgmft.train

    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(sgmft.train, "train", no_training)
    before = (out / "learning_curve.csv").read_text()
    assert main(argv) == 0
    assert (out / "learning_curve.csv").read_text() == before
    cap = capsys.readouterr()
    assert "already done" in cap.out + cap.err
    # other settings into the same folder are refused
    assert main(argv[:-2] + ["--set", "seed=3", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_learning_curve_bad_arguments(tmp_path, capsys):
    from sgmft.cli import main
    from sgmft.experiments.learning_curve import auto_epochs

    assert main(["learning-curve", "--sizes", "10,x", "--out", str(tmp_path / "a")]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert main(["learning-curve", "--models", "nope", "--out", str(tmp_path / "b")]) == 2
    assert auto_epochs(1600) == 10 and auto_epochs(13600) == 5 and auto_epochs(54400) == 3


# --------------------------------------------------------------------------- demo and experiments
def test_experiments_hetero_profile_per_regime_tables(tmp_path):
    from sgmft.cli import main

    tiny = {"description": "tiny", "simfeat": {"num_posts": 240, "test_size": 60, "dim": 32, "num_users": 8,
                                               "mc_samples": 2000},
            "simfeat_small": {"num_posts": 160, "test_size": 40, "dim": 16, "num_users": 8, "mc_samples": 2000},
            "simposts": {"num_posts": 40, "num_users": 4, "image_size": 32},
            "train": ["epochs=1", "batch_size=32"], "seeds": 1, "tsne_points": 40}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(
        {"name": "tabR", "title": "Table R. tiny", "rows": [{"name": "concat", "preset": "concat", "label": "Concat"},
                                                           {"name": "txt", "preset": "text_only", "label": "Text"}]}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"tables": ["t.yaml"], "scales": {"quick": tiny}}))
    out = tmp_path / "r"
    assert main(["experiments", "--config", str(tmp_path / "s.yaml"), "--quick", "--profile", "hetero",
                 "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert "SimFeat profile **hetero**" in readme and "Table R. tiny — SimFeat profile `hetero`" in readme
    assert "| image_other_place (n=" in readme and "| Concat |" in readme and "| oracle |" in readme
    assert "image_other_place" in (out / "tabR.md").read_text()
    meta = json.loads((out / "data" / "simfeat" / "meta.json").read_text())
    assert meta["extra"]["simfeat"]["config"]["profile"] == "hetero"
    assert json.loads((out / "results.json").read_text())["profile"] == "hetero"
    # the default profile into the same folder is refused (other data)
    assert main(["experiments", "--config", str(tmp_path / "s.yaml"), "--quick", "--out", str(out)]) == 2
