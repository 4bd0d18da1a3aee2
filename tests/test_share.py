"""Sharing a trained model (issue 8): the one prediction schema, ``predict --store`` for any
feature store, save_pretrained / from_pretrained with a model card, export, TensorBoard."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from sgmft.cli import main
from sgmft.features import FeatureStore, write_feature_store
from sgmft.predict import Predictor
from sgmft.predict.output import read_predictions, write_predictions

from conftest import make_store

NAMES = ["home", "work", "gym"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained on a store whose backbone ('test') no registered backbone computes."""
    from sgmft.config import load_preset
    from sgmft.train import train

    root = tmp_path_factory.mktemp("share")
    store = make_store(root / "store", n=200, dim=16, k=4, with_split=True)
    p = load_preset("sgmft")
    p.model.n_tokens, p.model.attn_dim, p.model.ffn_hidden = 4, 8, 16
    p.model.classifier_hidden = [16, 16, 16, 16]
    p.train.epochs, p.train.lr, p.train.batch_size, p.train.progress = 3, 1e-3, 32, False
    train(store, root / "run", p)
    return {"root": root, "store": store, "run": root / "run"}


# -- the schema ---------------------------------------------------------------------------------
def test_schema_columns_csv_and_jsonl_agree(tmp_path):
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    true = ["home", None, 1]                                   # a name, unknown, an index
    extras = {"text_mask": [True, False, True]}
    write_predictions(tmp_path / "p.csv", ["a", "b", "c"], probs, NAMES, true, extras=extras)
    write_predictions(tmp_path / "p.jsonl", ["a", "b", "c"], probs, NAMES, true, extras=extras)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "id,pred,prob_home,prob_work,prob_gym,true,text_mask"
    assert lines[2] == "b,gym,0.1,0.3,0.6,,0"                 # unknown truth: empty cell
    c, j = read_predictions(tmp_path / "p.csv"), read_predictions(tmp_path / "p.jsonl")
    assert [r["pred"] for r in c] == [r["pred"] for r in j] == ["home", "gym", "work"]
    assert [r.get("true") for r in j] == ["home", None, "work"] and "true" not in j[1]
    assert list(j[0]) == ["id", "pred", "prob_home", "prob_work", "prob_gym", "true", "text_mask"]
    for rc, rj in zip(c, j):
        assert [float(rc[f"prob_{n}"]) for n in NAMES] == [rj[f"prob_{n}"] for n in NAMES]
    # no known truth at all (None or -1): no 'true' column
    write_predictions(tmp_path / "q.csv", ["a", "b", "c"], probs, NAMES, [None, -1, ""])
    assert (tmp_path / "q.csv").read_text().splitlines()[0] == "id,pred,prob_home,prob_work,prob_gym"
    with pytest.raises(ValueError, match="probs must be"):
        write_predictions(tmp_path / "r.csv", ["a"], probs, NAMES)


