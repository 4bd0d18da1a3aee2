"""cn_clip's image transform without torchvision (numpy + Pillow only).

The official ``cn_clip.clip.utils.image_transform(image_size)`` is::

    Compose([Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
             _convert_to_rgb, ToTensor(),
             Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])

On a PIL image torchvision's ``Resize`` is ``img.resize((w, h), Image.BICUBIC)`` (a squash
resize, no centre crop), ``ToTensor`` divides the uint8 HWC array by 255 in float32 and
moves channels first, and ``Normalize`` subtracts the mean and divides by the std in float32.
:func:`cn_clip_pixels` performs the same operations in the same order, so the pixels are
equal bit for bit (``tests/test_cn_clip.py`` pins it against cn_clip's own ``image_transform``).

This file imports nothing from sgmft, torch or transformers: the torch-free ONNX runner
(``sgmft/runner/onnx_runner.py``) ships a copy of it beside itself.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def cn_clip_pixels(image: Any, image_size: int = 224) -> np.ndarray:
    """One PIL image -> float32 ``(3, image_size, image_size)``, exactly as cn_clip's transform."""
    im = image.resize((int(image_size), int(image_size)), Image.BICUBIC)   # Resize((s, s), BICUBIC)
    im = im.convert("RGB")                                                  # _convert_to_rgb
    x = np.asarray(im, dtype=np.uint8).astype(np.float32) / np.float32(255)  # ToTensor ...
    x = np.ascontiguousarray(x.transpose(2, 0, 1))                         # ... HWC -> CHW
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    return (x - mean) / std                                                 # Normalize


def cn_clip_batch(images: Sequence[Any], image_size: int = 224) -> np.ndarray:
    """PIL images -> float32 ``(B, 3, image_size, image_size)``."""
    if not images:
        return np.zeros((0, 3, image_size, image_size), np.float32)
    return np.stack([cn_clip_pixels(im, image_size) for im in images])


def transform_spec(image_size: int) -> dict:
    """What the transform does, for fingerprints and export metadata."""
    return {"transform": "cn_clip.image_transform", "resize": [image_size, image_size],
            "resample": "bicubic", "center_crop": False, "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
