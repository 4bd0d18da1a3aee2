"""Inputs that cannot hurt (issue 9, extraction side): bounded memory by construction
(reduced decoding, a decode budget, images per post, prefetch bounded in bytes), confined
image paths, field limits, corrupt cache shards recomputed, outputs that may not overwrite
inputs, and orphan temp folders cleaned. Peak RSS itself is measured by
benchmarks/bench_memory.py, not here."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from sgmft.atomic import OutputCollisionError, check_outputs
from sgmft.cli import main
from sgmft.features import FeatureStore
from sgmft.features.backbones import load_backbone
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.features.encode import DEFAULT_MAX_IMAGES, MIN_REDUCE_SIDE, reduce_side
from sgmft.features.extract import _OrderedBudget, extract_features
from sgmft.features.store import FeatureStoreWriter
from sgmft.ingest.images import DECODE_BUDGET, ByteBudget, load_image
from sgmft.ingest.manifest import ManifestError, read_manifest

BS = 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("safety")
    ckpt = build_tiny_chinese_clip(root / "tinycc")
    b = load_backbone(f"chinese-clip:{ckpt}", batch_size=BS)
    b.spec_path = str(ckpt)
    return b


def _img(path, size=(40, 30), color=(60, 90, 200), mode="RGB", **save):
    Image.new(mode, size, color if mode == "RGB" else color + (255,)).save(path, **save)
    return path


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# -- 1. bounded memory ------------------------------------------------------------------------
def test_large_jpeg_decoded_reduced_each_side_kept(tmp_path):
    p = _img(tmp_path / "big.jpg", (4000, 1000), quality=90)
    full = load_image(p)
    red = load_image(p, reduce_to=448)
    assert full.size == (4000, 1000)
    # each side >= 448 and < 2 * 448 (per-axis integer factors), so the backbone's 224 px input is unaffected
    assert all(448 <= s < 896 for s in red.size), red.size
    assert red.mode == "RGB"
    np.testing.assert_allclose(np.asarray(red).mean((0, 1)), np.asarray(full).mean((0, 1)), atol=2)


@pytest.mark.parametrize("mode,name", [("RGB", "big.png"), ("RGBA", "big-rgba.png"), ("L", "big-l.png")])
def test_large_png_reduced_before_conversion(tmp_path, mode, name):
    p = tmp_path / name
    Image.new(mode, (3000, 500), {"RGB": (10, 20, 30), "RGBA": (10, 20, 30, 128), "L": 77}[mode]).save(p)
    red = load_image(p, reduce_to=448)
    assert red.mode == "RGB" and red.size == (3000 // 6, 500), red.size
    assert np.array_equal(np.asarray(red)[0, 0], np.asarray(load_image(p))[0, 0])


def test_palette_and_16bit_images_reduce_too(tmp_path):
    pal = Image.new("P", (2000, 2000), 3)
    pal.putpalette([i % 256 for i in range(768)])
    pal.save(tmp_path / "p.png")
    a = (np.arange(2000 * 1000, dtype=np.uint32) % 65535).reshape(1000, 2000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "i16.png")
    assert load_image(tmp_path / "p.png", reduce_to=448).size == (500, 500)
    assert load_image(tmp_path / "i16.png", reduce_to=448).size == (500, 500)


def test_small_images_untouched_by_reduction(tmp_path):
    p = _img(tmp_path / "s.jpg", (800, 600), quality=85)
    assert np.array_equal(np.asarray(load_image(p, reduce_to=448)), np.asarray(load_image(p)))
    assert reduce_side(type("B", (), {"image_size": 32})()) == MIN_REDUCE_SIDE
    assert reduce_side(type("B", (), {"image_size": 336})()) == 672


def test_decode_budget_bounds_concurrent_decodes():
    b = ByteBudget(100)
    active, peak = [0], [0]
    lock = threading.Lock()

    def work(n):
        with b.hold(n) as got:
            assert got == min(n, 100)
            with lock:
                active[0] += got
                peak[0] = max(peak[0], active[0])
            time.sleep(0.01)
            with lock:
                active[0] -= got

    ts = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 30, 500, 10, 90)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in ts)          # a request above capacity does not dead-lock
    assert b.peak <= 100 and peak[0] <= 100 and b.used == 0


def test_decode_budget_is_used_by_load_image(tmp_path):
    p = _img(tmp_path / "b.png", (1200, 1000))
    DECODE_BUDGET.peak = 0
    load_image(p, reduce_to=448)
    assert DECODE_BUDGET.peak == 4 * 1200 * 1000 and DECODE_BUDGET.used == 0


def test_ordered_prefetch_budget_turns_and_abort():
    ob = _OrderedBudget(100)
    got = []

    def take(turn, n):
        got.append((turn, ob.acquire(turn, n)))

    t1 = threading.Thread(target=take, args=(1, 50))
    t1.start()
    time.sleep(0.05)
    assert got == []                                   # turn 1 waits for turn 0
    take(0, 80)
    time.sleep(0.05)
    assert got == [(0, 80)]                            # turn 1 waits for room now
    ob.release(80)
    t1.join(timeout=5)
    assert got == [(0, 80), (1, 50)] and ob.used == 50
    t2 = threading.Thread(target=take, args=(2, 90))
    t2.start()
    ob.abort()
    t2.join(timeout=5)
    assert not t2.is_alive() and got[-1] == (2, 0)


def test_max_images_per_post_rest_rejected_with_reason(bb, tmp_path):
    names = [f"i{j}.png" for j in range(DEFAULT_MAX_IMAGES + 3)]
    for j, n in enumerate(names):
        _img(tmp_path / n, color=(20 * j, 90, 10))
    m = _write(tmp_path / "m.jsonl", [{"id": "a", "text": "图书馆 学习", "images": names}])
    res = extract_features(m, tmp_path / "s", backbone=bb, progress=False, rejects_path=tmp_path / "r.jsonl",
                           image_choice="mean")
    rej = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rej) == 3 and all(r["field"] == "images" and r["line"] == 1 for r in rej)
    assert [r["reason"].split(":")[0] for r in rej] == names[DEFAULT_MAX_IMAGES:]
    assert all(f"max_images={DEFAULT_MAX_IMAGES}" in r["reason"] for r in rej)
    fs = FeatureStore.open(res.store_path)
    # the mean of exactly the first max_images images
    cand = bb.encode_images([load_image(tmp_path / n) for n in names[:DEFAULT_MAX_IMAGES]])
    mean = cand.mean(0) / np.linalg.norm(cand.mean(0))
    np.testing.assert_allclose(fs.image[0], mean, atol=1e-5)
    res2 = extract_features(m, tmp_path / "s2", backbone=bb, progress=False, max_images=None,
                            image_choice="mean", cache_dir=tmp_path / "c2")
    assert res2.images_rejected == 0


def test_tiny_prefetch_budget_same_store(bb, tmp_path):
    rows = [{"id": f"p{i}", "text": f"第{i}条 健身房", "images": [f"i{i % 3}.png"]} for i in range(10)]
    for j in range(3):
        _img(tmp_path / f"i{j}.png", color=(40 * j, 30, 99))
    m = _write(tmp_path / "m.jsonl", rows)
    a = extract_features(m, tmp_path / "a", backbone=bb, batch_size=BS, progress=False, cache_dir=tmp_path / "ca")
    b = extract_features(m, tmp_path / "b", backbone=bb, batch_size=BS, progress=False, cache_dir=tmp_path / "cb",
                         prefetch_bytes=1, num_workers=3)
    fa, fb = FeatureStore.open(a.store_path), FeatureStore.open(b.store_path)
    assert np.array_equal(np.asarray(fa.image), np.asarray(fb.image))
    assert np.array_equal(np.asarray(fa.text), np.asarray(fb.text))


# -- 2. confined paths -------------------------------------------------------------------------
@pytest.fixture
def escaping(tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    _img(data / "img" / "ok.png")
    outside = _img(tmp_path / "outside.png")
    os.symlink(outside, data / "img" / "link-out.png")
    os.symlink(data / "img" / "ok.png", data / "img" / "link-in.png")
    rows = [{"id": "ok", "text": "学校", "images": ["img/ok.png", "img/link-in.png"]},
            {"id": "dots", "text": "学校", "images": ["../../../../../../etc/passwd"]},
            {"id": "abs", "text": "学校", "image": str(outside)},
            {"id": "link", "text": "学校", "images": ["img/link-out.png"]},
            {"id": "up", "text": "学校", "images": ["../outside.png"]}]
    return _write(data / "m.jsonl", rows), tmp_path


def test_image_paths_confined_to_manifest_folder(escaping):
    m, _ = escaping
    posts, rejects = read_manifest(m, on_error="skip")
    assert [p.id for p in posts] == ["ok"]
    got = {(r.line, r.id, r.field) for r in rejects}
    assert got == {(2, "dots", "images"), (3, "abs", "image"), (4, "link", "images"), (5, "up", "images")}
    assert all("outside the allowed folder" in r.reason and "--allow-any-path" in r.reason for r in rejects)
    with pytest.raises(ManifestError, match=r"m.jsonl:2: field 'images'"):
        read_manifest(m)


def test_image_root_and_allow_any_path(escaping):
    m, root = escaping
    posts, rejects = read_manifest(m, on_error="skip", image_root=root)
    # /etc/passwd is still outside (and not an image path under root)
    assert {p.id for p in posts} == {"ok", "abs", "link", "up"}
    assert [(r.id, r.field) for r in rejects] == [("dots", "images")]
    posts, rejects = read_manifest(m, on_error="skip", allow_any_path=True, check_images=False)
    assert len(posts) == 5 and rejects == []
    with pytest.raises(FileNotFoundError, match="--image-root"):
        read_manifest(m, image_root=root / "nope")


def test_extract_cli_rejects_escaping_paths(bb, escaping, capsys):
    m, root = escaping
    out = root / "store"
    # 4 of 5 rows rejected is over --max-rejected's default 0.5 (an error, exit 2); keep the store here
    assert main(["extract", str(m), "--out", str(out), "--backbone", f"chinese-clip:{bb.spec_path}",
                 "--no-progress"]) == 2
    assert main(["extract", str(m), "--out", str(out), "--backbone", f"chinese-clip:{bb.spec_path}",
                 "--no-progress", "--max-rejected", "1", "--overwrite"]) == 0
    assert len(FeatureStore.open(out)) == 1
    rej = [json.loads(x) for x in (root / "store.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {(r["line"], r["field"]) for r in rej} == {(2, "images"), (3, "image"), (4, "images"), (5, "images")}
    assert main(["extract", str(m), "--out", str(root / "s2"), "--backbone", f"chinese-clip:{bb.spec_path}",
                 "--no-progress", "--allow-any-path"]) == 0
    rej = [json.loads(x) for x in (root / "s2.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    # passwd is listed as an image but is not one: opened only with --allow-any-path, and rejected as such
    assert len(FeatureStore.open(root / "s2")) == 5
    assert [r["line"] for r in rej] == [2] and "not an image" in rej[0]["reason"]


# -- 3. field limits -------------------------------------------------------------------------
def test_field_limits_reject_with_line_and_field(tmp_path):
    rows = [{"id": "ok", "user": "u", "text": "短"},
            {"id": "x" * 300, "text": "a"},
            {"id": "u", "user": "y" * 50_000, "text": "a"},
            {"id": "t", "text": "字" * 20_001}]
    m = _write(tmp_path / "m.jsonl", rows)
    posts, rejects = read_manifest(m, on_error="skip", check_images=False)
    assert [p.id for p in posts] == ["ok", "t"]          # a long text is kept (cut for the encoder later)
    assert [(r.line, r.field) for r in rejects] == [(2, "id"), (3, "user")]
    posts, rejects = read_manifest(m, on_error="skip", check_images=False, max_text_chars=20_000)
    assert [p.id for p in posts] == ["ok"]                # the text limit is a memory guard only
    assert [(r.line, r.field) for r in rejects] == [(2, "id"), (3, "user"), (4, "text")]
    assert "300 characters, more than the limit of 256 (--max-id-chars)" in rejects[0].reason
    assert len(rejects[0].id) < 80  # the rejects file does not repeat a huge id
    posts, rejects = read_manifest(m, on_error="skip", check_images=False, max_id_chars=None,
                                   max_user_chars=None, max_text_chars=None)
    assert len(posts) == 4 and not rejects


def test_field_limit_flags(bb, tmp_path, capsys):
    _img(tmp_path / "a.png")
    m = _write(tmp_path / "m.jsonl", [{"id": "a", "user": "u" * 40, "text": "学校", "images": ["a.png"]},
                                      {"id": "b", "text": "学校 上课", "images": ["a.png"]}])
    assert main(["extract", str(m), "--out", str(tmp_path / "s"), "--backbone", f"chinese-clip:{bb.spec_path}",
                 "--no-progress", "--max-user-chars", "10"]) == 0
    assert list(np.asarray(FeatureStore.open(tmp_path / "s").ids)) == ["b"]
    rej = [json.loads(x) for x in (tmp_path / "s.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["field"]) for r in rej] == [(1, "user")]


def test_long_user_does_not_pad_ids(bb, tmp_path):
    """ids.npy and users.npy are sized by their own longest value (issue 9: one 50,000-char
    user made ids.npy 60 MB); the field limit caps users.npy at 256 characters per row."""
    _img(tmp_path / "a.png")
    rows = [{"id": f"p{i}", "user": ("u" * 250 if i == 0 else f"u{i}"), "text": "学校", "images": ["a.png"]}
            for i in range(20)]
    rows.append({"id": "huge", "user": "y" * 50_000, "text": "学校", "images": ["a.png"]})
    m = _write(tmp_path / "m.jsonl", rows)
    res = extract_features(m, tmp_path / "s", backbone=bb, progress=False, rejects_path=tmp_path / "r.jsonl")
    fs = FeatureStore.open(res.store_path)
    assert len(fs) == 20 and fs.ids.dtype == np.dtype("<U3") and fs.users.dtype == np.dtype("<U250")
    assert (tmp_path / "s" / "ids.utf8.npy").stat().st_size < 1000   # store v2: UTF-8 bytes + offsets
    rej = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["field"]) for r in rej] == [(21, "user")]


# -- 4. corrupt cache shards --------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_shard_warned_and_recomputed(bb, tmp_path, caplog, damage):
    rows = [{"id": f"p{i}", "text": f"第{i}条 食堂 吃饭", "images": [f"i{i % 2}.png"]} for i in range(9)]
    for j in range(2):
        _img(tmp_path / f"i{j}.png", color=(90 * j, 30, 99))
    m = _write(tmp_path / "m.jsonl", rows)
    cache = tmp_path / "cache"
    a = extract_features(m, tmp_path / "a", backbone=bb, batch_size=BS, progress=False, cache_dir=cache)
    shards = sorted((cache / "shards").glob("*.npz"))
    assert len(shards) == 3
    victim = shards[1]
    data = victim.read_bytes()
    victim.write_bytes({"truncate": data[:len(data) // 2], "garbage": b"PK\x03\x04" + b"\x00" * 100,
                        "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="sgmft.extract"):
        b = extract_features(m, tmp_path / "b", backbone=bb, batch_size=BS, progress=False, cache_dir=cache)
    warn = [r.getMessage() for r in caplog.records if "corrupt cache shard" in r.getMessage()]
    assert len(warn) == 1 and str(victim) in warn[0] and "\n" not in warn[0]
    assert b.encoded == 4 and b.cached_hits == 5   # only the damaged batch was encoded again
    fa, fb = FeatureStore.open(a.store_path), FeatureStore.open(b.store_path)
    for k in ("ids", "text", "image", "text_mask", "image_mask", "labels"):
        assert np.array_equal(np.asarray(getattr(fa, k)), np.asarray(getattr(fb, k))), k
    np.load(victim)  # rewritten whole


# -- 5. outputs may not overwrite inputs; orphan temp folders ---------------------------------
def test_check_outputs_same_file_symlink_hardlink_and_parent(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text("{}\n")
    os.symlink(m, tmp_path / "link.jsonl")
    os.link(m, tmp_path / "hard.jsonl")
    for out in (m, tmp_path / "link.jsonl", tmp_path / "hard.jsonl", tmp_path, tmp_path / "sub" / ".." / "m.jsonl"):
        with pytest.raises(OutputCollisionError, match="would overwrite the manifest"):
            check_outputs({"the manifest": m}, {"--out": out})
    check_outputs({"the manifest": m}, {"--out": tmp_path / "other.jsonl", "--rejects": None})
    with pytest.raises(OutputCollisionError, match="are the same file"):
        check_outputs({}, {"a": tmp_path / "x", "b": tmp_path / "." / "x"})


def test_extract_rejects_naming_manifest_is_an_error(bb, tmp_path, capsys):
    _img(tmp_path / "a.png")
    m = _write(tmp_path / "m.jsonl", [{"id": "a", "text": "学校", "images": ["a.png"]}])
    before = m.read_bytes()
    os.symlink(m, tmp_path / "alias.jsonl")
    for rej in (m, tmp_path / "alias.jsonl"):
        rc = main(["extract", str(m), "--out", str(tmp_path / "s"), "--backbone", f"chinese-clip:{bb.spec_path}",
                   "--rejects", str(rej), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and "would overwrite the manifest" in err and "Traceback" not in err
    assert m.read_bytes() == before
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.cache").exists()


def test_orphan_tmp_folder_cleaned_with_note(tmp_path, caplog):
    orphan = tmp_path / ".store.tmp-deadbeef"
    orphan.mkdir()
    (orphan / "text.npy").write_bytes(b"half")
    kw = dict(num_posts=1, dim=2, label_names=["a", "b"])
    with caplog.at_level(logging.WARNING, logger="sgmft.features"):
        live = FeatureStoreWriter(tmp_path / "store", **kw)      # a live writer of the same store
    assert not orphan.exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"note: removed {orphan}, an unfinished store left by an interrupted run"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sgmft.features"):
        w = FeatureStoreWriter(tmp_path / "store", **kw)
    assert live._tmp.is_dir()                                # a live writer's folder is left alone
    assert not any("removed" in r.getMessage() for r in caplog.records)
    w.write(0, ids=["x"], text=np.ones((1, 2)), image=np.ones((1, 2)), labels=[0], users=["u"])
    w.close()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(
        ["ids.utf8.npy", "ids.offsets.npy", "text.npy", "image.npy", "users.utf8.npy", "users.offsets.npy",
         "labels.npy", "meta.json"])
    live.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no lock files left behind


def test_extract_after_kill_during_assembly_cleans_orphan(bb, tmp_path, caplog):
    _img(tmp_path / "a.png")
    m = _write(tmp_path / "m.jsonl", [{"id": "a", "text": "学校", "images": ["a.png"]}])
    orphan = tmp_path / ".s.tmp-0badf00d"   # what a SIGKILL during final assembly leaves
    orphan.mkdir()
    (orphan / "ids.npy").write_bytes(b"\x93NUMPY")
    with caplog.at_level(logging.WARNING, logger="sgmft.features"):
        extract_features(m, tmp_path / "s", backbone=bb, progress=False)
    assert not orphan.exists()
    assert any(str(orphan) in r.getMessage() and "interrupted" in r.getMessage() for r in caplog.records)
