"""sgmft.data.simposts: determinism, a clean corpus validates, regimes carry (or hide) the class,
and a dirty corpus plants exactly the problems its dirty_truth.json lists."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageOps

from sgmft.data.simposts import DIRTY_EXPECT, VOCAB, SimPostsConfig, generate_simposts
from sgmft.ingest.manifest import read_manifest
from sgmft.ingest.text import clean_text
from sgmft.labels import DEFAULT_LABELS


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _truth(root):
    return [json.loads(x) for x in (root / "truth.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    return root, generate_simposts(root, SimPostsConfig(num_posts=400, seed=3))


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirty")
    return root, generate_simposts(root, SimPostsConfig(num_posts=150, dirty=True, seed=1))


def test_deterministic_by_seed(tmp_path):
    cfg = SimPostsConfig(num_posts=60, dirty=True, seed=7)
    generate_simposts(tmp_path / "a", cfg)
    generate_simposts(tmp_path / "b", cfg)
    generate_simposts(tmp_path / "c", SimPostsConfig(num_posts=60, dirty=True, seed=8))
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a["manifest.jsonl"] != c["manifest.jsonl"]


def test_clean_corpus_validates(clean):
    root, manifest = clean
    assert manifest == root / "manifest.jsonl"
    posts, rejects = read_manifest(manifest, require_labels=True)
    assert rejects == [] and len(posts) == 400
    assert not (root / "dirty_truth.json").exists()
    truth = _truth(root)
    assert [t["id"] for t in truth] == [p.id for p in posts]
    assert {p.label for p in posts} == set(DEFAULT_LABELS)
    assert len({p.user for p in posts}) > 10
    # stratified split: every class is in every split, roughly 70/10/20
    split = Counter(p.split for p in posts)
    assert set(split) == {"train", "val", "test"} and 0.15 < split["test"] / 400 < 0.25
    for c in DEFAULT_LABELS:
        assert {p.split for p in posts if p.label == c} >= {"train", "test"}
    # multi-image and text-only posts exist; the informative image index is in range
    n_img = Counter(len(p.images) for p in posts)
    assert n_img[1] > 200 and sum(n_img[k] for k in (2, 3, 4)) > 30 and set(n_img) <= {0, 1, 2, 3, 4}
    for t, p in zip(truth, posts):
        assert t["num_images"] == len(p.images)
        assert t["key_image"] is None or 0 <= t["key_image"] < len(p.images)
    # realistic noise is present in the raw text
    raw = "\n".join(p.text for p in posts)
    for marker in ("//@", "http://t.cn/", "@", "#", "[", "！"):
        assert marker in raw
    # every image opens (all plain JPEG/PNG, RGB, the configured size)
    for p in posts[:60]:
        for f in p.images:
            with Image.open(f) as im:
                im.load()
                assert im.mode == "RGB" and im.size == (96, 96)
    meta = json.loads((root / "simposts.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["label_names"] == list(DEFAULT_LABELS)


def test_regimes_decide_which_modality_carries_the_class(clean):
    root, manifest = clean
    posts, _ = read_manifest(manifest)
    truth = _truth(root)
    assert set(t["regime"] for t in truth) == {"both", "text", "image", "neither"}
    # text: a vocabulary count on the *cleaned* text finds the true class iff the text is informative
    hits_inf, hits_uninf = [], []
    for t, p in zip(truth, posts):
        s = clean_text(p.text).replace(" ", "")
        counts = [sum(w.lower() in s.lower() for w in VOCAB[c]) for c in DEFAULT_LABELS]
        if t["text_informative"]:
            hits_inf.append(DEFAULT_LABELS[int(np.argmax(counts))] == t["true_label"])
        else:
            hits_uninf.append(max(counts) == 0)
    assert np.mean(hits_inf) > 0.9 and np.mean(hits_uninf) > 0.9
    # image: nearest class-mean colour of the informative image beats chance by far
    feats, ys = [], []
    for t, p in zip(truth, posts):
        if t["image_informative"]:
            with Image.open(p.images[t["key_image"]]) as im:
                a = np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32) / 255
            feats.append(a.ravel())
            ys.append(DEFAULT_LABELS.index(t["true_label"]))
    X, y = np.stack(feats), np.array(ys)
    half = len(y) // 2
    means = np.stack([X[:half][y[:half] == c].mean(0) for c in range(8)])
    pred = np.argmin(((X[half:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[half:]).mean() > 0.7


def test_regime_probabilities_and_label_noise(tmp_path):
    m = generate_simposts(tmp_path, SimPostsConfig(num_posts=80, p_both=0, p_text=0, p_image=1, p_neither=0,
                                                   no_image_fraction=0, label_noise=0, seed=2))
    truth = _truth(tmp_path)
    assert {t["regime"] for t in truth} == {"image"} and all(t["image_informative"] for t in truth)
    assert all(t["label"] == t["true_label"] for t in truth)
    noisy = generate_simposts(tmp_path / "n", SimPostsConfig(num_posts=300, label_noise=0.3, seed=2))
    flipped = np.mean([t["label"] != t["true_label"] for t in _truth(noisy.parent)])
    assert 0.2 < flipped < 0.4
    assert m.exists()


def test_dirty_row_problems_are_exactly_the_rejects(dirty):
    root, manifest = dirty
    truth = json.loads((root / "dirty_truth.json").read_text(encoding="utf-8"))
    items = truth["items"]
    assert {it["expect"] for it in items} == set(DIRTY_EXPECT)
    out = root / "rejects.jsonl"
    posts, rejects = read_manifest(manifest, on_error="skip", rejects_path=out)
    planted = {(it["line"], it["field"]) for it in items if it["expect"] == "reject_row"}
    assert {(r.line, r.field) for r in rejects} == planted
    assert {"malformed_json", "duplicate_id", "unknown_label", "missing_image"} <= {
        it["kind"] for it in items if it["expect"] == "reject_row"}
    assert len(out.read_text().splitlines()) == len(rejects)
    assert len(posts) == 150  # every planted bad row is an extra line; all real posts survive
    # the row-level reject ids match (the malformed line and the id-less row have none)
    by_line = {r.line: r for r in rejects}
    for it in items:
        if it["expect"] == "reject_row":
            assert by_line[it["line"]].id == it["id"]


def test_dirty_image_problems_exist_on_disk(dirty):
    root, manifest = dirty
    items = json.loads((root / "dirty_truth.json").read_text(encoding="utf-8"))["items"]
    posts, _ = read_manifest(manifest, on_error="skip")
    by_id = {p.id: p for p in posts}
    bad = {it["kind"]: it for it in items if it["expect"] == "reject_image"}
    assert set(bad) == {"corrupt_image", "truncated_jpeg", "zero_byte"}
    for kind, it in bad.items():
        f = root / it["image"]
        assert f in by_id[it["id"]].images and by_id[it["id"]].line == it["line"]
        if kind == "zero_byte":
            assert f.stat().st_size == 0
        with pytest.raises(OSError):  # PIL's UnidentifiedImageError and "truncated" are OSErrors
            with Image.open(f) as im:
                im.load()


def test_dirty_exotic_images_are_valid(dirty):
    root, manifest = dirty
    items = json.loads((root / "dirty_truth.json").read_text(encoding="utf-8"))["items"]
    posts, _ = read_manifest(manifest, on_error="skip")
    by_id = {p.id: p for p in posts}
    exotic = {it["kind"]: it for it in items if it["expect"] == "valid_exotic"}
    assert {"palette_png", "rgba_png", "cmyk_jpeg", "gray16_png", "animated_gif",
            "exif_rotated_jpeg"} <= set(exotic)
    for kind, it in exotic.items():
        f = root / it["image"]
        assert f in by_id[it["id"]].images
        with Image.open(f) as im:
            im.load()
            assert im.mode == it["mode"], kind
            if kind == "animated_gif":
                assert im.n_frames == it["n_frames"]
            if kind == "exif_rotated_jpeg":
                assert im.getexif()[0x0112] == 6
                assert list(ImageOps.exif_transpose(im).size) == it["display_size"] != list(im.size)
            if kind == "gray16_png":
                assert np.asarray(im).max() > 255


def test_dirty_empty_text_post(dirty):
    root, manifest = dirty
    items = json.loads((root / "dirty_truth.json").read_text(encoding="utf-8"))["items"]
    (it,) = [it for it in items if it["expect"] == "empty_text"]
    posts, _ = read_manifest(manifest, on_error="skip")
    post = next(p for p in posts if p.id == it["id"])
    assert post.text.strip() and clean_text(post.text) == "" and post.line == it["line"]


def test_overwrite_rules(tmp_path):
    cfg = SimPostsConfig(num_posts=20, seed=0)
    generate_simposts(tmp_path, cfg)
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_simposts(tmp_path, cfg)
    (tmp_path / "images" / "stale.jpg").write_bytes(b"old")
    generate_simposts(tmp_path, SimPostsConfig(num_posts=10, seed=0), overwrite=True)
    assert not (tmp_path / "images" / "stale.jpg").exists() and (tmp_path / "keep.txt").exists()
    assert len(read_manifest(tmp_path / "manifest.jsonl")[0]) == 10


@pytest.mark.parametrize("bad", [dict(p_both=0.9), dict(num_posts=0), dict(split=(0.5, 0.5, 0.5)),
                                 dict(image_size=8)])
def test_config_validation(tmp_path, bad):
    with pytest.raises(ValueError):
        generate_simposts(tmp_path, SimPostsConfig(**bad))


def _content_digest(root) -> str:
    """One hash of a corpus: every file's path, and its decoded pixels (mode + array of frame 0)
    when it is an image that decodes, else its bytes. Pixels rather than image bytes, so that
    the pin holds across encoder builds (zlib, libjpeg) as long as the generated images do."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        h.update(p.relative_to(root).as_posix().encode())
        try:
            with Image.open(p) as im:
                im.load()
                h.update(im.mode.encode() + np.asarray(im).tobytes())
        except Exception:          # the planted broken images (and the text files): their bytes
            h.update(p.read_bytes())
    return h.hexdigest()


# Measured on the generator before its split into short steps (issue 19): a given seed must keep
# giving the same corpus, images included.
PINNED = {
    "clean": (SimPostsConfig(num_posts=40, num_users=5, image_size=32, seed=5),
              "2d1f286c028b8846a4f910d5cb27135d360a0abebdabfe0921c3485ab8fd7f96"),
    "dirty": (SimPostsConfig(num_posts=40, num_users=5, image_size=32, dirty=True, seed=2),
              "ed1abc6c2cc8f39e3de9fa9fc58452a6494e77a9ccb3e7afabfe83780c2f7a50"),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_generated_corpus_is_pinned_by_seed(tmp_path, name):
    cfg, want = PINNED[name]
    generate_simposts(tmp_path / name, cfg)
    assert _content_digest(tmp_path / name) == want
