"""sgmft zero-shot: the mechanics on a tiny RANDOM Chinese-CLIP (its predictions mean nothing; the
accuracy of zero-shot needs real weights). The run is taken by predict, serve, evaluate and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sgmft.cli import main
from sgmft.features.backbones import load_backbone
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.labels import DEFAULT_LABELS
from sgmft.predict.zero_shot import PromptSet, build_zero_shot, class_embeddings, load_prompts


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    ckpt = build_tiny_chinese_clip(root / "tinycc")
    spec = f"chinese-clip:{ckpt}"
    assert main(["zero-shot", "--backbone", spec, "--out", str(root / "run"), "--precision", "fp32",
                 "--device", "cpu", "--json"]) == 0
    return {"root": root, "spec": spec, "run": root / "run",
            "bb": load_backbone(spec, device="cpu", dtype="float32")}


def test_class_embeddings_are_the_prompt_ensemble(env):
    bb, ps = env["bb"], PromptSet()
    W = class_embeddings(bb, ps, DEFAULT_LABELS)
    e = bb.encode_text(ps.prompts("gym")).astype(np.float64)
    want = e.mean(0) / np.linalg.norm(e.mean(0))
    np.testing.assert_allclose(W[DEFAULT_LABELS.index("gym")], want, atol=1e-6)
    assert len(ps.prompts("gym")) == len(ps.templates) * len(ps.names["gym"])
    assert all("健身房" in p or "体育馆" in p or "健身中心" in p for p in ps.prompts("gym"))


def test_run_scores_like_clip(env):
    from sgmft.checkpoint import load_checkpoint

    model, info = load_checkpoint(env["run"])
    assert info["model_cfg"].arch == "zeroshot" and info["label_names"] == list(DEFAULT_LABELS)
    assert info["contract"].extraction["backbone_fingerprint"] == env["bb"].fingerprint()
    run = json.loads((env["run"] / "run.json").read_text())
    assert run["kind"] == "zero-shot" and run["store"] is None
    bb = env["bb"]
    scale = min(float(bb.model.logit_scale.exp()), 100.0)
    assert model.scale == 1.0 and run["logit_scale"] == pytest.approx(scale)   # logits: the score, order 1
    assert info["calibration"]["temperature"] == pytest.approx(1 / scale)     # probabilities: CLIP's
    W = torch.nn.functional.normalize(model.class_emb.detach(), dim=-1)
    t = torch.from_numpy(bb.encode_text(["今天在健身房跑步", "电影院"]))
    i = torch.from_numpy(bb.encode_images([_img(0), _img(1)]))
    with torch.no_grad():
        only_t = model(t, i, torch.tensor([True, True]), torch.tensor([False, False])).logits
        only_i = model(t, i, torch.tensor([False, False]), torch.tensor([True, True])).logits
        both = model(t, i, torch.tensor([True, True]), torch.tensor([True, True])).logits
        none = model(t, i, torch.tensor([False, False]), torch.tensor([False, False])).logits
    torch.testing.assert_close(only_t, t @ W.T)
    torch.testing.assert_close(only_i, i @ W.T)
    torch.testing.assert_close(both, 0.5 * (only_t + only_i))
    assert torch.all(none == 0)                                          # neither modality: uniform
    from sgmft.predict import Predictor

    pred = Predictor.load(env["run"])                                    # CLIP's zero-shot classifier:
    got = pred.predict_features(t.numpy(), i.numpy(), np.array([True, True]), np.array([False, False])).probs
    np.testing.assert_allclose(got, torch.softmax(scale * t @ W.T, -1).numpy(), atol=1e-6)


def _img(seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))


def test_predict_serve_evaluate_export_accept_the_run(env, tmp_path):
    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.eval.run import evaluate
    from sgmft.features.extract import extract_features
    from sgmft.predict import PostPredictor

    pp = PostPredictor.load(env["run"], device="cpu")
    out = pp.predict_posts([("今天在健身房跑步", []), ("", [])])
    assert out[0]["label"] in DEFAULT_LABELS and abs(sum(out[0]["probs"].values()) - 1) < 1e-5
    man = generate_simposts(tmp_path / "posts", SimPostsConfig(num_posts=24, seed=1))
    res = extract_features(man, tmp_path / "store", backbone=env["bb"], progress=False)
    m = evaluate(env["run"], res.store_path, tmp_path / "eval", split="all", tsne_max_points=24)
    assert 0.0 <= m["accuracy"] <= 1.0 and (tmp_path / "eval" / "metrics.json").is_file()
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sgmft.serve import create_app

    with TestClient(create_app(pp), base_url="http://127.0.0.1") as c:
        r = c.post("/v1/predict", json={"text": "周末去电影院看电影"})
        assert r.status_code == 200 and r.json()["label"] in DEFAULT_LABELS
    from sgmft.predict.export import export_model

    s = export_model(env["run"], "torch-export", tmp_path / "zs.pt2")
    assert s["max_abs_diff"] <= 1e-5


def test_prompts_are_configurable_and_checked(env, tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"templates": ["在{}打卡"], "labels": {"zoo": ["动物园"], "gym": ["健身房"]}},
                            ensure_ascii=False), encoding="utf-8")
    ps = load_prompts(f, ["zoo", "gym"])
    assert ps.prompts("zoo") == ["在动物园打卡"]
    s = build_zero_shot(env["bb"], tmp_path / "run2", labels=["zoo", "gym"], prompts=f, text_weight=1.0)
    assert s["labels"] == ["zoo", "gym"] and s["num_prompts"] == {"zoo": 1, "gym": 1}
    used = json.loads((tmp_path / "run2" / "model" / "prompts.json").read_text(encoding="utf-8"))
    assert used["templates"] == ["在{}打卡"]
    from sgmft.errors import InputError

    f.write_text(json.dumps({"templates": ["没有占位符"]}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(InputError, match="exactly one"):
        load_prompts(f)
    with pytest.raises(InputError, match="no names for place"):
        load_prompts(None, ["zoo"])
    assert main(["zero-shot", "--backbone", env["spec"], "--out", str(tmp_path / "run3"),
                 "--prompts", str(f)]) == 2                                  # a user error, one line
