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
from PIL import Image

from sgmft.cli import main
from sgmft.data.simposts import SimPostsConfig, generate_simposts
from sgmft.features import FeatureStore
from sgmft.features.backbones import load_backbone
from sgmft.features.backbones.base import canonical_precision, int8_scheme, resolve_precision
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
    assert main(["train", str(stores["fp32"]), "--out", str(run), "--preset", "sgmft", "--set", "model.n_tokens=8",
                 "--epochs", "1",
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


VNNI = int8_scheme() == "per-token"   # this CPU's oneDNN has exact u8 x s8 dot products (VNNI / AMX-int8)
needs_vnni = pytest.mark.skipif(not VNNI, reason="int8 per token needs VNNI or AMX-int8 (oneDNN saturates "
                                                 "u8 x s8 pairs at int16 without them)")


@pytest.mark.parametrize("scheme", ["per-post", pytest.param("per-token", marks=needs_vnni)])
def test_int8_quantises_linears_and_stays_close(env, scheme, monkeypatch):
    from sgmft.features.backbones import base

    monkeypatch.setattr(base, "int8_scheme", lambda flags=None: scheme)
    fp32 = load_backbone(env["spec"], dtype="fp32")
    int8 = load_backbone(env["spec"], dtype="int8")
    bf16 = load_backbone(env["spec"], dtype="bf16")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    from sgmft.features.backbones.int8_linear import TokenInt8Linear

    kind = DynamicQuantizedLinear if scheme == "per-post" else TokenInt8Linear
    assert sum(isinstance(m, kind) for m in int8.model.modules()) > 10
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
    if scheme == "per-post":
        assert {m.weight().qscheme() for m in int8.model.modules() if isinstance(m, DynamicQuantizedLinear)} == \
            {torch.per_channel_affine}  # one scale per output channel
    assert any(type(m) is torch.nn.Linear for m in fp32.model.modules())  # fp32 untouched
    texts = ["今天在电影院看电影", "去公园跑步", "图书馆里很安静"]
    a, b, c = fp32.encode_text(texts), int8.encode_text(texts), bf16.encode_text(texts)
    # one activation scale per post, not per batch: a post's int8 features do not depend on its
    # batch-mates (with one scale per call they moved by ~1e-3 here; the cache and serve rely on it)
    loud = ["哈" * 40 + "!!!" * 5, "图书馆里很安静"]
    alone = np.concatenate([int8.encode_text([t]) for t in texts])
    np.testing.assert_allclose(alone, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(int8.encode_text(loud + texts)[2:], b, atol=1e-6, rtol=0)
    ims = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)) for i in range(3)]
    np.testing.assert_allclose(int8.encode_images(ims[:1]), int8.encode_images(ims)[:1], atol=1e-6, rtol=0)
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


def test_bf16_linears_are_packed_once_and_give_the_plain_linears_features_bit_for_bit(env):
    """On CPU, bf16 keeps each Linear's weight in oneDNN's blocked layout (PackedLinear) instead of
    letting oneDNN reorder it on every call; the sums are the same, so with one thread (this
    module's) the features are identical and so is the fingerprint; unpack_linears gives the plain
    Linears (and weights) back, and a packed backbone pickles."""
    from sgmft.features.backbones.base import PackedLinear, can_pack_bf16, unpack_linears

    packed, plain = load_backbone(env["spec"], dtype="bf16"), load_backbone(env["spec"], dtype="bf16")
    n_linear = sum(type(m) is torch.nn.Linear for m in load_backbone(env["spec"], dtype="fp32").model.modules())
    if not can_pack_bf16(packed.model):
        pytest.skip("this CPU's oneDNN has no bf16 kernels: bf16 keeps plain Linears")
    assert sum(type(m) is PackedLinear for m in packed.model.modules()) == n_linear > 0
    unpack_linears(plain.model)
    assert not any(type(m) is PackedLinear for m in plain.model.modules())
    assert sum(type(m) is torch.nn.Linear for m in plain.model.modules()) == n_linear
    texts = ["今天在电影院看电影", "去公园跑步", "学校 上课", "健身"] * 3
    ims = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (50, 40), (10, 120, 240))]
    for k in (1, 5, 12):   # row counts other than the packing hint
        assert np.array_equal(packed.encode_text(texts[:k]), plain.encode_text(texts[:k]))
    assert np.array_equal(packed.encode_images(ims), plain.encode_images(ims))
    assert packed.fingerprint() == plain.fingerprint()
    w_packed = next(m for m in packed.model.modules() if type(m) is PackedLinear).to_linear().weight
    w_plain = next(m for m in plain.model.modules() if type(m) is torch.nn.Linear).weight
    assert w_packed.dtype == torch.bfloat16 and torch.equal(w_packed, w_plain)
    torch.manual_seed(0)   # the tiny model's biases are zero: one Linear with a bias, 2-d and 3-d inputs
    lin = torch.nn.Linear(48, 40).to(torch.bfloat16).requires_grad_(False)
    torch.nn.init.normal_(lin.bias)
    for shape in ((7, 48), (3, 5, 48)):
        x = torch.randn(shape).to(torch.bfloat16)
        assert torch.equal(PackedLinear(lin)(x), lin(x))
    import copy
    import pickle

    for clone in (pickle.loads(pickle.dumps(PackedLinear(lin))), copy.deepcopy(PackedLinear(lin))):
        assert clone.packed.is_mkldnn and torch.equal(clone(x), lin(x))   # re-packed, same sums
    assert np.array_equal(pickle.loads(pickle.dumps(packed)).encode_text(texts), packed.encode_text(texts))