# -- predict --store ----------------------------------------------------------------------------
def test_predict_store_labelled_csv_and_jsonl(trained, tmp_path, capsys):
    fs = FeatureStore.open(trained["store"])
    want = Predictor.load(trained["run"]).predict_store(fs).probs
    assert main(["predict", str(trained["run"]), "--store", str(trained["store"]), "--out",
                 str(tmp_path / "p.csv"), "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    rows = read_predictions(tmp_path / "p.csv")
    assert list(rows[0]) == ["id", "pred", *[f"prob_{n}" for n in fs.label_names], "true", "uncertain",
                             "explanation_decided_by", "explanation_text", "explanation_image"]   # issue 18
    assert [r["id"] for r in rows] == list(np.asarray(fs.ids))
    got = np.array([[float(r[f"prob_{n}"]) for n in fs.label_names] for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-7, rtol=0)
    assert [r["pred"] for r in rows] == [fs.label_names[i] for i in want.argmax(1)]
    assert [r["true"] for r in rows] == [fs.label_names[i] for i in np.asarray(fs.labels)]
    acc = float(np.mean(want.argmax(1) == np.asarray(fs.labels)))
    assert s["posts"] == 200 and s["labelled"] == 200 and s["accuracy"] == pytest.approx(acc)
    # JSONL, one split of the store
    assert main(["predict", str(trained["run"]), "--store", str(trained["store"]), "--split", "test",
                 "--out", str(tmp_path / "p.jsonl"), "--no-progress"]) == 0
    assert "predicted 40 posts" in capsys.readouterr().out
    test_rows = fs.indices("test")
    j = read_predictions(tmp_path / "p.jsonl")
    assert [r["id"] for r in j] == list(np.asarray(fs.ids)[test_rows])
    np.testing.assert_allclose([[r[f"prob_{n}"] for n in fs.label_names] for r in j], want[test_rows],
                               atol=1e-7, rtol=0)


def test_predict_store_unlabelled(trained, tmp_path, capsys):
    fs = FeatureStore.open(trained["store"])
    un = write_feature_store(tmp_path / "un", ids=np.array([f"n{i}" for i in range(30)]),
                             text=np.asarray(fs.text[:30]), image=np.asarray(fs.image[:30]),
                             label_names=fs.label_names, backbone="test")
    assert FeatureStore.open(un).labels is None
    assert main(["predict", str(trained["run"]), "--store", str(un), "--out", str(tmp_path / "u.csv"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "predicted 30 posts" in out and "accuracy" not in out
    rows = read_predictions(tmp_path / "u.csv")
    assert len(rows) == 30 and "true" not in rows[0]
    want = Predictor.load(trained["run"]).predict_store(fs, np.arange(30)).probs
    np.testing.assert_allclose([[float(r[f"prob_{n}"]) for n in fs.label_names] for r in rows], want,
                               atol=1e-7, rtol=0)


def test_evaluate_and_predict_write_the_same_schema(trained, tmp_path, capsys):
    """evaluate's predictions.csv and predict --store's file are the same rows, column for column."""
    assert main(["evaluate", str(trained["run"]), str(trained["store"]), "--out", str(tmp_path / "ev"),
                 "--tsne-points", "30"]) == 0
    assert main(["predict", str(trained["run"]), "--store", str(trained["store"]), "--split", "test",
                 "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    capsys.readouterr()
    with open(tmp_path / "ev" / "predictions.csv", newline="") as f:
        ev = list(csv.reader(f))
    with open(tmp_path / "p.csv", newline="") as f:
        pr = list(csv.reader(f))
    k = len(ev[0]) - 4                      # the last 4: uncertain and the explanation (issue 18)
    assert ev[0] == pr[0] and ev[0][:2] == ["id", "pred"] and ev[0][k - 1] == "true"
    assert len(ev) == len(pr) == 41
    for a, b in zip(ev[1:], pr[1:]):
        assert a[0] == b[0] and a[1] == b[1] and a[k - 1:] == b[k - 1:]
        np.testing.assert_allclose([float(x) for x in a[2:k - 1]], [float(x) for x in b[2:k - 1]], atol=1e-7)


def test_raw_post_predict_on_feature_only_run_says_to_use_store(trained, capsys):
    assert main(["predict", str(trained["run"]), "--text", "看电影"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgmft predict: error: ") and "--store" in err and "'test'" in err


def test_predict_store_errors(trained, tmp_path, capsys):
    assert main(["predict", str(trained["run"]), "--store", str(trained["store"])]) == 2
    assert "--store needs --out" in capsys.readouterr().err
    other = make_store(tmp_path / "d8", n=20, dim=8, k=4)
    assert main(["predict", str(trained["run"]), "--store", str(other), "--out", str(tmp_path / "x.csv")]) == 2
    assert "D=8" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()


# -- save_pretrained / from_pretrained and the model card -------------------------------------------
def _card_front(path):
    import yaml

    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_save_pretrained_round_trips_with_a_model_card(trained, tmp_path):
    fs = FeatureStore.open(trained["store"])
    src = Predictor.load(trained["run"])
    out = src.save_pretrained(tmp_path / "shared")
    assert {p.name for p in out.iterdir()} == {"config.json", "labels.json", "features.json",
                                              "model.safetensors", "README.md"}
    back = Predictor.from_pretrained(out)
    x = np.array(fs.text[:20]), np.array(fs.image[:20])
    np.testing.assert_array_equal(back.predict_features(*x).probs, src.predict_features(*x).probs)
    assert back.label_names == src.label_names and back.features == src.features
    front, body = _card_front(out / "README.md")
    assert front["library_name"] == "sgmft" and "sgmft" in front["tags"]
    run = json.loads((trained["run"] / "run.json").read_text())
    res = front["model-index"][0]["results"]
    val = [r for r in res if r["dataset"]["split"] in ("validation", "test")]
    assert val, res
    for name in fs.label_names:
        assert f"`{name}`" in body
    for section in ("## Data", "## Preset and configuration", "## Metrics", "## Feature contract",
                    "## Intended use", "## Limits"):
        assert section in body
    assert f"{100 * run['best_val_acc']:.2f} %" in body and str(run["num_train"]) in body
    assert "backbone `test`" in body and "D = 16" in body
    # a saved folder saves again (no run folder any more): the card is kept
    again = back.save_pretrained(tmp_path / "again")
    assert (again / "README.md").read_text() == (out / "README.md").read_text()


def test_training_writes_the_card_and_evaluate_adds_its_metrics(trained, tmp_path, capsys):
    card = trained["run"] / "model" / "README.md"
    assert card.is_file()
    assert main(["evaluate", str(trained["run"]), str(trained["store"]), "--tsne-points", "30"]) == 0
    capsys.readouterr()
    m = json.loads((trained["run"] / "eval-test" / "metrics.json").read_text())
    front, body = _card_front(card)
    test = [r for r in front["model-index"][0]["results"] if r["dataset"]["split"] == "test"]
    assert test and test[0]["metrics"][0]["value"] == pytest.approx(m["accuracy"], abs=1e-6)
    assert f"{100 * m['accuracy']:.2f} %" in body


def test_from_pretrained_hub_id_offline(trained, tmp_path, monkeypatch):
    """A hub id resolves through the local Hugging Face cache; not cached + offline = a clear error."""
    import shutil

    from sgmft.errors import USER_ERRORS
    from sgmft.predict.pretrained import ModelUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelUnavailableError) as e:
        Predictor.from_pretrained("someone/sgmft-missing", cache_dir=tmp_path / "hub")
    msg = str(e.value)
    assert "someone/sgmft-missing" in msg and "hf download someone/sgmft-missing" in msg and "offline" in msg
    assert isinstance(e.value, USER_ERRORS)
    # the same id once it is in the cache (laid out as huggingface_hub lays it out)
    repo = tmp_path / "hub" / "models--someone--sgmft-missing"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    Predictor.load(trained["run"]).save_pretrained(tmp_path / "src")
    shutil.copytree(tmp_path / "src", repo / "snapshots" / commit)
    p = Predictor.from_pretrained("someone/sgmft-missing", cache_dir=tmp_path / "hub")
    assert p.label_names == FeatureStore.open(trained["store"]).label_names
    with pytest.raises(FileNotFoundError, match="neither a folder nor"):
        Predictor.from_pretrained(str(tmp_path / "no" / "such" / "dir"))


# -- export ---------------------------------------------------------------------------------------
def _tiny_checkpoint(root, arch="sgmft", fusion=None, paper=False, dim=16):
    import dataclasses

    import torch

    from sgmft.checkpoint import save_checkpoint
    from sgmft.config import load_preset
    from sgmft.models import build_model

    if arch == "ensemble":                          # assembled by auto from trained runs: two tiny members
        from sgmft.models.ensemble import ensemble_config

        members = [dataclasses.replace(load_preset(a).model, dim=dim, num_classes=4) for a in ("trust", "lda")]
        cfg = ensemble_config(dim, 4, ["trust", "lda"], members,       # pooled as auto pools it (eq E1')
                              [{"temperature": 1.3, "uniform_weight": 0.02}, {"temperature": 0.8}], pool="log_mean")
        torch.manual_seed(0)
        return save_checkpoint(root / "ensemble-default", build_model(cfg), cfg, ["a", "b", "c", "d"],
                               {"backbone": "test", "dim": dim, "normalization": "l2"})
    p = load_preset("paper" if paper else arch)
    cfg = dataclasses.replace(p.model, dim=dim, num_classes=4)
    if not paper:
        cfg = dataclasses.replace(cfg, n_tokens=4, attn_dim=8, ffn_hidden=16, classifier_hidden=[16, 16])
    else:
        cfg = dataclasses.replace(cfg, n_tokens=dim, ffn_hidden=16, classifier_hidden=[16, 16])
    if fusion:
        cfg = dataclasses.replace(cfg, fusion=fusion)
    torch.manual_seed(0)
    name = f"{arch}-{fusion or 'default'}{'-paper' if paper else ''}"
    return save_checkpoint(root / name, build_model(cfg), cfg, ["a", "b", "c", "d"],
                           {"backbone": "test", "dim": dim, "normalization": "l2"})


def _random_inputs(dim, n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    tm, im = torch.rand(n, generator=g) > 0.3, torch.rand(n, generator=g) > 0.3
    tm[0] = im[0] = True
    tm[1] = False
    t, i = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    return t * tm[:, None], i * im[:, None], tm, im


def _check_export(ck, fmt, path):
    """Export, then load the file independently of sgmft's code and compare logits (1e-5)."""
    import io

    import torch

    from sgmft.checkpoint import load_checkpoint
    from sgmft.predict.export import export_model

    s = export_model(ck, fmt, path)
    assert s["max_abs_diff"] is not None and s["max_abs_diff"] <= 1e-5
    model, info = load_checkpoint(ck)
    x = _random_inputs(info["model_cfg"].dim, 11, seed=123)
    with torch.inference_mode():
        want = model(*x).logits.numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {k: v.numpy() for k, v in zip(("text", "image", "text_mask", "image_mask"), x)})[0]
    else:
        ep = torch.export.load(io.BytesIO(path.read_bytes()))
        with torch.inference_mode():
            got = ep.module()(*x).numpy()
    assert got.shape == (11, 4)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    return s


@pytest.mark.parametrize("fmt", ["torch-export", "onnx"])
def test_export_matches_pytorch(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install 'sgmft[export]')")
        pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (pip install 'sgmft[export]')")
    ck = _tiny_checkpoint(tmp_path)
    s = _check_export(ck, fmt, tmp_path / f"head.{'onnx' if fmt == 'onnx' else 'pt2'}")
    assert s["verified_with"] == ("onnxruntime" if fmt == "onnx" else "torch.export.load")


def test_export_cli_json_and_errors(trained, tmp_path, capsys):
    assert main(["export", str(trained["run"]), "--format", "torch-export", "--out", str(tmp_path / "m.pt2"),
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["format"] == "torch-export" and s["max_abs_diff"] <= 1e-5 and (tmp_path / "m.pt2").stat().st_size > 0
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    assert capsys.readouterr().err.startswith("sgmft export: error: ")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch-export", "onnx"])
def test_every_registered_architecture_exports(tmp_path, fmt):
    from sgmft.models import FUSIONS, list_models

    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install 'sgmft[export]')")
        pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (pip install 'sgmft[export]')")
    cks = [_tiny_checkpoint(tmp_path, arch) for arch in list_models()]
    cks += [_tiny_checkpoint(tmp_path, "sgmft", fusion=f) for f in FUSIONS.names()]
    cks.append(_tiny_checkpoint(tmp_path, "sgmft", paper=True))
    for ck in cks:
        _check_export(ck, fmt, tmp_path / f"{ck.name}.out")



# -- TensorBoard --------------------------------------------------------------------------------
def test_tensorboard_logger_writes_event_files(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the TensorBoard logger needs 'sgmft[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sgmft.config import TrainConfig, load_preset

    store = make_store(tmp_path / "s", n=120, dim=16, k=4)
    common = ["--preset", "concat", "--epochs", "2", "--batch-size", "32", "--no-progress"]
    assert main(["train", str(store), "--out", str(tmp_path / "tb"), "--tensorboard", *common]) == 0
    events = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert events, sorted(str(p) for p in (tmp_path / "tb").rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"val_acc", "train_loss"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("val_acc")) == 2                        # one value per epoch
    assert (tmp_path / "tb" / "lightning" / "metrics.csv").is_file()   # the CSV stays
    # off by default (the recommended preset does not turn it on)
    assert TrainConfig().tensorboard is False and load_preset("sgmft").train.tensorboard is False
