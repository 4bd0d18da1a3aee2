"""Frozen text/image encoders behind one interface (:class:`Backbone`).

``load_backbone("chinese-clip:/path/or/hub-id")`` is the entry point; the registry
``BACKBONES`` maps the part before the first ``:`` to a loader. Built in:

* ``chinese-clip`` -- Hugging Face ``ChineseCLIPModel`` (default ``OFA-Sys/chinese-clip-vit-huge-patch14``);
* ``hf-clip``      -- other transformers CLIP-family models (``CLIPModel``, ``SiglipModel``, ...);
* ``cn-clip``      -- an official ``cn_clip`` ``.pt`` checkpoint, converted to the transformers
  layout in memory (no cn_clip package, no torchvision; ``cn_clip_convert.py``);
* ``cnn-wordemb``  -- Table 2's Baseline: frozen EfficientNet-Lite0 image features + mean of
  fixed hashed word embeddings (the ``[cnn]`` extra; ``ref`` may be empty or
  ``efficientnet-lite0``).
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

from typing import Callable

from sgmft.features.backbones.base import Backbone, BackboneUnavailableError
from sgmft.registry import Registry

BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")


@BACKBONES.register("chinese-clip")
def _chinese_clip(ref: str, **kw) -> Backbone:
    from sgmft.features.backbones.hf_clip import load_chinese_clip

    return load_chinese_clip(ref, **kw)


@BACKBONES.register("hf-clip")
def _hf_clip(ref: str, **kw) -> Backbone:
    from sgmft.features.backbones.hf_clip import load_hf_clip

    return load_hf_clip(ref, **kw)


@BACKBONES.register("cn-clip")
def _cn_clip(ref: str, **kw) -> Backbone:
    from sgmft.features.backbones.cn_clip import load_cn_clip

    return load_cn_clip(ref, **kw)


@BACKBONES.register("cnn-wordemb")
def _cnn_wordemb(ref: str, *, dtype: str = "auto", **kw) -> Backbone:
    from sgmft.features.backbones.cnn_wordemb import CNN_NAME, CNNWordEmbBackbone

    if ref not in ("", CNN_NAME):
        raise InputError(f"backbone cnn-wordemb: unknown CNN {ref!r}; the only one is {CNN_NAME!r}")
    from sgmft.features.backbones.base import canonical_precision

    if canonical_precision(dtype) not in ("auto", "float32"):
        raise InputError(f"backbone cnn-wordemb runs in float32 only, got dtype={dtype!r}")
    return CNNWordEmbBackbone(**kw)


def parse_spec(spec: str) -> tuple[str, str]:
    """``"name:ref"`` -> ``(name, ref)``; a bare ``"name"`` gives ``ref = ""`` (its default)."""
    name, sep, ref = spec.partition(":")
    if name not in BACKBONES:
        BACKBONES.get(name)  # raises KeyError listing the known names
    return name, ref


def load_backbone(spec: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 32,
                  **kwargs) -> Backbone:
    """Load a backbone from ``"<name>:<hub-id-or-dir>"``, e.g. ``"chinese-clip:/models/cc-vit-h"``.

    ``device="auto"`` picks this process's GPU, else CPU; ``dtype="auto"`` means bf16/fp16
    autocast on CUDA; on CPU bf16 with AMX, int8 with VNNI or AVX2 and no AMX, else fp32
    (:mod:`sgmft.features.backbones.precision`). Raises :class:`BackboneUnavailableError` (with download
    instructions) when the weights are not available offline. On CPU, glibc is then told to keep
    freed activation blocks for the next batch (:mod:`sgmft.features.backbones.allocator`).
    """
    name, ref = parse_spec(spec)
    bb = BACKBONES.get(name)(ref, device=device, dtype=dtype, batch_size=batch_size, **kwargs)
    if str(getattr(bb, "device", "cpu")).startswith("cpu"):
        from sgmft.features.backbones.allocator import keep_freed_memory

        keep_freed_memory()
    return bb


__all__ = ["BACKBONES", "Backbone", "BackboneUnavailableError", "load_backbone", "parse_spec"]