def test_precision_recipe_in_fingerprint(env, monkeypatch):
    """How bf16/int8 are computed is part of the fingerprint (fp32's has no recipe, so fp32
    fingerprints did not change); int8 weights are packed for the preferred quantized engine,
    the global engine is left as it was, and the forward does not depend on it."""
    from sgmft.features.backbones import base

    assert base.precision_recipe("float32") is None and base.precision_recipe("float16") is None
    assert base.precision_recipe("bfloat16") == "bf16-weights+autocast"
    monkeypatch.setattr(base, "int8_scheme", lambda flags=None: "per-post")
    assert base.precision_recipe("int8") == f"dynamic-int8-linear-per-channel-per-post:{base.int8_engine()}"
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
    from sgmft.features.backbones import precision as pr   # where int8_engine reads its preference

    monkeypatch.setattr(pr, "INT8_ENGINE_PREFERENCE", (others[0],))
    other = load_backbone(env["spec"], dtype="int8")
    assert other.fingerprint() != int8.fingerprint()  # another engine, another recipe
    assert other.fingerprint_at("float32") == int8.fingerprint_at("float32")  # same weights
    assert (other.encode_text(texts) * ref).sum(1).min() > 0.999


def test_hardware_ceiling_reports_rates_flags_verdict_and_choice(monkeypatch):
    """The hardware check (bench_extract's ceiling, `sgmft extract --explain-hardware`): GEMM
    rates of every kind, the AMX/AVX-512 flags read from /proc/cpuinfo, a verdict and the auto
    precision that follow the flags."""
    from pathlib import Path

    from sgmft.features.backbones import precision as pr

    real_flags = pr.cpu_flags.__wrapped__
    monkeypatch.setattr(pr, "onednn_kernels", lambda: {"isa": None, "matmul_impl": {}})
    monkeypatch.setattr(pr, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "avx512_vnni"}))
    r = pr.hardware_ceiling(n=256, rounds=1, seconds=0.02)
    assert {"fp32_matmul", "bf16_matmul", "fp16_matmul", "fp32_matmul_onednn_bf16_fastmath"} <= set(r["gflops"])
    assert f"int8_dynamic_linear_{r['int8_engine_sgmft']}" in r["gflops"]
    assert all(v > 0 for v in r["gflops"].values())
    assert r["ratio"]["bf16_over_fp32"] == pytest.approx(r["gflops"]["bf16_matmul"] / r["gflops"]["fp32_matmul"],
                                                          rel=0.05, abs=0.01)
    assert r["amx"] is False and r["cpu_flags"]["avx512_bf16"] and "no AMX" in r["verdict"]
    assert r["auto_precision"]["cpu"] == "int8" and "VNNI" in r["auto_precision"]["reason"]
    monkeypatch.setattr(pr, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    r = pr.hardware_ceiling(n=128, rounds=1, seconds=0.01)
    assert r["amx"] is True and r["verdict"].startswith("AMX present")
    assert r["auto_precision"]["cpu"] == "bfloat16"
    text = pr.explain_hardware(n=128, rounds=1, seconds=0.01)
    assert "amx_bf16" in text and "bf16_matmul" in text and "--precision auto on CPU: bfloat16" in text
    monkeypatch.setattr(pr, "cpu_flags", lambda: frozenset({"avx2", "fma"}))     # AVX2 only (AMD Zen 3)
    r = pr.hardware_ceiling(n=128, rounds=1, seconds=0.01)
    assert "emulated" in r["verdict"] and "int8 Linears run" in r["verdict"]
    assert r["auto_precision"]["cpu"] == "int8" and "AVX2" in r["auto_precision"]["reason"]
    if Path("/proc/cpuinfo").is_file():
        assert real_flags()  # really parsed


def test_onednn_max_cpu_isa_takes_amx_and_vnni_out_of_the_choices(monkeypatch):
    """$ONEDNN_MAX_CPU_ISA caps the kernels oneDNN may use: below AMX, bf16 has no tiles whatever
    the CPU has, so auto must follow the cap, not /proc/cpuinfo."""
    from sgmft.features.backbones import precision as pr

    spr = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"})
    monkeypatch.setattr(pr, "cpu_flags", lambda: spr)
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    assert pr.auto_cpu_precision()[0] == "bfloat16"
    for cap, want in (("AVX512_CORE_FP16", "int8"), ("avx10_1_512", "int8"), ("AVX512_CORE_AMX", "bfloat16"),
                      ("ALL", "bfloat16")):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert pr.auto_cpu_precision()[0] == want, cap
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_FP16")
    assert pr.usable_cpu_flags() == spr - {"amx_bf16", "amx_tile", "amx_int8"}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")   # no VNNI either: AVX-512 kernels only
    assert "neither AMX nor VNNI" in pr.auto_cpu_precision()[1] and "avx512_vnni" not in pr.usable_cpu_flags()


def test_a_kernel_emulated_in_software_is_timed_once_not_every_round():
    """On a CPU without bf16 or fp16 GEMMs (AVX2 only) one 2048^3 bf16 matmul takes about a minute:
    the ceiling times such a kernel in one round only, the others in every round."""
    import time

    from sgmft.features.backbones import precision as pr

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.12)

    rates = pr._best_rates({"fast": fast, "slow": slow}, flops=1e6, rounds=3, seconds=0.01)
    assert calls["slow"] == 2                      # the warm-up and one timed call
    assert calls["fast"] > 3 and rates["slow"] == pytest.approx(1e6 / 0.12 / 1e9, rel=0.5)


