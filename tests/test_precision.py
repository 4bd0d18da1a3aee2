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
    assert {m.weight().qscheme() for m in int8.model.modules() if isinstance(m, DynamicQuantizedLinear)} == \
        {torch.per_channel_affine}  # one scale per output channel
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


def test_bf16_runs_bf16_weights_and_returns_float32(env):
    """bf16 = weights cast to bfloat16 + autocast (no per-batch re-cast of fp32 weights); the
    features are still float32, L2-normalised and close to fp32's."""
    fp32, bf16 = load_backbone(env["spec"], dtype="fp32"), load_backbone(env["spec"], dtype="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    texts = ["今天在电影院看电影", "去公园跑步"]
    a, b = fp32.encode_text(texts), bf16.encode_text(texts)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert not np.array_equal(a, b) and (a * b).sum(1).min() > 0.999
    from PIL import Image

    ims = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (40, 40), (10, 120, 240))]
    ia, ib = fp32.encode_images(ims), bf16.encode_images(ims)
    assert ib.dtype == np.float32 and (ia * ib).sum(1).min() > 0.999


def test_precision_recipe_in_fingerprint(env, monkeypatch):
    """How bf16/int8 are computed is part of the fingerprint (fp32's has no recipe, so fp32
    fingerprints did not change); int8 weights are packed for the preferred quantized engine,
    the global engine is left as it was, and the forward does not depend on it."""
    from sgmft.features.backbones import base

    assert base.precision_recipe("float32") is None and base.precision_recipe("float16") is None
    assert base.precision_recipe("bfloat16") == "bf16-weights+autocast"
    assert base.precision_recipe("int8") == f"dynamic-int8-linear-per-channel:{base.int8_engine()}"
    supported = torch.backends.quantized.supported_engines
    assert base.int8_engine() == next(e for e in base.INT8_ENGINE_PREFERENCE if e in supported)
    before = torch.backends.quantized.engine
    int8 = load_backbone(env["spec"], dtype="int8")
    assert torch.backends.quantized.engine == before
    texts = ["今天在电影院看电影", "去公园跑步"]
    ref = int8.encode_text(texts)
    for eng in supported:
        if eng in ("x86", "fbgemm", "onednn"):
            torch.backends.quantized.engine = eng
            np.testing.assert_array_equal(int8.encode_text(texts), ref)
    torch.backends.quantized.engine = before
    others = [e for e in ("fbgemm", "x86", "onednn") if e in supported and e != base.int8_engine()]
    if not others:
        pytest.skip("only one quantized engine in this torch build")
    monkeypatch.setattr(base, "INT8_ENGINE_PREFERENCE", (others[0],))
    other = load_backbone(env["spec"], dtype="int8")
    assert other.fingerprint() != int8.fingerprint()  # another engine, another recipe
    assert other.fingerprint_at("float32") == int8.fingerprint_at("float32")  # same weights
    assert (other.encode_text(texts) * ref).sum(1).min() > 0.999


def test_bench_hardware_ceiling_reports_rates_flags_and_verdict(monkeypatch):
    """bench_extract's hardware check: GEMM rates of every kind, the AMX/AVX-512 flags read
    from /proc/cpuinfo and a verdict that follows them."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_extract.py"
    spec = importlib.util.spec_from_file_location("bench_extract_t", path)
    be = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(be)
    monkeypatch.setattr(be, "_onednn_kernels", lambda: {"isa": None, "matmul_impl": {}})
    monkeypatch.setattr(be, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    r = be.hardware_ceiling(n=256, rounds=1, seconds=0.02)
    assert {"fp32_matmul", "bf16_matmul", "fp16_matmul", "fp32_matmul_onednn_bf16_fastmath"} <= set(r["gflops"])
    assert f"int8_dynamic_linear_{r['int8_engine_sgmft']}" in r["gflops"]
    assert all(v > 0 for v in r["gflops"].values())
    assert r["ratio"]["bf16_over_fp32"] == pytest.approx(r["gflops"]["bf16_matmul"] / r["gflops"]["fp32_matmul"],
                                                          rel=0.05, abs=0.01)
    assert r["amx"] is False and r["cpu_flags"]["avx512_bf16"] and "no AMX" in r["verdict"]
    monkeypatch.setattr(be, "_cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    r = be.hardware_ceiling(n=128, rounds=1, seconds=0.01)
    assert r["amx"] is True and r["verdict"].startswith("AMX present")
    if Path("/proc/cpuinfo").is_file():
        assert be._cpu_flags()  # really parsed
