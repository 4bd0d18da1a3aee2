"""cn_clip checkpoints: conversion, the torchvision-free transform and the tokenizer, against the
official code of the ``cn-clip`` 1.6.0 wheel (``pip install --no-deps cn-clip==1.6.0 six``).

``cn_clip.clip`` imports ``torchvision.transforms`` at import time, and torchvision cannot be
installed beside torch 2.13 here. When torchvision does not import, THIS TEST (never the product)
puts a stub ``torchvision.transforms`` in ``sys.modules`` whose ``Resize``/``ToTensor``/``Normalize``
re-implement torchvision's PIL path faithfully (``Resize`` on a PIL image is ``img.resize((w, h),
BICUBIC)``; ``ToTensor`` is ``uint8 HWC -> float32 CHW / 255``; ``Normalize`` is ``(x - mean) / std`` in
float32). cn_clip's own ``image_transform`` then composes them, so the ORDER of its steps and its
constants are cn_clip's, and the model code (``cn_clip.clip.model.CLIP``, its BERT) is cn_clip's, unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(importlib.util.find_spec("cn_clip") is None,
                                reason="needs `pip install --no-deps cn-clip==1.6.0 six` (as .ci/run does)")


def _torchvision_stub() -> dict[str, types.ModuleType]:
    tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")

    class InterpolationMode:
        BICUBIC = Image.BICUBIC

    class Compose:
        def __init__(self, fns):
            self.fns = fns

        def __call__(self, x):
            for f in self.fns:
                x = f(x)
            return x

    class Resize:
        def __init__(self, size, interpolation=Image.BILINEAR):
            self.size, self.interpolation = size, interpolation

        def __call__(self, img):  # torchvision.transforms.functional_pil.resize for a (h, w) size
            h, w = self.size
            return img.resize((w, h), self.interpolation)

    class ToTensor:
        def __call__(self, pic):  # torchvision.transforms.functional.to_tensor for an RGB uint8 image
            a = torch.from_numpy(np.array(pic, np.uint8, copy=True))
            return a.view(pic.size[1], pic.size[0], 3).permute(2, 0, 1).contiguous().to(torch.float32).div(255)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, t):  # torchvision.transforms.functional.normalize
            mean = torch.as_tensor(self.mean, dtype=t.dtype)[:, None, None]
            std = torch.as_tensor(self.std, dtype=t.dtype)[:, None, None]
            return t.clone().sub_(mean).div_(std)

    for c in (InterpolationMode, Compose, Resize, ToTensor, Normalize):
        setattr(tr, c.__name__, c)
    tv.transforms = tr
    return {"torchvision": tv, "torchvision.transforms": tr}


@pytest.fixture(scope="module")
def cnc():
    """The official ``cn_clip.clip`` package. The torchvision stub (when needed) is in ``sys.modules``
    only while cn_clip imports: cn_clip keeps its references, nothing else sees it."""
    import transformers  # noqa: F401  (imported first: it probes for torchvision itself)

    try:
        import torchvision.transforms  # noqa: F401
        stub = {}
    except Exception:
        stub = _torchvision_stub()
    sys.modules.update(stub)
    try:
        import cn_clip.clip as cnc
        import cn_clip.clip.model  # noqa: F401
    finally:
        for k in stub:
            sys.modules.pop(k, None)
    yield cnc
    for k in [k for k in sys.modules if k.startswith("cn_clip")]:
        del sys.modules[k]


SMALL = dict(embed_dim=48, image_resolution=64, vision_layers=2, vision_width=128, vision_patch_size=16,
             text_hidden_size=128, text_num_hidden_layers=2, text_num_attention_heads=2,
             text_intermediate_size=256)
VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
               text_hidden_size=768, text_num_hidden_layers=12, text_num_attention_heads=12,
               text_intermediate_size=3072)


def _official(cnc, shape: dict, seed: int):
    info = dict(vocab_size=21128, text_attention_probs_dropout_prob=0.1, text_hidden_act="gelu",
                text_hidden_dropout_prob=0.1, text_initializer_range=0.02, text_max_position_embeddings=512,
                text_type_vocab_size=2, **shape)
    torch.manual_seed(seed)
    model = cnc.model.CLIP(**info).float().eval()
    with torch.no_grad():  # cn_clip initialises LayerNorms to identity and biases to 0: perturb them too
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return model


def _save_pt(model, path: Path, half: bool = False) -> Path:
    sd = {"module." + k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "step": 1, "name": "test", "state_dict": sd}, path)
    return path


TEXTS = ["今天在健身房跑步，好累！", "电影院 IMAX 太震撼了", "Home sweet home 家", "学校" * 40, ""]


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (37 + 11 * i, 53 + 7 * i, 3), dtype=np.uint8)) for i in range(n)]


def _unit(x):
    x = x.detach().double() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).numpy()


def _parity(cnc, shape, seed, tmp_path):
    from sgmft.cli import main
    from sgmft.features.backbones import load_backbone

    off = _official(cnc, shape, seed)
    pt = _save_pt(off, tmp_path / "clip_cn_test.pt")
    folder = tmp_path / "converted"
    assert main(["convert-cn-clip", str(pt), "--out", str(folder)]) == 0        # sgmft convert-cn-clip
    hf = load_backbone(f"chinese-clip:{folder}", device="cpu", dtype="float32")
    cc = load_backbone(f"cn-clip:{pt}", device="cpu", dtype="float32")
    texts = [t for t in TEXTS if t]
    ids = cnc.tokenize(texts, context_length=52)
    assert torch.equal(cc.tokenize(texts)["input_ids"], ids)          # cn_clip's FullTokenizer ids
    assert torch.equal(hf.tokenize(texts)["input_ids"], ids)
    tf = cnc.image_transform(shape["image_resolution"])
    pix = torch.stack([tf(im) for im in _images()])
    assert torch.equal(cc.preprocess_images(_images()), pix)           # pixel-equal
    with torch.no_grad():
        t_off, i_off = _unit(off.encode_text(ids)), _unit(off.encode_image(pix))
    for bb in (hf, cc):
        np.testing.assert_allclose(bb.forward_text(bb.tokenize(texts)), t_off, atol=1e-5, rtol=0)
        np.testing.assert_allclose(bb.forward_images(pix), i_off, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cc.encode_images(_images()), i_off, atol=1e-5, rtol=0)
    assert hf.dim == cc.dim == shape["embed_dim"] and cc.image_size == shape["image_resolution"]
    return off, folder


def test_parity_small_random_weights(cnc, tmp_path):
    _, folder = _parity(cnc, SMALL, 0, tmp_path)
    src = json.loads((folder / "cn_clip_source.json").read_text())
    assert src["arch"]["vision_heads"] == 2 and len(src["sha256"]) == 64


@pytest.mark.slow
def test_parity_vit_b16_random_weights(cnc, tmp_path):
    _parity(cnc, VIT_B16, 1, tmp_path)


def test_fp16_checkpoint_and_logit_scale(cnc, tmp_path):
    from sgmft.features.backbones.cn_clip_convert import hf_model_from_state_dict, load_cn_clip_state_dict

    off = _official(cnc, SMALL, 2)
    sd = load_cn_clip_state_dict(_save_pt(off, tmp_path / "h.pt", half=True))
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    model, arch = hf_model_from_state_dict(sd)
    assert float(model.logit_scale.detach()) == pytest.approx(float(off.logit_scale.detach().half().float()))
    off.load_state_dict({k: v for k, v in sd.items()})                # the same fp16-rounded weights
    ids = cnc.tokenize(TEXTS[:3])
    with torch.no_grad():
        ref = _unit(off.encode_text(ids))
        got = _unit(model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_every_vit_architecture_of_the_wheel(cnc):
    """Every vision x text config of cn_clip/clip/model_configs: shapes read back as cn_clip built them."""
    from sgmft.features.backbones.cn_clip_convert import CnClipCheckpointError, hf_config, infer_arch

    cfg_dir = Path(cnc.__file__).parent / "model_configs"
    vision = {p.stem: json.loads(p.read_text()) for p in cfg_dir.glob("*.json") if "vision_layers" in p.read_text()}
    text = {p.stem: json.loads(p.read_text()) for p in cfg_dir.glob("*.json") if "text_hidden_size" in p.read_text()}
    assert {"ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50"} <= set(vision)
    assert {"RBT3-chinese", "RoBERTa-wwm-ext-base-chinese", "RoBERTa-wwm-ext-large-chinese"} <= set(text)
    for vn, v in vision.items():
        for tn, t in text.items():
            info = {**v, **t}
            if isinstance(info["vision_layers"], str):
                info["vision_layers"] = json.loads(info["vision_layers"])
            with torch.device("meta"):
                m = cnc.model.CLIP(**info)
            if vn == "RN50":
                with pytest.raises(CnClipCheckpointError, match="RN50"):
                    infer_arch(m.state_dict())
                continue
            a = infer_arch(m.state_dict())
            assert a.vision_heads == m.visual.transformer.resblocks[0].attn.num_heads, vn
            assert a.text_num_attention_heads == t["text_num_attention_heads"], tn
            assert (a.embed_dim, a.image_resolution, a.vision_width, a.vision_layers, a.vision_patch_size) == (
                v["embed_dim"], v["image_resolution"], v["vision_width"], v["vision_layers"], v["vision_patch_size"])
            assert (a.text_hidden_size, a.text_num_hidden_layers, a.text_intermediate_size, a.vocab_size) == (
                t["text_hidden_size"], t["text_num_hidden_layers"], t["text_intermediate_size"], t["vocab_size"])
            hf_config(a)


def test_transform_pixel_equal_on_odd_images(cnc):
    from sgmft.features.backbones.cn_clip_transform import cn_clip_batch

    rng = np.random.default_rng(5)
    ims = [Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)),
           Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)),
           Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)),
           Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)),            # greyscale
           Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8), "RGBA")]
    for side in (224, 336, 64):
        tf = cnc.image_transform(side)
        ref = torch.stack([tf(im) for im in ims]).numpy()
        assert np.array_equal(cn_clip_batch(ims, side), ref)


def test_bad_checkpoints_are_named(tmp_path):
    from sgmft.features.backbones import BackboneUnavailableError, load_backbone
    from sgmft.features.backbones.cn_clip_convert import CnClipCheckpointError, load_cn_clip_state_dict

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CnClipCheckpointError, match="bad.pt"):
        load_cn_clip_state_dict(bad)
    from sgmft.cli import main

    assert main(["convert-cn-clip", str(bad), "--out", str(tmp_path / "out")]) == 2      # one-line user error
    torch.save({"state_dict": {"foo": torch.zeros(2)}}, tmp_path / "foo.pt")
    with pytest.raises(BackboneUnavailableError, match="missing visual.conv1.weight"):
        load_backbone(f"cn-clip:{tmp_path / 'foo.pt'}", device="cpu")
    with pytest.raises(BackboneUnavailableError, match="clip_cn_vit-h-14.pt"):
        load_backbone("cn-clip:ViT-H-14", device="cpu", download_root=str(tmp_path))
