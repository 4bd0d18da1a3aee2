"""sgmft extract: SimPosts end to end, image choice, masks, cache/resume after a real kill,
2 processes == 1 process, and a dirty corpus with every planted problem accounted for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from sgmft.features.backbones import load_backbone
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.data.simposts import SimPostsConfig, generate_simposts
from sgmft.features import FeatureStore
from sgmft.features.extract import extract_features
from sgmft.ingest.images import ImageLoadError, load_image
from sgmft.ingest.manifest import read_manifest
from sgmft.ingest.text import TextCleaner

BS = 8  # posts per batch: 60 posts -> 8 batches


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("extract")
    ckpt = build_tiny_chinese_clip(root / "tinycc")
    spec = f"chinese-clip:{ckpt}"
    clean = generate_simposts(root / "clean", SimPostsConfig(num_posts=60, seed=3))
    dirty = generate_simposts(root / "dirty", SimPostsConfig(num_posts=60, dirty=True, seed=5))
    bb = load_backbone(spec, batch_size=BS)
    base = extract_features(clean, root / "base", backbone=bb, batch_size=BS, progress=False,
                            cache_dir=root / "base.cache")
    return dict(root=root, spec=spec, bb=bb, clean=clean, dirty=dirty, base=base)


def _same(a, b):
    fa, fb = FeatureStore.open(a), FeatureStore.open(b)
    for k in ("ids", "users", "labels", "split", "text_mask", "image_mask"):
        assert np.array_equal(np.asarray(getattr(fa, k)), np.asarray(getattr(fb, k))), k
    assert np.array_equal(np.asarray(fa.text), np.asarray(fb.text))    # bit for bit
    assert np.array_equal(np.asarray(fa.image), np.asarray(fb.image))


def test_simposts_end_to_end(env):
    res, bb = env["base"], env["bb"]
    posts, _ = read_manifest(env["clean"])
    assert res.num_posts == len(posts) == 60 and res.encoded == 60 and res.cached_hits == 0
    fs = FeatureStore.open(res.store_path)
    assert fs.meta["backbone"] == env["spec"] and fs.dim == bb.dim == 32
    ex = fs.meta["extra"]
    assert ex["image_choice"] == "similar" and ex["manifest"] == str(env["clean"].resolve())
    assert ex["clean_config"]["stopwords"] is True
    assert list(np.asarray(fs.ids)) == [p.id for p in posts]
    assert [fs.label_names[i] for i in np.asarray(fs.labels)] == [p.label for p in posts]
    tm, im = np.asarray(fs.text_mask), np.asarray(fs.image_mask)
    text, image = np.asarray(fs.text), np.asarray(fs.image)
    # masked rows are exactly zero, unmasked ones unit length
    np.testing.assert_allclose(np.linalg.norm(text[tm], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(image[im], axis=1), 1, atol=1e-5)
    assert not text[~tm].any() and not image[~im].any()
    no_img = [i for i, p in enumerate(posts) if not p.images]
    assert not im[no_img].any() and res.image_missing == (~im).sum()
    # 'similar': the stored image vector is the post's image closest to its text
    cleaner = TextCleaner()
    multi = [i for i, p in enumerate(posts) if len(p.images) > 1 and tm[i]]
    assert multi
    for i in multi:
        cand = bb.encode_images([load_image(p) for p in posts[i].images])
        t = bb.encode_text([cleaner.clean(posts[i].text)])[0]
        np.testing.assert_allclose(image[i], cand[int(np.argmax(cand @ t))], atol=1e-5)
        np.testing.assert_allclose(text[i], t, atol=1e-5)


def _manifest(tmp_path, rows):
    for r in rows:
        for j, name in enumerate(r.get("images", [])):
            Image.new("RGB", (40, 30), ((60 * j + 40) % 256, 90, 200 - 40 * j)).save(tmp_path / name)
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return m


def test_image_choice_first_mean_and_masks(env, tmp_path):
    bb = env["bb"]
    rows = [{"id": "a", "text": "今天 在 家里 吃饭", "images": ["a0.png", "a1.png", "a2.png"], "label": "home"},
            {"id": "b", "text": "转发微博 [哈哈] http://t.cn/x @某人", "images": ["b0.png"]},  # empty after cleaning
            {"id": "c", "text": "健身房 跑步", "images": []}]
    m = _manifest(tmp_path, rows)
    out = {c: extract_features(m, tmp_path / c, backbone=bb, image_choice=c, progress=False, batch_size=4)
           for c in ("first", "mean", "similar")}
    cand = bb.encode_images([load_image(tmp_path / f"a{j}.png") for j in range(3)])
    f = {c: FeatureStore.open(r.store_path) for c, r in out.items()}
    np.testing.assert_allclose(f["first"].image[0], cand[0], atol=1e-5)
    mean = cand.mean(0) / np.linalg.norm(cand.mean(0))
    np.testing.assert_allclose(f["mean"].image[0], mean, atol=1e-5)
    assert list(f["first"].text_mask) == [True, False, True]
    assert list(f["first"].image_mask) == [True, True, False]
    assert not np.asarray(f["first"].text)[1].any() and not np.asarray(f["first"].image)[2].any()
    assert list(f["first"].labels) == [0, -1, -1]
    assert out["first"].text_missing == 1 and out["first"].image_missing == 1


def test_bad_image_skipped_or_raised(env, tmp_path):
    rows = [{"id": "a", "text": "学校 上课", "images": ["a0.png", "bad.jpg", "a2.png"]}]
    m = _manifest(tmp_path, [dict(rows[0], images=["a0.png", "a2.png"])])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    m.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    res = extract_features(m, tmp_path / "s", backbone=env["bb"], rejects_path=tmp_path / "rej.jsonl", progress=False)
    assert res.num_posts == 1 and res.images_rejected == 1
    rej = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert rej == [{"line": 1, "id": "a", "field": "images", "reason": rej[0]["reason"], "stage": "extract"}]
    assert rej[0]["reason"].startswith("bad.jpg: ")
    assert FeatureStore.open(res.store_path).image_mask[0]  # the other two images were used
    with pytest.raises(ImageLoadError):
        extract_features(m, tmp_path / "s2", backbone=env["bb"], on_error="raise", progress=False,
                         cache_dir=tmp_path / "c2")
    with pytest.raises(FileExistsError):
        extract_features(m, tmp_path / "s", backbone=env["bb"], progress=False)


def test_rerun_is_all_cache_hits(env, tmp_path):
    r = extract_features(env["clean"], tmp_path / "again", backbone=env["bb"], batch_size=BS, progress=False,
                         cache_dir=env["root"] / "base.cache")
    assert r.cached_hits == 60 and r.encoded == 0
    _same(r.store_path, env["base"].store_path)


def test_injected_failure_then_resume_bit_identical(env, tmp_path):
    def boom(b):
        if b == 2:
            raise KeyboardInterrupt("simulated interrupt")

    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        extract_features(env["clean"], tmp_path / "s", backbone=env["bb"], batch_size=BS, progress=False,
                         cache_dir=cache, _after_batch=boom)
    assert not (tmp_path / "s").exists()
    done = len(list((cache / "shards").glob("*.npz")))
    assert done >= 3
    r = extract_features(env["clean"], tmp_path / "s", backbone=env["bb"], batch_size=BS, progress=False,
                         cache_dir=cache)
    assert r.cached_hits == done * BS and r.encoded == 60 - done * BS
    _same(r.store_path, env["base"].store_path)


_KILL_SCRIPT = """
import sys, time, pathlib
from sgmft.features.extract import extract_features
manifest, out, cache, spec, marker = sys.argv[1:6]
def hang(b):
    if b == 3:
        pathlib.Path(marker).write_text("ready")
        time.sleep(600)
