"""The whole-post ONNX export (sgmft export --with-backbone) and the torch-free runner, on tiny RANDOM
Chinese-CLIP runs: the PyTorch module == sgmft predict; ONNX == PyTorch at batch 1, 7, 32 (<= 1e-4);
the runner == sgmft predict; the runner in a venv that has no torch and no transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgmft.cli import main
from sgmft.features.backbones import load_backbone
from sgmft.features.backbones.tiny import build_tiny_chinese_clip


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _posts(root: Path, n: int, seed: int):
    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.ingest.manifest import read_manifest

    man = generate_simposts(root, SimPostsConfig(num_posts=n, seed=seed))
    posts, _ = read_manifest(man)
    return man, posts


def _module_inputs(bb, posts, image_choice):
    """What the runner feeds the graph, built with sgmft's own backbone pre-processing."""
    from sgmft.features.encode import reduce_side
    from sgmft.ingest.images import load_any
    from sgmft.ingest.text import TextCleaner

    texts = [TextCleaner().clean(p.text) for p in posts]
    tok = bb.tokenize([t or "x" for t in texts])
    ims = [[load_any(s, reduce_to=reduce_side(bb)) for s in p.images][:1 if image_choice == "first" else 9]
           for p in posts]
    M = max([1] + [len(x) for x in ims])
    pix = torch.zeros(len(posts), M, 3, bb.image_size, bb.image_size)
    valid = torch.zeros(len(posts), M, dtype=torch.bool)
    for r, x in enumerate(ims):
        if x:
            pix[r, :len(x)], valid[r, :len(x)] = bb.preprocess_images(x), True
    return tok["input_ids"], tok["attention_mask"], pix, valid, torch.tensor([bool(t) for t in texts])


@pytest.mark.parametrize("image_choice", ["similar", "mean", "first"])
def test_whole_post_module_is_sgmft_predict(tmp_path, image_choice):
    from sgmft.checkpoint import load_checkpoint
    from sgmft.predict import PostPredictor
    from sgmft.predict.export_post import WholePost

    ckpt = build_tiny_chinese_clip(tmp_path / "cc")
    bb = load_backbone(f"chinese-clip:{ckpt}", device="cpu", dtype="float32")
    assert main(["zero-shot", "--backbone", bb.spec, "--out", str(tmp_path / "run"), "--precision", "fp32",
                 "--device", "cpu", "--image-choice", image_choice]) == 0
    from sgmft.ingest.manifest import Post

    _, posts = _posts(tmp_path / "posts", 16, 3)
    multi = next(p for p in posts if len(p.images) > 1)
    posts += [Post("no-image", "u", "今天在家做饭", (), None, None, 0),            # text only
              Post("no-text", "u", "", multi.images, None, None, 0),            # images only: the first one
              Post("empty", "u", "", (), None, None, 0)]                         # neither: uniform
    head, info = load_checkpoint(tmp_path / "run")
    cal = info["calibration"]                   # a zero-shot run: CLIP's temperature, 1 / exp(logit_scale)
    assert cal["temperature"] < 1
    module = WholePost(bb.model, head, image_choice=image_choice, temperature=cal["temperature"],
                       token_types=True, uniform_weight=cal["uniform_weight"]).eval()
    with torch.inference_mode():
        probs = module(*_module_inputs(bb, posts, image_choice))[0].numpy()
    pp = PostPredictor.load(tmp_path / "run", device="cpu")
    want = pp.predict_posts([(p.text, p.images) for p in posts])
    np.testing.assert_allclose(probs, [[w["probs"][n] for n in info["label_names"]] for w in want], atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run (sgmft demo-raw: tiny random Chinese-CLIP, TrustMix, image choice 'similar')
    and its whole-post export."""
    from serve_support import build_tiny_run

    env = build_tiny_run(tmp_path_factory.mktemp("wp"))
    out = env["root"] / "export"
    s = _run_json(["export", str(env["run"]), "--with-backbone", "--format", "onnx", "--out", str(out), "--json"])
    return {**env, "export": out, "summary": s}


def _run_json(argv):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue())


@pytest.mark.slow
def test_onnx_matches_pytorch_at_batch_1_7_32(trained):
    s = trained["summary"]
    assert s["with_backbone"] and s["verified_with"] == "onnxruntime"
    assert {int(k) for k in s["per_batch"]} == {1, 7, 32}
    assert max(s["per_batch"].values()) <= 1e-4
    import onnx

    m = onnx.load(str(trained["export"] / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert isinstance(dims["input_ids"][0], str) and isinstance(dims["pixel_values"][1], str)   # dynamic B, M
    meta = json.loads((trained["export"] / "export.json").read_text())
    assert meta["image_choice"] == "similar" and meta["text"]["max_length"] == 52


@pytest.mark.slow
def test_runner_predicts_like_sgmft_predict(trained):
    from sgmft.predict import PostPredictor
    from sgmft.runner.onnx_runner import OnnxPostRunner

    posts = trained["posts"][:40]
    assert any(len(p.images) > 1 for p in posts)
    got = OnnxPostRunner(trained["export"]).predict(posts)
    want = PostPredictor.load(trained["run"], device="cpu").predict_posts([(p.text, p.images) for p in posts])
    for g, w in zip(got, want):
        assert abs(max(abs(g["probs"][k] - w["probs"][k]) for k in w["probs"])) <= 1e-4
        assert g["label"] == w["label"] or abs(g["confidence"] - w["confidence"]) < 1e-4


def _torch_free_venv(root: Path) -> Path:
    """A venv (python -m venv) that sees only numpy, Pillow, onnxruntime, tokenizers, jieba, stopwordsiso
    (linked from this environment: offline and quick) and sgmft's source: no torch, no transformers."""
    import PIL
    import jieba
    import numpy
    import onnxruntime
    import stopwordsiso
    import tokenizers

    import sgmft

    venv, farm = root / "venv", root / "farm"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    farm.mkdir()
    for mod in (numpy, PIL, onnxruntime, tokenizers, jieba, stopwordsiso):
        pkg = Path(mod.__file__).parent
        (farm / pkg.name).symlink_to(pkg)
        for libs in pkg.parent.glob(f"{pkg.name.lower()}*.libs"):
            (farm / libs.name).symlink_to(libs)
    for libs in Path(PIL.__file__).parent.parent.glob("pillow.libs"):
        if not (farm / libs.name).exists():
            (farm / libs.name).symlink_to(libs)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    Path(site, "farm.pth").write_text(f"{farm}\n{Path(sgmft.__file__).parent.parent}\n", encoding="utf-8")
    return py


@pytest.mark.slow
def test_runner_in_a_venv_without_torch(trained, tmp_path):
    py = _torch_free_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None, "
                            "u.find_spec('transformers') is None)"], capture_output=True, text=True, env=env)
    assert probe.stdout.split() == ["True", "True"], probe.stderr
    man = trained["root"] / "simposts" / "manifest.jsonl"
    out = tmp_path / "pred.jsonl"
    r = subprocess.run([str(py), "-m", "sgmft.runner.onnx_runner", str(trained["export"]), str(man), "--out", str(out),
                        "--threads", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(got) == len(trained["posts"]) and "predicted" in r.stderr
    from sgmft.runner.onnx_runner import OnnxPostRunner

    here = OnnxPostRunner(trained["export"]).predict(trained["posts"])
    for g, h in zip(got, here):
        assert g["id"] == h["id"] and max(abs(g["probs"][k] - h["probs"][k]) for k in h["probs"]) <= 1e-5
