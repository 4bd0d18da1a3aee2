"""Raw posts end to end through the CLI: `sgmft extract` -> train -> `sgmft predict` (one post and
manifests), PostPredictor == predicting the extracted store, rejects of a dirty corpus, clear
errors, and the raw demo."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from sgmft.features.backbones.tiny import build_tiny_chinese_clip, build_tiny_clip
from sgmft.cli import build_parser, main
from sgmft.data.simposts import SimPostsConfig, generate_simposts
from sgmft.features import FeatureStore
from sgmft.ingest.manifest import read_manifest
from sgmft.predict import Predictor


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """80 clean + 40 dirty SimPosts, a tiny random Chinese-CLIP, `sgmft extract` of both,
    and a 2-epoch SG-MFT run on the clean store."""
    import torch

    old_env, old_threads = os.environ.get("HF_HUB_OFFLINE"), torch.get_num_threads()
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)  # 2 shared cores: one torch thread next to the loader threads is fastest
    root = tmp_path_factory.mktemp("raw")
    spec = f"chinese-clip:{build_tiny_chinese_clip(root / 'tinycc')}"
    clean = generate_simposts(root / "clean", SimPostsConfig(num_posts=80, seed=11))
    dirty = generate_simposts(root / "dirty", SimPostsConfig(num_posts=40, dirty=True, seed=5))
    out = {}
    for name, man in (("clean", clean), ("dirty", dirty)):
        store = root / f"{name}-store"
        rc = main(["extract", str(man), "--out", str(store), "--backbone", spec, "--batch-size", "16",
                   "--no-progress"])
        assert rc == 0
        out[name] = store
    run = root / "run"
    assert main(["train", str(out["clean"]), "--out", str(run), "--preset", "sgmft", "--set", "model.n_tokens=8", "--epochs", "2",
                 "--batch-size", "32", "--no-progress"]) == 0
    yield dict(root=root, spec=spec, clean=clean, dirty=dirty, store=out["clean"], dirty_store=out["dirty"],
               run=run)
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old_env


@pytest.fixture(scope="module")
def pp(env):
    from sgmft.predict import PostPredictor

    return PostPredictor.load(env["run"])


def _truth(manifest):
    return json.loads((manifest.parent / "dirty_truth.json").read_text(encoding="utf-8"))["items"]


def test_extract_cli_writes_store_summary_and_rejects(env, capsys, tmp_path):
    fs = FeatureStore.open(env["store"])
    assert len(fs) == 80 and fs.backbone == env["spec"] and fs.dim == 32
    assert fs.meta["extra"]["image_choice"] == "similar"
    assert (env["store"].parent / "clean-store.rejects.jsonl").read_text() == ""
    # the dirty corpus: summary printed, rejects written next to the store
    rc = main(["extract", str(env["dirty"]), "--out", str(tmp_path / "d"), "--backbone", env["spec"],
               "--batch-size", "16", "--no-progress", "--no-urls", "--no-stopwords", "--image-choice", "first",
               "--rejects", str(tmp_path / "rej.jsonl"), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    out = capsys.readouterr().out
    truth = _truth(env["dirty"])
    n_rows = sum(it["expect"] == "reject_row" for it in truth)
    n_imgs = sum(it["expect"] == "reject_image" for it in truth)
    assert f"extracted {len(FeatureStore.open(tmp_path / 'd'))} posts" in out
    assert f"{n_rows} manifest row(s) dropped, {n_imgs} image file(s) unusable" in out
    assert str(tmp_path / "rej.jsonl") in out and "from cache 0" in out
    ex = FeatureStore.open(tmp_path / "d").meta["extra"]
    assert ex["clean_config"]["urls"] is False and ex["clean_config"]["stopwords"] is False
    assert ex["clean_config"]["mentions"] is True and ex["image_choice"] == "first"
    # an existing store is an error with a hint; --overwrite re-uses the cache
    assert main(["extract", str(env["dirty"]), "--out", str(tmp_path / "d"), "--backbone", env["spec"],
                 "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --json: stdout is one JSON document with the same summary
    assert main(["extract", str(env["dirty"]), "--out", str(tmp_path / "d"), "--backbone", env["spec"],
                 "--batch-size", "16", "--no-urls", "--no-stopwords", "--image-choice", "first",
                 "--rejects", str(tmp_path / "rej.jsonl"), "--cache-dir", str(tmp_path / "cache"),
                 "--overwrite", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows_rejected"] == n_rows and doc["images_rejected"] == n_imgs
    assert doc["store"] == str(tmp_path / "d") and doc["rejects_path"] == str(tmp_path / "rej.jsonl")
    # --strict stops at the first problem with the manifest error
    assert main(["extract", str(env["dirty"]), "--out", str(tmp_path / "s"), "--backbone", env["spec"],
                 "--no-progress", "--strict"]) == 2
    assert "problem(s)" in capsys.readouterr().err


def test_clean_switches_parse():
    from sgmft.cli.raw import CLEAN_STEPS, clean_config_from_args

    args = build_parser().parse_args(["extract", "m.jsonl", "--out", "s", "--backbone", "x",
                                      *[f"--no-{s}" for s in CLEAN_STEPS]])
    cfg = clean_config_from_args(args)
    assert not any(getattr(cfg, s) for s in CLEAN_STEPS) and cfg.user_dict is None
    assert {"urls", "reposts", "mentions", "emoticons", "emoji", "hashtags", "punctuation", "segment",
            "stopwords", "normalize"} <= set(CLEAN_STEPS)


def test_predict_single_post_cli(env, capsys):
    posts, _ = read_manifest(env["clean"])
    p = next(p for p in posts if len(p.images) > 1 and p.text)
    imgs = sum((["--image", str(x)] for x in p.images), [])
    assert main(["predict", str(env["run"]), "--text", p.text, *imgs, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    names = FeatureStore.open(env["store"]).label_names
    assert list(res["probs"]) == names
    assert abs(sum(res["probs"].values()) - 1) < 1e-5
    assert res["label"] == max(res["probs"], key=res["probs"].get) and res["prob"] == res["probs"][res["label"]]
    assert res["text_mask"] and res["image_mask"] and res["image_used"] in [str(x) for x in p.images]
    assert res["text_used"] and res["warnings"] == []
    # the table
    assert main(["predict", str(env["run"]), "--text", p.text, "--image", str(p.images[0])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("top place: ") and all(n in out for n in names) and "text used :" in out


def test_predict_post_equals_store_prediction(env, pp):
    """Same probabilities as extracting the post into a store and predicting the store."""
    pred = Predictor.load(env["run"])
    for man, store in ((env["clean"], env["store"]), (env["dirty"], env["dirty_store"])):
        posts, _ = read_manifest(man, on_error="skip")
        fs = FeatureStore.open(store)
        want = pred.predict_store(fs).probs
        row = {str(i): k for k, i in enumerate(np.asarray(fs.ids))}
        tm, im = np.asarray(fs.text_mask), np.asarray(fs.image_mask)
        seen = set()
        for p in posts:
            r = pp.predict_post(p.text, [str(x) for x in p.images])
            k = row[p.id]
            np.testing.assert_allclose(list(r["probs"].values()), want[k], atol=1e-6, rtol=0)
            assert (r["text_mask"], r["image_mask"]) == (bool(tm[k]), bool(im[k]))
            seen.add((bool(tm[k]), bool(im[k]), len(p.images)))
        if man == env["dirty"]:  # covered: missing text, missing image, several images
            assert any(not t for t, _, _ in seen) and any(not i for _, i, _ in seen)
            assert any(n > 1 for _, _, n in seen)


def test_predict_post_bad_inputs_never_raise(env, pp, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = next(p for p in read_manifest(env["clean"])[0] if p.images).images[0]
    r = pp.predict_post("转发微博 [哈哈] http://t.cn/A6xyz", [str(bad), str(tmp_path / "missing.png"), str(good)])
    assert r["text_mask"] is False and r["image_mask"] is True and r["image_used"] == str(good)
    assert r["text_used"] == ""
    assert len([w for w in r["warnings"] if w.startswith("image ")]) == 2
    assert any("image only" in w for w in r["warnings"])
    r = pp.predict_post("", [])
    assert r["text_mask"] is False and r["image_mask"] is False and r["image_used"] is None
    assert abs(sum(r["probs"].values()) - 1) < 1e-5 and r["warnings"]


def test_predict_manifest_jsonl_and_csv(env, capsys, tmp_path):
    fs = FeatureStore.open(env["store"])
    want = Predictor.load(env["run"]).predict_store(fs).probs
    names, ids = fs.label_names, [str(i) for i in np.asarray(fs.ids)]
    assert main(["predict", str(env["run"]), "--manifest", str(env["clean"]), "--out",
                 str(tmp_path / "p.jsonl"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "predicted 80 posts" in out and "rejects: 0" in out
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ids
    got = np.array([[r[f"prob_{n}"] for n in names] for r in rows])
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert [r["pred"] for r in rows] == [names[i] for i in want.argmax(1)]
    assert all(r["true"] in names for r in rows) and all(r["text_mask"] in (True, False) for r in rows)
    assert (tmp_path / "p.rejects.jsonl").read_text() == ""
    # CSV
    assert main(["predict", str(env["run"]), "--manifest", str(env["clean"]), "--out",
                 str(tmp_path / "p.csv"), "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["posts"] == 80 and s["rejects"] == 0 and 0 <= s["accuracy"] <= 1
    with open(tmp_path / "p.csv", encoding="utf-8", newline="") as f:
        recs = list(csv.DictReader(f))
    assert len(recs) == 80 and [r["id"] for r in recs] == ids
    assert list(recs[0]) == ["id", "pred", *[f"prob_{n}" for n in names], "true", "text_mask", "image_mask",
                             "uncertain", "explanation_decided_by", "explanation_text", "explanation_image"]
    got = np.array([[float(r[f"prob_{n}"]) for n in names] for r in recs])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_predict_manifest_dirty_reports_rejects(env, capsys, tmp_path):
    truth = _truth(env["dirty"])
    rc = main(["predict", str(env["run"]), "--manifest", str(env["dirty"]), "--out", str(tmp_path / "d.jsonl"),
               "--rejects", str(tmp_path / "bad.jsonl"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    rej = [json.loads(x) for x in (tmp_path / "bad.jsonl").read_text(encoding="utf-8").splitlines()]
    assert f"rejects: {len(rej)}" in out and str(tmp_path / "bad.jsonl") in out
    rows = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()]
    n_lines = len(env["dirty"].read_text(encoding="utf-8").splitlines())
    assert len(rows) == n_lines - len({it["line"] for it in truth if it["expect"] == "reject_row"})
    assert len(rows) == len(FeatureStore.open(env["dirty_store"]))
    by_id = {r["id"]: r for r in rows}
    for it in truth:
        if it["expect"] == "reject_row":
            assert any(r["line"] == it["line"] and r["field"] == it["field"] for r in rej), it
            assert it["id"] is None or it["kind"] == "duplicate_id" or it["id"] not in by_id
        elif it["expect"] == "reject_image":
            assert any(r["id"] == it["id"] and r["field"] == "images" and r["reason"].startswith(it["image"])
                       for r in rej), it
            assert it["id"] in by_id
        elif it["expect"] == "empty_text":
            assert by_id[it["id"]]["text_mask"] is False
        else:
            assert by_id[it["id"]]["image_mask"] is True
    assert len(rej) == sum(it["expect"] in ("reject_row", "reject_image") for it in truth)


def test_predict_errors(env, capsys, tmp_path):
    run = str(env["run"])

    def err(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "run directory not found" in err(["predict", str(tmp_path / "nope"), "--text", "x"])
    (tmp_path / "empty").mkdir()
    assert "not an sgmft checkpoint" in err(["predict", str(tmp_path / "empty"), "--text", "x"])
    assert "not both" in err(["predict", run, "--text", "x", "--manifest", str(env["clean"]), "--out", "o.jsonl"])
    assert "--out" in err(["predict", run, "--manifest", str(env["clean"])])
    assert "--text" in err(["predict", run])
    assert "manifest not found" in err(["predict", run, "--manifest", str(tmp_path / "m.jsonl"), "--out", "o.csv"])
    # a different backbone: same D, other weights -> fingerprint mismatch
    other = build_tiny_chinese_clip(tmp_path / "other", seed=1)
    e = err(["predict", run, "--text", "看电影", "--backbone", f"chinese-clip:{other}"])
    assert "fingerprint" in e and "not the one the model" in e
    # ... which can be overridden (a note on stderr)
    assert main(["predict", run, "--text", "看电影", "--backbone", f"chinese-clip:{other}",
                 "--ignore-backbone-mismatch", "--json"]) == 0
    assert "note:" in capsys.readouterr().err
    # another D
    clip = build_tiny_clip(tmp_path / "clip")
    assert "D=16" in err(["predict", run, "--text", "x", "--backbone", f"hf-clip:{clip}"])
    # a hub backbone that is not cached, offline
    e = err(["predict", run, "--text", "x", "--backbone", "chinese-clip:OFA-Sys/chinese-clip-vit-huge-patch14"])
    assert "offline" in e and "hf download" in e
    # the recorded backbone moved away: say so and point at --backbone
    moved = tmp_path / "run2"
    shutil.copytree(env["run"] / "model", moved / "model")
    shutil.copy(env["run"] / "run.json", moved / "run.json")
    feats = json.loads((moved / "model" / "features.json").read_text())
    feats["backbone"] = f"chinese-clip:{tmp_path / 'gone'}"
    (moved / "model" / "features.json").write_text(json.dumps(feats))
    e = err(["predict", str(moved), "--text", "x"])
    assert "does not exist" in e and "--backbone" in e
    # ... and --backbone fixes it (the fingerprint still matches the training store)
    assert main(["predict", str(moved), "--text", "看电影", "--backbone", env["spec"], "--json"]) == 0
    capsys.readouterr()


def test_predict_outputs_may_not_overwrite_the_manifest(env, capsys, tmp_path):
    """issue 9: `predict --out` / `--rejects` naming the input manifest (also via a symlink) is a
    clear error before anything is written."""
    man = tmp_path / "m.jsonl"
    shutil.copy(env["clean"], man)
    shutil.copytree(env["clean"].parent / "images", tmp_path / "images")
    before = man.read_bytes()
    os.symlink(man, tmp_path / "alias.jsonl")
    for extra in (["--out", str(man)], ["--out", str(tmp_path / "alias.jsonl")],
                  ["--out", str(tmp_path / "p.jsonl"), "--rejects", str(man)]):
        assert main(["predict", str(env["run"]), "--manifest", str(man), *extra, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "would overwrite the manifest" in err and "Traceback" not in err
        assert man.read_bytes() == before and not (tmp_path / "p.jsonl").exists()


def test_predict_manifest_confines_paths_and_caps_images(env, capsys, tmp_path):
    """`predict --manifest` shares extract's input checks: escaping paths and images beyond
    --max-images are rejects with line and field."""
    good = next(p for p in read_manifest(env["clean"])[0] if p.images).images[0]
    (tmp_path / "img").mkdir()
    for j in range(4):
        shutil.copy(good, tmp_path / "img" / f"{j}.jpg")
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"id": "a", "text": "图书馆", "images": [f"img/{j}.jpg" for j in range(4)]}) + "\n"
                   + json.dumps({"id": "b", "text": "图书馆", "images": ["../../../../etc/passwd"]}) + "\n",
                   encoding="utf-8")
    assert main(["predict", str(env["run"]), "--manifest", str(man), "--out", str(tmp_path / "p.jsonl"),
                 "--max-images", "2", "--no-progress"]) == 0
    capsys.readouterr()
    rej = [json.loads(x) for x in (tmp_path / "p.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["field"]) for r in rej] == [(1, "images"), (1, "images"), (2, "images")]
    assert "max_images=2" in rej[0]["reason"] and "outside the allowed folder" in rej[2]["reason"]
    assert [json.loads(x)["id"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] == ["a"]


# the feature-contract tests (settings from the checkpoint, versions, migration) are in
# tests/test_checkpoint.py


def test_help_lists_raw_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(v in out for v in ("extract", "predict", "demo-raw"))


def test_demo_raw(tmp_path, capsys):  # ~15 s on 2 shared cores
    assert main(["demo-raw", "--out", str(tmp_path / "demo"), "--posts", "80", "--epochs", "2",
                 "--no-progress", "--json"]) == 0
    cap = capsys.readouterr()
    out = cap.err                                   # --json: the narrative goes to stderr ...
    assert "RANDOM" in out and "test accuracy" in out and out.count("predicted ") >= 5
    s = json.loads((tmp_path / "demo" / "results.json").read_text(encoding="utf-8"))
    assert json.loads(cap.out)["new_posts"] == s["new_posts"]   # ... and stdout is the summary
    assert s["random_backbone"] and len(s["new_posts"]) == 5 and s["dirty"]["rejects"] > 0
    assert (tmp_path / "demo" / "run" / "eval-test" / "metrics.json").is_file()


def test_post_predictor_save_and_from_pretrained(env, pp, tmp_path):
    """The raw-post predictor shares the model folder (card included, extraction contract listed)
    and loads it back with the backbone recorded in the contract: same probabilities."""
    from sgmft.predict import PostPredictor

    out = pp.save_pretrained(tmp_path / "shared")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Feature contract" in card and "image choice `similar`" in card and "--text" in card
    back = PostPredictor.from_pretrained(out)
    assert back.image_choice == pp.image_choice and back.cleaner.cfg == pp.cleaner.cfg
    a = pp.predict_post("周末和朋友去看电影", [])
    b = back.predict_post("周末和朋友去看电影", [])
    assert a["probs"] == b["probs"]
