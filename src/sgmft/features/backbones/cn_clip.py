"""``cn-clip:<file.pt-or-model-name>``: official ``cn_clip`` checkpoints, without cn_clip or torchvision.

The ``.pt`` state dict is converted in memory to the transformers ``ChineseCLIPModel``
layout (:mod:`sgmft.features.backbones.cn_clip_convert`, the mapping of transformers'
conversion script), so the forward is the one ``chinese-clip:`` runs. Texts go through a
``BertTokenizer`` on the checkpoint's vocabulary (cn_clip's ``FullTokenizer`` gives the same
ids: ``[CLS]`` + tokens + ``[SEP]``, zero-padded to 52), images through
:func:`~sgmft.features.backbones.cn_clip_transform.cn_clip_pixels`, cn_clip's own
transform re-implemented with Pillow + numpy (pixel-equal). Features agree with the
official ``cn_clip.clip.model.CLIP`` within 1e-5 (``tests/test_cn_clip.py``).

``ref`` is a path to a ``.pt`` file, or a model name (``ViT-B-16``, ``ViT-L-14``,
``ViT-L-14-336``, ``ViT-H-14``) looked up as cn_clip's file name (``clip_cn_vit-h-14.pt``, ...)
in ``download_root`` (default ``$CN_CLIP_HOME`` or ``~/.cache/clip``, cn_clip's default).
Nothing is downloaded. The vocabulary is ``vocab=`` or the installed ``cn-clip`` wheel's
``vocab.txt`` (found without importing cn_clip). ``sgmft convert-cn-clip CKPT --out DIR``
writes the same model as a ``chinese-clip:``-loadable folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from sgmft.features.backbones.base import BackboneUnavailableError, digest_json
from sgmft.features.backbones.cn_clip_convert import (
    CN_CLIP_FILES, CnClipCheckpointError, hf_model_from_state_dict, image_processor, load_cn_clip_state_dict,
    resolve_vocab,
)
from sgmft.features.backbones.cn_clip_transform import cn_clip_batch, transform_spec
from sgmft.features.backbones.hf_clip import CHINESE_CLIP_MAX_LENGTH, HFClipBackbone


def resolve_cn_clip_file(ref: str, download_root: str | None = None) -> Path:
    """The ``.pt`` file named by ``ref`` (a path, or a cn_clip model name in ``download_root``)."""
    ref = ref or "ViT-H-14"
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if ref in CN_CLIP_FILES:
        root = Path(download_root or os.environ.get("CN_CLIP_HOME") or Path.home() / ".cache" / "clip")
        f = root / CN_CLIP_FILES[ref]
        if f.is_file():
            return f
        raise BackboneUnavailableError(
            f"cn-clip: {ref} is not in {root} (expected {f.name}); sgmft does not download. On a connected machine "
            f"fetch it (e.g. `hf download OFA-Sys/{_hub_name(ref)} {f.name} --local-dir ckpt`), copy it here and "
            f"pass --backbone cn-clip:/path/to/{f.name} (or set CN_CLIP_HOME). The same weights load as "
            "chinese-clip:OFA-Sys/... too (see docs/backbones.md).")
    raise BackboneUnavailableError(
        f"cn-clip: {ref!r} is neither a .pt file nor a cn_clip model name ({', '.join(CN_CLIP_FILES)})")


def _hub_name(ref: str) -> str:
    return {"ViT-B-16": "chinese-clip-vit-base-patch16", "ViT-L-14": "chinese-clip-vit-large-patch14",
            "ViT-L-14-336": "chinese-clip-vit-large-patch14-336px", "ViT-H-14": "chinese-clip-vit-huge-patch14",
            "RN50": "chinese-clip-rn50"}[ref]


def read_vocab(path: Path) -> dict[str, int]:
    """A BERT ``vocab.txt`` -> ``{token: id}`` (one token a line, as transformers' ``load_vocab``)."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.rstrip("\n")] = i
    return vocab


class CnClipBackbone(HFClipBackbone):
    """A cn_clip checkpoint converted in memory; cn_clip's tokenizer ids and image transform."""

    def __init__(self, ref: str, *, device="auto", dtype="auto", batch_size: int = 32,
                 download_root: str | None = None, context_length: int = CHINESE_CLIP_MAX_LENGTH,
                 vocab: str | None = None):
        from transformers import BertTokenizer

        pt = resolve_cn_clip_file(ref, download_root)
        try:
            model, arch = hf_model_from_state_dict(load_cn_clip_state_dict(pt), source=str(pt))
            voc = resolve_vocab(vocab, arch.vocab_size)
        except CnClipCheckpointError as e:
            raise BackboneUnavailableError(f"cn-clip: {e}") from None
        tok = BertTokenizer(vocab=read_vocab(voc), do_lower_case=True, model_max_length=512)
        self._vocab_digest = hashlib.sha256(voc.read_bytes()).hexdigest()
        super().__init__("cn-clip", ref or "ViT-H-14", model=model, tokenizer=tok,
                         processor=image_processor(arch.image_resolution), ckpt_dir=voc.parent,
                         device=device, dtype=dtype, batch_size=batch_size, max_length=context_length)

    def fingerprint_at(self, precision: str) -> str:
        return digest_json({"hf": super().fingerprint_at(precision), "vocab_file": self._vocab_digest,
                            "transform": transform_spec(self.image_size)})

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.from_numpy(cn_clip_batch(list(images), self.image_size))


def load_cn_clip(ref: str, **kw) -> CnClipBackbone:
    return CnClipBackbone(ref, **kw)