@pytest.mark.parametrize("flags, want", [
    ({"amx_bf16", "amx_tile", "amx_int8", "avx512_vnni"}, "bfloat16"),  # AMX: bf16 tiles
    ({"avx512_vnni", "avx512_bf16", "avx512f"}, "int8"),                # VNNI without AMX
    ({"avx_vnni", "avx2"}, "int8"),
    ({"amx_int8", "amx_tile", "avx512_vnni"}, "int8"),                  # AMX without bf16 tiles
    ({"avx2", "fma"}, "int8"),                                          # AVX2 only: int8 kernels still pay
    ({"sse4_2", "avx"}, "float32"),                                     # older than AVX2
    (set(), "float32"),                                                  # no /proc/cpuinfo
])
def test_auto_cpu_precision_follows_the_flags(flags, want):
    from sgmft.features.backbones.precision import (AVX2_INT8_COSINE, AVX2_INT8_SPEEDUP, COSINE_BAR,
                                                    MEASURED_COSINE, auto_cpu_precision)

    prec, reason = auto_cpu_precision(flags)
    assert prec == want and reason
    if prec != "float32":  # only a precision measured within the cosine bar of fp32
        assert min(MEASURED_COSINE[prec].values()) >= COSINE_BAR
    if flags == {"avx2", "fma"}:   # ... on that kind of CPU too
        assert min(AVX2_INT8_COSINE.values()) >= COSINE_BAR and min(AVX2_INT8_SPEEDUP.values()) > 1


