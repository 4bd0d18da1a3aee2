"""``cn-clip:<model-name-or-.pt>``: checkpoints of the official ``cn_clip`` package.

Only usable where ``cn_clip`` imports (``pip install cn_clip``; it needs torchvision).
The same weights are on the Hugging Face hub as ``OFA-Sys/chinese-clip-vit-*`` and load
through ``chinese-clip:`` without torchvision, which is the recommended route.

``ref`` is a model name (``ViT-B-16``, ``ViT-L-14``, ``ViT-L-14-336``, ``ViT-H-14``,
``RN50``), looked up in ``download_root`` (default ``$CN_CLIP_HOME`` or
``~/.cache/cn_clip``) and downloaded there by cn_clip if missing and online. Untested in
sgmft's CI (cn_clip is not installed there).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from sgmft.features.backbones.base import Backbone, BackboneUnavailableError, digest_json, hash_state_dict
from sgmft.features.backbones.base import apply_precision, precision_recipe, resolve_device, resolve_precision

_DIMS = {"RN50": 1024, "ViT-B-16": 512, "ViT-L-14": 768, "ViT-L-14-336": 768, "ViT-H-14": 1024}


class CnClipBackbone(Backbone):
    name = "cn-clip"

    def __init__(self, ref: str, *, device="auto", dtype="auto", batch_size: int = 32,
                 download_root: str | None = None, context_length: int = 52):
        try:
            import cn_clip.clip as cnc
        except Exception as e:  # ImportError, or torchvision missing inside cn_clip
            raise BackboneUnavailableError(
                f"cn-clip: the cn_clip package does not import here ({type(e).__name__}: {e}). "
                "Install it with `pip install cn_clip` (it requires torchvision), or use the same "
                "weights through transformers instead: --backbone chinese-clip:OFA-Sys/chinese-clip-vit-huge-patch14 "
                "(see docs/backbones.md).") from None
        self._cnc = cnc
        ref = ref or "ViT-H-14"
        root = download_root or os.environ.get("CN_CLIP_HOME") or str(Path.home() / ".cache" / "cn_clip")
        self.spec, self.batch_size, self.context_length = f"cn-clip:{ref}", int(batch_size), context_length
        self.device = resolve_device(device)
        self.precision = resolve_precision(dtype, self.device)
        try:
            model, self._preprocess = cnc.load_from_name(ref, device="cpu", download_root=root)
        except Exception as e:
            raise BackboneUnavailableError(
                f"cn-clip: could not load {ref!r} from {root} ({type(e).__name__}: {e}). On a connected "
                "machine run\n  python -c \"import cn_clip.clip as c; "
                f"c.load_from_name('{ref}', download_root='ckpt')\"\n"
                "and copy ckpt/ here (set CN_CLIP_HOME to it).") from None
        model = model.float().eval().requires_grad_(False)
        self._weights_digest = hash_state_dict(model)
        self.model = apply_precision(model.to(self.device), self.precision)
        self._recipe = precision_recipe(self.precision)  # as applied now (the int8 engine is chosen here)
        self.image_size = int(getattr(model.visual, "input_resolution", 224))
        self.dim = _DIMS.get(ref) or int(self.encode_text(["维"]).shape[1])
        self._fp: str | None = None

    def fingerprint(self) -> str:
        if self._fp is None:
            ident = {"backbone": self.name, "weights": self._weights_digest,
                     "context_length": self.context_length, "image_size": self.image_size,
                     "preprocess": repr(self._preprocess), "precision": self.precision,
                     "vocab": hashlib.sha256(repr(sorted(self._cnc._tokenizer.vocab.items())).encode()).hexdigest()}
            if self._recipe is not None:  # bf16/int8 recipe; fp32 fingerprint unchanged
                ident["precision_recipe"] = self._recipe
            self._fp = digest_json(ident)
        return self._fp

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"text": self._cnc.tokenize(list(texts), context_length=self.context_length)}

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.stack([self._preprocess(im) for im in images]).float()

    def _text_embed(self, tokens):
        return self.model.encode_text(tokens["text"])

    def _image_embed(self, pixel_values):
        return self.model.encode_image(pixel_values)


def load_cn_clip(ref: str, **kw) -> CnClipBackbone:
    return CnClipBackbone(ref, **kw)
