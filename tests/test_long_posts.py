"""Long posts: the long-text policy (CleanConfig.long_text, applied by sgmft.features.encode), the
extract summary counts, and a 40,000-character post kept with its image (tiny random Chinese-CLIP)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from sgmft.errors import InputError
from sgmft.features import FeatureStore
from sgmft.features.backbones import load_backbone
from sgmft.features.backbones.tiny import build_tiny_chinese_clip
from sgmft.features.encode import encode_posts, tokenize_long
from sgmft.features.extract import extract_features
from sgmft.ingest.manifest import Post
from sgmft.ingest.text import CleanConfig, TextCleaner, parse_long_text

RNG = np.random.default_rng(7)
LONG = "".join(chr(c) for c in RNG.integers(0x4E00, 0x9FA5, 500))        # a 500-character post
HUGE = "".join(chr(c) for c in RNG.integers(0x4E00, 0x9FA5, 40_000))     # over the old 20,000 limit
SHORT = "今天在健身房跑步"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_chinese_clip(tmp_path_factory.mktemp("long") / "ckpt")


@pytest.fixture(scope="module")
def tiny(ckpt):
    return load_backbone(f"chinese-clip:{ckpt}", device="cpu", dtype="float32", batch_size=8)


def _posts(*texts):
    return [Post(f"p{i}", "u", t, (), None, None, i + 1) for i, t in enumerate(texts)]


def _text_features(bb, policy, *texts):
    enc = encode_posts(bb, TextCleaner(CleanConfig(long_text=policy)), _posts(*texts))
    return enc


def test_policy_spec_is_checked():
    assert parse_long_text("truncate") == ("truncate", None)
    assert parse_long_text("head-tail:10") == ("head-tail", 10)
    assert parse_long_text("chunk-mean") == ("chunk-mean", None)
    for bad in ("middle", "chunk-mean:0", "head-tail:x", "truncate:3", 5):
        with pytest.raises(InputError, match="long_text"):
            CleanConfig(long_text=bad)


def test_policy_changes_a_500_character_post_only_when_asked(tiny):
    cleaned = TextCleaner().clean(LONG)
    assert len(tiny.text_ids([cleaned])[0]) > 4 * tiny.text_budget           # really longer than the context
    base = _text_features(tiny, "truncate", LONG, SHORT)
    # the default is what the backbone gives the cleaned text (the behaviour before the option)
    np.testing.assert_array_equal(base.text, tiny.encode_text([cleaned, TextCleaner().clean(SHORT)]))
    assert base.text_over.tolist() == [True, False] and base.text_cut.tolist() == [True, False]
    for policy in ("head-tail", "head-tail:0", "chunk-mean", "chunk-mean:2"):
        got = _text_features(tiny, policy, LONG, SHORT)
        assert np.abs(got.text[0] - base.text[0]).max() > 1e-5, policy      # the long post changes (float noise: ~1e-7)
        np.testing.assert_allclose(got.text[1], base.text[1], atol=1e-6)    # a short one does not
        np.testing.assert_allclose(np.linalg.norm(got.text, axis=1), 1, atol=1e-5)
    assert _text_features(tiny, "chunk-mean", LONG, SHORT).text_cut.tolist() == [True, False]   # 8 x 50 < 492 tokens
    assert _text_features(tiny, "chunk-mean:10", LONG, SHORT).text_cut.tolist() == [False, False]  # 10 windows hold it
    assert _text_features(tiny, "chunk-mean:2", LONG, SHORT).text_cut.tolist() == [True, False]


def test_head_tail_and_chunk_mean_windows(tiny):
    cleaned = TextCleaner().clean(LONG)
    ids, b = tiny.text_ids([cleaned])[0], tiny.text_budget
    toks, rows, over, cut = tokenize_long(tiny, [cleaned], "head-tail:20")
    want = tiny.tokens_from_ids([ids[:20] + ids[len(ids) - (b - 20):]])
    assert rows is None and over == cut == [True]
    assert all(np.array_equal(toks[k].numpy(), want[k].numpy()) for k in want)
    # chunk-mean:3 = the normalised mean of the first three windows' normalised embeddings
    e = tiny.forward_text(tiny.tokens_from_ids([ids[i * b:(i + 1) * b] for i in range(3)])).astype(np.float64)
    m = e.mean(0) / np.linalg.norm(e.mean(0))
    got = _text_features(tiny, "chunk-mean:3", LONG).text[0]
    np.testing.assert_allclose(got, m, atol=1e-6)


def test_extract_keeps_a_huge_post_and_counts_cut_texts(tiny, tmp_path):
    Image.fromarray(RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    rows = [{"id": "huge", "text": HUGE, "images": ["a.png"], "label": "gym"},
            {"id": "long", "text": LONG, "images": ["a.png"], "label": "home"},
            {"id": "short", "text": SHORT, "images": ["a.png"], "label": "work"}]
    man = tmp_path / "posts.jsonl"
    man.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    res = extract_features(man, tmp_path / "store", backbone=tiny, progress=False)
    assert res.num_posts == 3 and res.num_rejects == 0                       # the 40,000-character post is kept
    assert (res.text_over, res.text_cut) == (2, 2)
    fs = FeatureStore.open(res.store_path)
    assert np.asarray(fs.image_mask).all() and np.asarray(fs.text_mask).all()
    assert fs.meta["extra"]["clean_config"]["long_text"] == "truncate"
    res2 = extract_features(man, tmp_path / "store2", backbone=tiny, progress=False,
                            clean_cfg=CleanConfig(long_text="chunk-mean:10"))
    assert (res2.text_over, res2.text_cut) == (2, 1)                           # 10 windows hold the 500 characters
    fs2 = FeatureStore.open(res2.store_path)
    assert fs2.meta["extra"]["clean_config"]["long_text"] == "chunk-mean:10"   # in the feature contract
    t1, t2 = np.asarray(fs.text), np.asarray(fs2.text)
    # the short post: the same features; it shares its batch with other windows, so the GEMM shapes differ,
    # and on a CPU without AVX-512 (AVX2 kernels) that moves the last bits (seen: 3e-8)
    np.testing.assert_allclose(t1[2], t2[2], rtol=0, atol=1e-6)
    assert (np.abs(t1[:2] - t2[:2]).max(axis=1) > 1e-5).all()                 # both long posts change
    assert np.array_equal(np.asarray(fs.image), np.asarray(fs2.image))
    again = extract_features(man, tmp_path / "store3", backbone=tiny, progress=False,
                             cache_dir=tmp_path / "store2.cache", clean_cfg=CleanConfig(long_text="chunk-mean:10"))
    assert again.cached_hits == 3 and (again.text_over, again.text_cut) == (2, 1)   # counts survive the cache


def test_extract_cli_summary_shows_the_counts(ckpt, tmp_path, capsys):
    from sgmft.cli import main

    man = tmp_path / "posts.jsonl"
    man.write_text("\n".join(json.dumps({"id": f"p{i}", "text": t}, ensure_ascii=False)
                             for i, t in enumerate((LONG, SHORT, LONG[:300]))) + "\n", encoding="utf-8")
    argv = ["extract", str(man), "--out", str(tmp_path / "s"), "--backbone", f"chinese-clip:{ckpt}",
            "--precision", "fp32", "--no-progress", "--long-text", "head-tail:10"]
    assert main(argv + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["text_over_limit"], doc["text_cut"]) == (2, 2)
    assert FeatureStore.open(tmp_path / "s").meta["extra"]["clean_config"]["long_text"] == "head-tail:10"
    assert main(argv[:3] + [str(tmp_path / "s2")] + argv[4:]) == 0
    assert "long texts: 2 post(s) longer than the text encoder's context, 2 of them seen only in part" in \
        capsys.readouterr().out
    assert main(argv[:3] + [str(tmp_path / "s3")] + argv[4:-1] + ["middle"]) == 2       # a bad policy: one line


def test_policy_in_fingerprint_and_contract_roundtrip():
    from sgmft.predict.posts import _clean_cfg_from

    default, ht = TextCleaner(CleanConfig()), TextCleaner(CleanConfig(long_text="head-tail"))
    assert default.fingerprint() != ht.fingerprint()
    d = dataclasses.asdict(CleanConfig(long_text="chunk-mean:4"))
    assert _clean_cfg_from(json.loads(json.dumps(d))).long_text == "chunk-mean:4"   # predict applies it
    old = {k: v for k, v in dataclasses.asdict(CleanConfig()).items() if k != "long_text"}
    assert _clean_cfg_from(old).long_text == "truncate"                                # older contracts: truncate