def test_auto_resolves_to_the_machine_choice_and_is_announced_once(monkeypatch, recwarn):
    from sgmft.errors import SgmftNote
    from sgmft.features.backbones import precision as pr

    monkeypatch.setattr(pr, "cpu_flags", lambda: frozenset({"avx512_vnni", "avx512f"}))
    monkeypatch.setattr(pr, "_announced", False)
    assert resolve_precision("auto", torch.device("cpu")) == "int8"
    assert resolve_precision("auto", torch.device("cpu")) == "int8"
    assert resolve_precision("fp32", torch.device("cpu")) == "float32"   # explicit choices stay
    notes = [w for w in recwarn if issubclass(w.category, SgmftNote)]
    assert len(notes) == 1 and "chose int8" in str(notes[0].message) and "VNNI" in str(notes[0].message)
    monkeypatch.setattr(pr, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    assert resolve_precision("auto", torch.device("cpu")) == "bfloat16"


def test_extract_auto_records_the_chosen_precision(env, tmp_path, monkeypatch, capsys):
    """`--precision auto` stores what it picked (here: bf16, as on an AMX CPU) in the store, so
    predict and serve run the same precision."""
    from sgmft.features.backbones import precision as pr

    monkeypatch.setattr(pr, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    monkeypatch.setattr(pr, "_announced", False)
    out = tmp_path / "auto"
    assert main(["extract", str(env["manifest"]), "--out", str(out), "--backbone", env["spec"], "--batch-size", "16",
                 "--precision", "auto", "--no-progress"]) == 0
    fs = FeatureStore.open(out)
    assert fs.meta["extra"]["backbone_precision"] == "bfloat16"
    assert "note: --precision auto chose bfloat16" in capsys.readouterr().err


def test_cli_explain_hardware_prints_report_without_extracting(monkeypatch, capsys):
    from sgmft.features.backbones import precision as pr

    monkeypatch.setattr(pr, "explain_hardware", lambda: "CEILING REPORT\n--precision auto on CPU: int8 (why)")
    with pytest.raises(SystemExit) as e:
        main(["extract", "--explain-hardware"])
    assert e.value.code == 0
    assert "CEILING REPORT" in capsys.readouterr().out


def test_compile_choice_rules(monkeypatch):
    """torch.compile is off by default; SGMFT_COMPILE=auto turns it on for bf16 on CPU, a big
    model and a long job; SGMFT_COMPILE=1 forces it."""
    from types import SimpleNamespace

    from sgmft.features.backbones.precision import COMPILE_MIN_POSTS, compile_choice

    big = torch.nn.Linear(8000, 8000)    # 64 M parameters
    bb = SimpleNamespace(model=big, device=torch.device("cpu"), precision="bfloat16")
    monkeypatch.delenv("SGMFT_COMPILE", raising=False)
    assert compile_choice(bb, COMPILE_MIN_POSTS) == (False, compile_choice(bb, 10 ** 6)[1])   # off by default
    assert "off by default" in compile_choice(bb, 10 ** 6)[1]
    monkeypatch.setenv("SGMFT_COMPILE", "auto")
    assert compile_choice(bb, COMPILE_MIN_POSTS)[0] is True
    assert compile_choice(bb, COMPILE_MIN_POSTS - 1)[0] is False
    assert "short job" in compile_choice(bb, 10)[1]
    assert compile_choice(SimpleNamespace(model=big, device=torch.device("cpu"), precision="int8"), 10 ** 6)[0] is False
    small = SimpleNamespace(model=torch.nn.Linear(10, 10), device=torch.device("cpu"), precision="bfloat16")
    assert "small model" in compile_choice(small, 10 ** 6)[1]
    monkeypatch.setenv("SGMFT_COMPILE", "1")
    assert compile_choice(small, 1)[0] is True
    monkeypatch.setenv("SGMFT_COMPILE", "0")
    assert compile_choice(bb, 10 ** 6)[0] is False


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    """A tiny random Chinese-CLIP alone (no store, no training)."""
    return f"chinese-clip:{build_tiny_chinese_clip(tmp_path_factory.mktemp('tinyonly') / 'tinycc')}"


def test_compiled_forward_pads_to_buckets(tiny_spec):
    """Compiled, a batch is padded to one of four bucket sizes and sliced back; eager is untouched."""
    bb = load_backbone(tiny_spec, dtype="fp32", batch_size=32)
    assert [bb._bucket(n) for n in (1, 5, 32)] == [1, 5, 32]
    bb.compiled = True   # the bucket rule only (no compile here)
    assert [bb._bucket(n) for n in (1, 4, 5, 9, 16, 17, 32)] == [4, 4, 8, 16, 16, 32, 32]
    from sgmft.features.backbones.base import _pad_rows

    x = torch.arange(6.0).reshape(3, 2)
    assert _pad_rows(x, 5).tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]] and _pad_rows(x, 3) is x


@pytest.mark.slow
def test_compiled_bf16_forward_matches_eager(tiny_spec):
    """compile_forward (Inductor, freezing, padded buckets) gives the eager bf16 features to
    bf16 rounding, for full and ragged batches."""
    eager = load_backbone(tiny_spec, dtype="bf16", batch_size=8)
    comp = load_backbone(tiny_spec, dtype="bf16", batch_size=8).compile_forward()
    assert comp.fingerprint() == eager.fingerprint()   # an execution detail, like the thread count
    texts = ["学校 上课", "电影 很好看", "健身房", "旅行 去 海边", "吃饭"]
    for n in (5, 8):
        t = (texts * 2)[:n]
        a, b = eager.encode_text(t), comp.encode_text(t)
        assert a.shape == b.shape == (n, eager.dim) and (a * b).sum(1).min() > 0.999


