"""sgmft.features.encode: the one encode path shared by `sgmft extract` and PostPredictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sgmft.features import FeatureStore
from sgmft.features.backbones import load_backbone
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.features.encode import choose_image, encode_posts, encode_prepared, prepare_batch
from sgmft.features.extract import extract_features
from sgmft.ingest.manifest import read_manifest
from sgmft.ingest.text import TextCleaner


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("encode")
    bb = load_backbone(f"chinese-clip:{build_tiny_chinese_clip(root / 'tinycc')}", batch_size=2)
    imgs = root / "img"
    imgs.mkdir()
    for i, c in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
        Image.new("RGB", (48, 40), c).save(imgs / f"{i}.png")
    (imgs / "bad.jpg").write_bytes(b"not an image")
    rows = [{"id": "a", "text": "周末去看电影 爆米花", "images": ["img/0.png", "img/1.png", "img/2.png"]},
            {"id": "b", "text": "", "images": ["img/bad.jpg", "img/1.png"]},
            {"id": "c", "text": "健身房 跑步", "images": []},
            {"id": "d", "text": "@someone http://t.cn/x", "images": ["img/bad.jpg"]}]
    man = root / "m.jsonl"
    man.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    posts, rejects = read_manifest(man, label_names=None, on_error="skip")
    assert not rejects
    return dict(root=root, bb=bb, man=man, posts=posts)


def test_choose_image_rules():
    img = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    txt = np.array([0, 1], np.float32)
    v, rows = choose_image("similar", img, txt)
    assert rows == [1] and np.array_equal(v, img[1])
    assert choose_image("similar", img, None)[1] == [0]          # no text: the first image
    assert choose_image("first", img, txt)[1] == [0]
    v, rows = choose_image("mean", img, txt)
    assert rows == [0, 1, 2] and np.isclose(np.linalg.norm(v), 1)


@pytest.mark.parametrize("choice", ["similar", "first", "mean"])
def test_one_batch_equals_the_extracted_store(env, choice, tmp_path):
    """A batch encoded here is bit for bit what extract_features stores for it."""
    cleaner = TextCleaner()
    enc = encode_posts(env["bb"], cleaner, env["posts"], choice, base=env["man"].parent)
    res = extract_features(env["man"], tmp_path / "s", backbone=env["bb"], image_choice=choice,
                           batch_size=len(env["posts"]), progress=False, label_names=("x",))
    fs = FeatureStore.open(res.store_path)
    for k in ("text", "image", "text_mask", "image_mask"):
        assert np.array_equal(getattr(enc, k), np.asarray(getattr(fs, k))), k
    # the same image rejects, with paths relative to the manifest's folder
    got = sorted((r.id, r.reason) for r in res.rejects)
    want = sorted((p.id, reason) for p, rej in zip(env["posts"], enc.rejects) for _, reason in rej)
    assert got == want and all(reason.startswith("img/bad.jpg: ") for _, reason in got)


def test_masks_used_images_and_the_two_stages(env):
    bb, posts, cleaner = env["bb"], env["posts"], TextCleaner()
    enc = encode_posts(bb, cleaner, posts, "similar")
    assert enc.text_mask.tolist() == [True, False, True, False]     # b: no text; d: nothing left after cleaning
    assert enc.image_mask.tolist() == [True, True, False, False]    # c: no image; d: only a bad one
    assert not enc.text[~enc.text_mask].any() and not enc.image[~enc.image_mask].any()
    # post a: the image closest to its text; post b: its bad image skipped, the good one used
    cand = bb.encode_images([Image.open(p).convert("RGB") for p in posts[0].images])
    assert enc.images_used[0] == [int(np.argmax(cand @ enc.text[0]))]
    assert enc.images_used[1] == [1] and enc.rejects[1][0][0] == 0 and enc.images_used[2] == []
    # "first" stops loading after the first usable image
    pr = prepare_batch(bb, cleaner, posts, "first")
    assert pr.images == [[0], [1], [], []]
    assert encode_prepared(bb, pr, "first").images_used == [[0], [1], [], []]
    with pytest.raises(ValueError, match="image_choice"):
        prepare_batch(bb, cleaner, posts, "best")