extract_features(manifest, out, backbone=spec, batch_size={bs}, cache_dir=cache, progress=False,
                 num_workers=1, _after_batch=hang)
"""


@pytest.mark.slow  # a subprocess: ~15 s of imports on a small machine
def test_sigkill_then_resume_bit_identical(env, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT.format(bs=BS)))
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, str(script), str(env["clean"]), str(tmp_path / "s"), str(cache),
                             env["spec"], str(marker)], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup handlers run
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shards = list((cache / "shards").glob("*.npz"))
    assert len(shards) >= 4
    assert not (tmp_path / "s").exists()
    r = extract_features(env["clean"], tmp_path / "s", backbone=env["spec"], batch_size=BS, progress=False,
                         cache_dir=cache)
    assert r.cached_hits >= 4 * BS and r.cached_hits + r.encoded == 60
    _same(r.store_path, env["base"].store_path)
    assert not list((cache / "shards").glob(".*.tmp"))  # leftovers of the killed run removed


@pytest.mark.slow  # two spawned processes
def test_two_processes_equal_one(env, tmp_path):
    # CPU float results depend on the torch thread count in the last bits: compare at threads=1
    one = extract_features(env["clean"], tmp_path / "one", backbone=env["bb"], batch_size=BS, progress=False,
                           cache_dir=tmp_path / "c1", threads=1)
    r = extract_features(env["clean"], tmp_path / "s", backbone=env["spec"], batch_size=BS, progress=False,
                         cache_dir=tmp_path / "cache", num_processes=2, num_workers=1, threads=1)
    assert r.world_size == 2 and r.num_posts == 60 and r.encoded == 60
    _same(r.store_path, one.store_path)
    shards = sorted((tmp_path / "cache" / "shards").glob("*.npz"))
    assert len(shards) == 60 // BS + 1  # every batch encoded exactly once across the two ranks


def test_dirty_corpus_every_plant_accounted_for(env, tmp_path):
    dirty = env["dirty"]
    truth = json.loads((dirty.parent / "dirty_truth.json").read_text(encoding="utf-8"))["items"]
    res = extract_features(dirty, tmp_path / "s", backbone=env["bb"], batch_size=BS, progress=False,
                           rejects_path=tmp_path / "rejects.jsonl")
    rej = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rej) == res.num_rejects
    fs = FeatureStore.open(res.store_path)
    row = {str(i): k for k, i in enumerate(np.asarray(fs.ids))}
    kinds = {it["expect"] for it in truth}
    assert kinds == {"reject_row", "reject_image", "valid_exotic", "empty_text"}
    for it in truth:
        if it["expect"] == "reject_row":
            assert any(r["line"] == it["line"] and r["field"] == it["field"] and r["stage"] == "manifest"
                       for r in rej), it
        elif it["expect"] == "reject_image":
            assert any(r["line"] == it["line"] and r["id"] == it["id"] and r["field"] == "images"
                       and r["stage"] == "extract" and r["reason"].startswith(it["image"]) for r in rej), it
            assert it["id"] in row  # the post itself is kept
        elif it["expect"] == "valid_exotic":
            assert it["id"] in row and fs.image_mask[row[it["id"]]], it
            assert not any(r["line"] == it["line"] for r in rej), it
        else:
            assert it["id"] in row and not fs.text_mask[row[it["id"]]], it
    # every good post extracted, nothing else
    n_lines = len(dirty.read_text(encoding="utf-8").splitlines())
    bad_lines = {it["line"] for it in truth if it["expect"] == "reject_row"}
    assert len(fs) == n_lines - len(bad_lines)
    assert res.images_rejected == sum(it["expect"] == "reject_image" for it in truth)
    # a rotated JPEG came in upright: its stored vector equals the upright image's encoding
    ex = next(it for it in truth if it["kind"] == "exif_rotated_jpeg")
    up = load_image(dirty.parent / ex["image"])
    assert list(up.size) == ex["display_size"]


def test_extract_options_and_the_engine_argument(env, tmp_path, monkeypatch):
    """ExtractOptions (sgmft.features.extract_options): one typed, checked object; the engine is
    a public argument of extract_features; the older keyword arguments still work and override it."""
    from sgmft.features import ray_engine
    from sgmft.features.extract_options import ExtractOptions

    seen = {}

    def fake_ray(manifest, out_store, backbone, o):           # where engine="ray" goes, with the checked options
        seen.update(manifest=manifest, out=out_store, backbone=backbone, o=o)
        return "ray-result"

    monkeypatch.setattr(ray_engine, "run_extract_ray", fake_ray)
    opts = ExtractOptions(batch_size=5, image_choice="first")
    assert extract_features(env["clean"], tmp_path / "s", backbone="spec", options=opts, engine="ray",
                            batch_size=7, actors=2) == "ray-result"
    o = seen["o"]
    assert (o.engine, o.batch_size, o.image_choice, o.actors) == ("ray", 7, "first", 2)
    assert o.cache_dir == tmp_path / "s.cache" and o.progress is False and seen["backbone"] == "spec"
    assert opts.batch_size == 5 and opts.engine == "local"                 # frozen: the caller's object is unchanged
    assert ray_engine.extract_features_ray(env["clean"], tmp_path / "s", backbone="spec", num_cpus=2) == "ray-result"
    assert (seen["o"].engine, seen["o"].num_cpus) == ("ray", 2)
    with pytest.raises(ValueError, match="engine must be one of local, ray"):
        extract_features(env["clean"], tmp_path / "s", backbone="spec", engine="spark")
    with pytest.raises(ValueError, match=r"address, actors need engine='ray'"):
        ExtractOptions(address="auto", actors=3)
    with pytest.raises(ValueError, match="num-processes"):
        ExtractOptions(engine="ray", num_processes=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ExtractOptions(batch_size=0)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['batchsize'\]"):
        extract_features(env["clean"], tmp_path / "s", backbone="spec", batchsize=3)
    # the local engine through options equals the keyword form (the env's store), file for file
    res = extract_features(env["clean"], tmp_path / "o", backbone=env["bb"],
                           options=ExtractOptions(batch_size=BS, progress=False, cache_dir=env["root"] / "base.cache"))
    assert res.cached_hits == 60 and res.encoded == 0
    _same(res.store_path, env["base"].store_path)