@pytest.mark.slow
@needs_vnni
def test_compiled_int8_per_token_forward_matches_eager(tiny_spec):
    """compile_forward of a per-token int8 backbone (TokenInt8Linear.for_compile: torch._int_mm on the
    plain weight, which Inductor can trace) gives the eager int8 features; the eager quantiser and
    its compiled copy give the same features bit for bit."""
    eager = load_backbone(tiny_spec, dtype="int8", batch_size=8)
    quant = load_backbone(tiny_spec, dtype="int8", batch_size=8)
    for m in quant.model.modules():
        if hasattr(m, "compiled_quantizer"):
            m.compiled_quantizer = True
    texts = ["学校 上课", "电影 很好看", "健身房", "旅行 去 海边", "吃饭"]
    a = eager.encode_text(texts)
    np.testing.assert_array_equal(quant.encode_text(texts), a)
    comp = quant.compile_forward()
    assert not any(getattr(m, "packed", 0) is not None for m in comp.model.modules() if hasattr(m, "for_compile"))
    assert (comp.encode_text(texts) * a).sum(1).min() > 0.9999


@pytest.mark.parametrize("flags, want", [({"avx2"}, "per-post"), ({"avx2", "avx512f"}, "per-post"),
                                         ({"avx2", "avx512_vnni"}, "per-token"), ({"avx_vnni"}, "per-token"),
                                         ({"amx_int8", "amx_tile"}, "per-token")])
def test_int8_scheme_follows_the_flags(flags, want, monkeypatch):
    """Per token only where oneDNN's u8 x s8 dot product is exact (VNNI, AMX-int8); its recipe has
    its own name, so an int8 store of one scheme is never reused for the other."""
    from sgmft.features.backbones import base

    assert int8_scheme(flags) == want
    monkeypatch.setattr(base, "int8_scheme", lambda flags=None: want)
    other = "per-post" if want == "per-token" else "per-token"
    recipe = base.precision_recipe("int8")
    monkeypatch.setattr(base, "int8_scheme", lambda flags=None: other)
    assert base.precision_recipe("int8") != recipe and want in recipe


@needs_vnni
def test_token_int8_linear_is_the_exact_integer_product_row_by_row():
    """TokenInt8Linear = (q - 128) @ w_int8^T in exact integers, times the weight and token scales,
    plus the bias; a row's output does not depend on the other rows; it pickles."""
    import pickle

    from sgmft.features.backbones.int8_linear import TokenInt8Linear, quantize_per_token

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(3, 7, 96) * torch.tensor([1.0, 30.0, 1e-3])[:, None, None]
    x[0, 2] = 0.0   # an all-zero token
    mod = TokenInt8Linear(lin)
    y = mod(x)
    q, s = quantize_per_token(x.reshape(-1, 96))
    assert q.dtype == torch.uint8 and int(q.min()) >= 1 and int(q.max()) <= 255
    assert torch.equal(q[2], torch.full((96,), 128, dtype=torch.uint8))
    w8 = mod.int8_weight()
    assert w8.dtype == torch.int8 and w8.shape == (40, 96)
    acc = (q.long() - 128) @ w8.long().t()
    ref = (acc.double() * mod.w_scale.double() * s.double() + lin.bias.detach().double()).view(3, 7, 40)
    np.testing.assert_allclose(y.double().numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.cat([mod(x[i:i + 1]) for i in range(3)]), y)   # row by row == batched
    assert torch.equal(mod(x[:, 3:5]), y[:, 3:5])
    cos = torch.nn.functional.cosine_similarity(y.reshape(-1, 40), lin(x).detach().reshape(-1, 40))
    assert cos[torch.arange(21) != 2].min() > 0.999
    back = pickle.loads(pickle.dumps(mod))
    assert torch.equal(back(x), y) and torch.equal(back.int8_weight(), w8)


@pytest.mark.slow
def test_compiled_quantizer_gives_the_eager_bytes():
    """The compiled activation quantiser (big models) is a speed-up only: same q, same scales."""
    from sgmft.features.backbones.int8_linear import _quantizer, quantize_per_token

    comp = _quantizer(True)
    for k, scale in ((96, 1.0), (257, 1e4), (1280, 1e-5)):
        x = torch.randn(37, k) * scale
        x[1] = 0.0
        x[2, :4] = torch.tensor([127.0, -63.5, 0.5, 1.5]) * scale   # ties after scaling
        for a, b in zip(comp(x), quantize_per_token(x)):
            assert torch.equal(a, b)
