"""Precision modes (fp32 / bf16 / int8) of the same checkpoint: the int8 model really is
quantised, every precision has its own fingerprint, the precision is recorded in the store
and in the checkpoint's feature contract, and a model trained on fp32 features refuses
features or a backbone at another precision unless told otherwise."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sgmft.cli import main
from sgmft.data.simposts import SimPostsConfig, generate_simposts
from sgmft.features import FeatureStore
from sgmft.features.backbones import load_backbone
from sgmft.features.backbones.base import canonical_precision, resolve_precision
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.predict import PostPredictor, PrecisionMismatchError, Predictor


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """48 SimPosts, a tiny random Chinese-CLIP, an fp32 and an int8 store (`--precision`),
    and a 1-epoch run on the fp32 store."""
    old_env, old_threads = os.environ.get("HF_HUB_OFFLINE"), torch.get_num_threads()
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("prec")
    ckpt = build_tiny_chinese_clip(root / "tinycc")
    spec = f"chinese-clip:{ckpt}"
    man = generate_simposts(root / "posts", SimPostsConfig(num_posts=48, seed=3))
    stores = {}
    for prec in ("fp32", "int8"):
        stores[prec] = root / f"store-{prec}"
        assert main(["extract", str(man), "--out", str(stores[prec]), "--backbone", spec, "--batch-size", "16",
                     "--precision", prec, "--no-progress"]) == 0
    run = root / "run"
    assert main(["train", str(stores["fp32"]), "--out", str(run), "--set", "model.n_tokens=8", "--epochs", "1",
                 "--batch-size", "32", "--no-progress"]) == 0
    yield dict(root=root, ckpt=ckpt, spec=spec, manifest=man, stores=stores, run=run)
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old_env


def test_precision_names():
    assert [canonical_precision(x) for x in ("fp32", "BF16", "int8", "float32", "auto")] == \
        ["float32", "bfloat16", "int8", "float32", "auto"]
    with pytest.raises(ValueError, match="int4"):
        canonical_precision("int4")
    assert resolve_precision("int8", torch.device("cpu")) == "int8"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_precision("int8", torch.device("cuda"))


def test_int8_quantises_linears_and_stays_close(env):
    fp32 = load_backbone(env["spec"], dtype="fp32")
    int8 = load_backbone(env["spec"], dtype="int8")
    bf16 = load_backbone(env["spec"], dtype="bf16")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    assert sum(isinstance(m, DynamicQuantizedLinear) for m in int8.model.modules()) > 10
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
    assert any(type(m) is torch.nn.Linear for m in fp32.model.modules())  # fp32 untouched
    texts = ["今天在电影院看电影", "去公园跑步", "图书馆里很安静"]
    a, b, c = fp32.encode_text(texts), int8.encode_text(texts), bf16.encode_text(texts)
    assert not np.array_equal(a, b)  # int8 really computes something else ...
    cos = (a * b).sum(1)
    assert cos.min() > 0.99  # ... but close (features are L2-normalised)
    assert (a * c).sum(1).min() > 0.99
    fps = {fp32.fingerprint(), int8.fingerprint(), bf16.fingerprint()}
    assert len(fps) == 3
    # the weights are the same: at fp32 the int8 backbone has the fp32 fingerprint
    assert int8.fingerprint_at("float32") == fp32.fingerprint()


def test_precision_recorded_in_store_and_contract(env):
    s32, s8 = FeatureStore.open(env["stores"]["fp32"]), FeatureStore.open(env["stores"]["int8"])
    assert s32.meta["extra"]["backbone_precision"] == "float32"
    assert s8.meta["extra"]["backbone_precision"] == "int8"
    assert s8.meta["extra"]["backbone_fingerprint"] != s32.meta["extra"]["backbone_fingerprint"]
    assert not np.array_equal(np.asarray(s8.text), np.asarray(s32.text))
    contract = json.loads((env["run"] / "model" / "features.json").read_text())
    assert contract["extraction"]["backbone_precision"] == "float32"


def test_predict_store_refuses_other_precision(env):
    pred = Predictor.load(env["run"])
    pred.predict_store(env["stores"]["fp32"])  # same precision: fine
    with pytest.raises(PrecisionMismatchError, match=r"int8.*float32.*--allow-precision-mismatch"):
        pred.predict_store(env["stores"]["int8"])
    p8 = pred.predict_store(env["stores"]["int8"], allow_precision_mismatch=True)
    p32 = pred.predict_store(env["stores"]["fp32"])
    assert p8.probs.shape == p32.probs.shape
    assert (p8.probs.argmax(1) == p32.probs.argmax(1)).mean() > 0.8


def test_post_predictor_uses_recorded_precision_and_refuses_others(env):
    pp = PostPredictor.load(env["run"])
    assert pp.backbone.precision == "float32"
    with pytest.raises(PrecisionMismatchError, match="--allow-precision-mismatch"):
        PostPredictor.load(env["run"], precision="int8")
    with pytest.raises(PrecisionMismatchError, match="float32"):  # a loaded backbone at another precision
        PostPredictor.load(env["run"], backbone=load_backbone(env["spec"], dtype="bf16"))
    pp8 = PostPredictor.load(env["run"], precision="int8", allow_precision_mismatch=True)
    assert pp8.backbone.precision == "int8"
    assert any("precision" in n for n in pp8.notes)
    r32 = pp.predict_post("今天在电影院看电影")
    r8 = pp8.predict_post("今天在电影院看电影")
    assert set(r8["probs"]) == set(r32["probs"])
    # weights still verified when the precision differs: other weights are refused
    other = build_tiny_chinese_clip(env["root"] / "other", seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        PostPredictor.load(env["run"], backbone=f"chinese-clip:{other}", precision="int8",
                           allow_precision_mismatch=True)


def test_cli_precision_errors(env, capsys, tmp_path):
    run = str(env["run"])
    assert main(["predict", run, "--text", "看电影", "--precision", "int8"]) == 2
    e = capsys.readouterr().err
    assert "precision float32" in e and "int8" in e and "--allow-precision-mismatch" in e
    assert main(["predict", run, "--text", "看电影", "--precision", "int8", "--allow-precision-mismatch",
                 "--json"]) == 0
    assert "note:" in capsys.readouterr().err
    # predicting a feature store extracted at another precision
    assert main(["predict", run, "--store", str(env["stores"]["int8"]), "--out", str(tmp_path / "p.csv")]) == 2
    assert "--allow-precision-mismatch" in capsys.readouterr().err
    assert main(["predict", run, "--store", str(env["stores"]["int8"]), "--out", str(tmp_path / "p.csv"),
                 "--allow-precision-mismatch"]) == 0
    assert (tmp_path / "p.csv").is_file()
    capsys.readouterr()
    assert main(["extract", str(env["manifest"]), "--out", str(tmp_path / "s"), "--backbone", env["spec"],
                 "--precision", "bf16", "--dtype", "float32", "--no-progress"]) == 2
    assert "disagree" in capsys.readouterr().err
