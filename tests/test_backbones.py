"""Backbones: tiny random checkpoints loaded offline through the same path as real weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from sgmft.features.backbones import BACKBONES, BackboneUnavailableError, load_backbone
from sgmft.features.backbones.tiny import build_tiny_chinese_clip, build_tiny_clip


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_chinese_clip(tmp_path_factory.mktemp("tinycc") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    # fp32 explicitly: dtype="auto" may pick bf16 on a CPU with AMX (docs/scale.md)
    return load_backbone(f"chinese-clip:{tiny_dir}", batch_size=4, dtype="float32")


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_registry_names():
    assert {"chinese-clip", "hf-clip", "cn-clip"} <= set(BACKBONES.names())
    with pytest.raises(KeyError, match="known"):
        load_backbone("no-such-backbone:x")


def test_tiny_checkpoint_layout(tiny_dir):
    for f in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json", "preprocessor_config.json"):
        assert (tiny_dir / f).is_file(), f
    assert "RANDOM" in (tiny_dir / "README.md").read_text()


def test_encode_shapes_and_normalisation(tiny):
    assert (tiny.name, tiny.dim, tiny.image_size, tiny.precision) == ("chinese-clip", 32, 32, "float32")
    t = tiny.encode_text(["今天 家里 吃饭", "健身房 跑步", "电影院", "学校 上课", "公司 加班"])
    i = tiny.encode_images(_images(6))
    assert t.shape == (5, 32) and i.shape == (6, 32)
    assert t.dtype == np.float32 and i.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(i, axis=1), 1, atol=1e-5)
    assert not np.allclose(t[0], t[1])
    assert tiny.encode_text([]).shape == (0, 32)
    # batched == one at a time (up to float rounding)
    one = np.concatenate([tiny.encode_images([im]) for im in _images(6)])
    np.testing.assert_allclose(one, i, atol=1e-5)


def test_tokens_fixed_length_and_no_unk(tiny):
    tok = tiny.tokenize(["我在家里吃饭", "去"])
    assert tok["input_ids"].shape == (2, 52)
    assert (tok["input_ids"] != tiny.tokenizer.unk_token_id).all()


def test_preprocess_and_forward_split(tiny):
    x = tiny.preprocess_images(_images(3))
    assert tuple(x.shape) == (3, 3, 32, 32)
    np.testing.assert_allclose(tiny.forward_images(x), tiny.encode_images(_images(3)), atol=1e-6)


def test_fingerprint_stable_and_weight_sensitive(tiny, tiny_dir, tmp_path):
    fp = tiny.fingerprint()
    assert len(fp) == 64
    moved = shutil.copytree(tiny_dir, tmp_path / "elsewhere")  # identity is content, not path
    assert load_backbone(f"chinese-clip:{moved}", dtype="float32").fingerprint() == fp
    other = build_tiny_chinese_clip(tmp_path / "seed1", seed=1)
    assert load_backbone(f"chinese-clip:{other}", dtype="float32").fingerprint() != fp
    assert load_backbone(f"chinese-clip:{tiny_dir}", dtype="bfloat16").fingerprint() != fp


def test_bf16_autocast_on_cpu_close_to_fp32(tiny, tiny_dir):
    bb = load_backbone(f"chinese-clip:{tiny_dir}", dtype="bfloat16")
    a, b = bb.encode_images(_images(2)), tiny.encode_images(_images(2))
    assert a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.abs(a - b).max() < 0.1


def test_missing_local_dir_explains_download(tmp_path):
    with pytest.raises(BackboneUnavailableError) as ei:
        load_backbone(f"chinese-clip:{tmp_path / 'nope' / 'cc-vit-h'}")
    msg = str(ei.value)
    assert "does not exist" in msg and "hf download" in msg and "--local-dir" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneUnavailableError, match="config.json"):
        load_backbone(f"chinese-clip:{tmp_path / 'empty'}")


def test_hub_id_offline_explains_download():
    with pytest.raises(BackboneUnavailableError) as ei:
        load_backbone("chinese-clip:OFA-Sys/chinese-clip-vit-huge-patch14-not-cached")
    msg = str(ei.value)
    assert "offline" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download OFA-Sys/chinese-clip-vit-huge-patch14-not-cached --local-dir" in msg
    assert "huggingface-cli download" in msg and "--backbone chinese-clip:/path/to/" in msg


def test_cn_clip_missing_checkpoint_is_actionable(tmp_path, monkeypatch):
    """cn-clip: needs neither the cn_clip package nor torchvision, only the .pt file (tests/test_cn_clip.py)."""
    monkeypatch.setenv("CN_CLIP_HOME", str(tmp_path))
    with pytest.raises(BackboneUnavailableError, match="clip_cn_vit-h-14.pt") as ei:
        load_backbone("cn-clip:ViT-H-14")
    assert "does not download" in str(ei.value) and "hf download OFA-Sys/chinese-clip-vit-huge-patch14" in str(ei.value)
    with pytest.raises(BackboneUnavailableError, match="neither a .pt file"):
        load_backbone(f"cn-clip:{tmp_path / 'nope.pt'}")


def test_hf_clip_path(tmp_path):
    d = build_tiny_clip(tmp_path / "clip")
    bb = load_backbone(f"hf-clip:{d}")
    assert bb.dim == 16 and bb.max_length == 77
    t, i = bb.encode_text(["a photo of a cat", "a dog"]), bb.encode_images(_images(2))
    assert t.shape == (2, 16) and i.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)


# --------------------------------------------------------------------------- cnn-wordemb (Table 2 Baseline)
def test_cnn_wordemb_backbone_offline():
    from PIL import Image

    from sgmft.features.backbones.cnn_wordemb import CNNWordEmbBackbone, cnn_available

    ok, why = cnn_available()
    if not ok:
        pytest.skip(why)
    bb = CNNWordEmbBackbone(device="cpu", batch_size=4)
    texts = ["电影 爆米花", "电影", "", "健身 跑步 健身"]
    emb = bb.encode_text(texts)
    assert emb.shape == (4, 1280) and np.isfinite(emb).all()
    # a token's vector does not depend on the batch, and a text is the mean of its tokens'
    np.testing.assert_allclose(bb.encode_text(["电影"])[0], emb[1], rtol=1e-6)
    mean = (bb.word_vector(_b(bb, "电影")) + bb.word_vector(_b(bb, "爆米花"))) / 2
    np.testing.assert_allclose(emb[0], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    assert np.allclose(emb[2], 0)                                   # empty text: no tokens
    ims = [Image.new("RGB", (40, 30), c) for c in ((200, 30, 30), (30, 30, 200))]
    iv = bb.encode_images(ims)
    assert iv.shape == (2, 1280) and np.isfinite(iv).all()
    assert not np.allclose(iv[0], iv[1])
    np.testing.assert_allclose(np.linalg.norm(iv, axis=1), 1, rtol=1e-5)
    assert bb.fingerprint() == CNNWordEmbBackbone(device="cpu", batch_size=2).fingerprint()
    # a registered backbone: the same spec and fingerprint through load_backbone
    reg = load_backbone("cnn-wordemb", device="cpu", batch_size=2)
    assert reg.spec == bb.spec == "cnn-wordemb:efficientnet-lite0" and reg.fingerprint() == bb.fingerprint()
    with pytest.raises(ValueError, match="unknown CNN"):
        load_backbone("cnn-wordemb:resnet50", device="cpu")


def test_cnn_wordemb_store_through_extract_features(tmp_path):
    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.features import FeatureStore
    from sgmft.features.backbones.cnn_wordemb import cnn_available
    from sgmft.features.extract import extract_features

    ok, why = cnn_available()
    if not ok:
        pytest.skip(why)
    man = generate_simposts(tmp_path / "posts", SimPostsConfig(num_posts=6, seed=3))
    res = extract_features(man, tmp_path / "store", backbone="cnn-wordemb", image_choice="mean",
                           batch_size=4, device="cpu", progress=False)
    fs = FeatureStore.open(res.store_path)
    assert len(fs) == 6 and fs.dim == 1280 and fs.backbone == "cnn-wordemb:efficientnet-lite0"
    assert fs.meta["extra"]["image_choice"] == "mean" and np.asarray(fs.image_mask).all()


def _b(bb, tok):
    return int(bb.tokenize([tok])["ids"][0, 0])


def test_sampled_weights_digest_independent_of_torch_threads():
    """Large models hash a sample plus each tensor's sum; that sum must not depend on the torch
    thread count (torch's parallel reduction does), or a replica with other --threads than the
    driver (or a predict run with other threads than the extraction) sees another fingerprint."""
    import torch

    from sgmft.features.backbones.base import hash_state_dict

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.Linear(3072, 768))
    old = torch.get_num_threads()
    try:
        digests = set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            digests.add(hash_state_dict(m, full_limit_bytes=0))  # 0: the sampled path
    finally:
        torch.set_num_threads(old)
    assert len(digests) == 1
    with torch.no_grad():
        m[1].weight[5, 7] += 1e-3                                     # a weight outside the sample
    assert hash_state_dict(m, full_limit_bytes=0) not in digests


def test_quick_gelu_folded_into_the_weights_is_the_same_function(tiny, tiny_dir):
    """fold_quick_gelu: every vision MLP runs SiLU on rescaled weights, and the image features equal
    the untouched transformers model's (fp32, within float rounding)."""
    import torch
    from transformers import ChineseCLIPModel

    from sgmft.features.backbones.hf_clip import fold_quick_gelu

    ref = ChineseCLIPModel.from_pretrained(str(tiny_dir)).eval()
    acts = {type(m.activation_fn).__name__ for m in tiny.model.modules() if hasattr(m, "fc1")}
    assert acts == {"SiLU"}
    pix = tiny.preprocess_images(_images(3))
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=pix).pooler_output
    want = torch.nn.functional.normalize(want, dim=-1).numpy()
    np.testing.assert_allclose(tiny.forward_images(pix), want, atol=2e-6, rtol=0)
    assert fold_quick_gelu(tiny.model) == 0          # nothing left to fold: a second call is a no-op
    n_layers = ref.config.vision_config.num_hidden_layers
    assert fold_quick_gelu(ref) == n_layers
