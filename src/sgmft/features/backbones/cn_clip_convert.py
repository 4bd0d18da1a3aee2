"""Official ``cn_clip`` checkpoints -> the transformers ``ChineseCLIPModel`` layout, without cn_clip.

A ``cn_clip`` ``.pt`` file (``{"state_dict": {...}, ...}``, keys often prefixed ``module.``,
weights often fp16) holds an OpenAI-style ``VisualTransformer`` (``visual.*``), a BERT
(``bert.*``), ``text_projection`` (``hidden x D``) and ``logit_scale``. The mapping is the one
of transformers' ``convert_chinese_clip_original_pytorch_to_hf.py``:

* ``visual.conv1`` -> ``vision_model.embeddings.patch_embedding``; ``class_embedding``,
  ``positional_embedding`` -> ``embeddings.class_embedding`` / ``position_embedding.weight``;
  ``ln_pre``/``ln_post`` -> ``pre_layrnorm``/``post_layernorm``;
* each ``resblocks.i``: ``attn.in_proj_{weight,bias}`` split in three -> ``self_attn.{q,k,v}_proj``,
  ``attn.out_proj`` -> ``self_attn.out_proj``, ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``,
  ``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``mlp.fc2`` (QuickGELU = ``quick_gelu``);
* ``visual.proj`` (``width x D``) -> ``visual_projection.weight`` (its transpose);
  ``text_projection`` (``hidden x D``) -> ``text_projection.weight`` (its transpose);
* ``bert.*`` -> ``text_model.*`` (same BERT names; ``bert.pooler`` is unused and dropped).

The architecture is read from the tensor shapes and matched against cn_clip's
``model_configs`` (every ViT one: ``ViT-B-16``, ``ViT-B-32``, ``ViT-L-14``, ``ViT-L-14-336``,
``ViT-H-14`` with the ``RoBERTa-wwm-ext-base``/``-large`` and ``RBT3`` text towers). ``RN50``
(a ModifiedResNet) has no ``ChineseCLIPModel`` layout and is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch

from sgmft.errors import InputError

# cn_clip/clip/model_configs (cn-clip 1.6.0): vision width -> head width (ViT-H uses 80, the rest 64)
_VISION_HEAD_WIDTH = {1280: 80}
_TEXT_HEAD_WIDTH = 64   # RoBERTa-wwm-ext-base (768/12), -large (1024/16), RBT3 (768/12)
# The official checkpoints: model name -> (file name in cn_clip's download dir, input side)
CN_CLIP_FILES = {"ViT-B-16": "clip_cn_vit-b-16.pt", "ViT-L-14": "clip_cn_vit-l-14.pt",
                 "ViT-L-14-336": "clip_cn_vit-l-14-336.pt", "ViT-H-14": "clip_cn_vit-h-14.pt",
                 "RN50": "clip_cn_rn50.pt"}


class CnClipCheckpointError(InputError):
    """A ``.pt`` file that is not a convertible cn_clip checkpoint (the message says why)."""


@dataclass(frozen=True)
class CnClipArch:
    """The shapes of a cn_clip ViT checkpoint (cn_clip's ``CLIP(**model_info)`` arguments)."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    vision_heads: int
    vocab_size: int
    text_hidden_size: int
    text_num_hidden_layers: int
    text_num_attention_heads: int
    text_intermediate_size: int
    text_max_position_embeddings: int
    text_type_vocab_size: int


def load_cn_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The float32 state dict of a cn_clip ``.pt`` (``module.`` prefix removed, pooler dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CnClipCheckpointError(f"cn_clip checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CnClipCheckpointError(f"cn_clip checkpoint {path}: cannot be read by torch.load "
                                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CnClipCheckpointError(f"cn_clip checkpoint {path}: expected a dict with a 'state_dict' of tensors")
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if "bert.pooler" not in k:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def infer_arch(sd: Mapping[str, torch.Tensor], *, source: str = "state dict") -> CnClipArch:
    """The architecture of a cn_clip state dict, from its tensor shapes."""
    if any(k.startswith("visual.layer1.") for k in sd):
        raise CnClipCheckpointError(
            f"{source}: an RN50 (ModifiedResNet) cn_clip checkpoint; transformers' ChineseCLIPModel has only a "
            "ViT image tower, so RN50 cannot be converted (use a ViT-B-16/L-14/L-14-336/H-14 checkpoint)")
    need = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
            "bert.embeddings.word_embeddings.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CnClipCheckpointError(f"{source}: not a cn_clip CLIP state dict (missing {', '.join(missing)})")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    hidden = sd["bert.embeddings.word_embeddings.weight"].shape[1]
    return CnClipArch(
        embed_dim=int(sd["visual.proj"].shape[1]), image_resolution=int(grid * patch),
        vision_layers=_count(sd, "visual.transformer.resblocks."), vision_width=int(width),
        vision_patch_size=int(patch), vision_heads=int(width) // _VISION_HEAD_WIDTH.get(int(width), 64),
        vocab_size=int(sd["bert.embeddings.word_embeddings.weight"].shape[0]), text_hidden_size=int(hidden),
        text_num_hidden_layers=_count(sd, "bert.encoder.layer."),
        text_num_attention_heads=int(hidden) // _TEXT_HEAD_WIDTH,
        text_intermediate_size=int(sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        text_max_position_embeddings=int(sd["bert.embeddings.position_embeddings.weight"].shape[0]),
        text_type_vocab_size=int(sd["bert.embeddings.token_type_embeddings.weight"].shape[0]))


def _count(sd, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def hf_config(arch: CnClipArch):
    """The ``ChineseCLIPConfig`` of ``arch`` (QuickGELU + eps 1e-5 in the ViT, GELU + 1e-12 in BERT)."""
    from transformers import ChineseCLIPConfig

    return ChineseCLIPConfig(
        text_config=dict(vocab_size=arch.vocab_size, hidden_size=arch.text_hidden_size,
                         num_hidden_layers=arch.text_num_hidden_layers,
                         num_attention_heads=arch.text_num_attention_heads,
                         intermediate_size=arch.text_intermediate_size,
                         max_position_embeddings=arch.text_max_position_embeddings,
                         type_vocab_size=arch.text_type_vocab_size, hidden_act="gelu", layer_norm_eps=1e-12),
        vision_config=dict(hidden_size=arch.vision_width, num_hidden_layers=arch.vision_layers,
                           num_attention_heads=arch.vision_heads, intermediate_size=4 * arch.vision_width,
                           image_size=arch.image_resolution, patch_size=arch.vision_patch_size,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5),
        projection_dim=arch.embed_dim)


_BLOCK = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cn_clip keys -> ``ChineseCLIPModel`` keys (see the module docstring)."""
    out: dict[str, torch.Tensor] = {"logit_scale": sd["logit_scale"],
                                    "text_projection.weight": sd["text_projection"].t().contiguous(),
                                    "visual_projection.weight": sd["visual.proj"].t().contiguous()}
    v = "vision_model."
    fixed = {"visual.conv1.weight": v + "embeddings.patch_embedding.weight",
             "visual.class_embedding": v + "embeddings.class_embedding",
             "visual.positional_embedding": v + "embeddings.position_embedding.weight",
             "visual.ln_pre.weight": v + "pre_layrnorm.weight", "visual.ln_pre.bias": v + "pre_layrnorm.bias",
             "visual.ln_post.weight": v + "post_layernorm.weight", "visual.ln_post.bias": v + "post_layernorm.bias"}
    for k, t in sd.items():
        if k in fixed:
            out[fixed[k]] = t
        elif k.startswith("bert."):
            out["text_model." + k[len("bert."):]] = t
        elif k.startswith("visual.transformer.resblocks."):
            i, rest = k[len("visual.transformer.resblocks."):].split(".", 1)
            dst = f"{v}encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]                       # weight | bias
                for name, part in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{dst}self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                mod, kind = rest.rsplit(".", 1)
                out[dst + _BLOCK[mod] + "." + kind] = t
        elif k not in ("logit_scale", "text_projection", "visual.proj"):
            raise CnClipCheckpointError(f"unexpected cn_clip key {k!r}")
    return out


def hf_model_from_state_dict(sd: Mapping[str, torch.Tensor], *, source: str = "state dict"):
    """A float32 ``ChineseCLIPModel`` (eval mode) holding the weights of a cn_clip state dict."""
    from transformers import ChineseCLIPModel

    arch = infer_arch(sd, source=source)
    model = ChineseCLIPModel(hf_config(arch))
    missing, unexpected = model.load_state_dict(convert_state_dict(sd), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CnClipCheckpointError(f"{source}: conversion left missing={missing[:5]} unexpected={unexpected[:5]}")
    return model.float().eval(), arch


def wheel_vocab() -> Path | None:
    """``vocab.txt`` of an installed cn_clip wheel, found without importing cn_clip (which needs torchvision)."""
    spec = importlib.util.find_spec("cn_clip")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "clip" / "vocab.txt"
        if p.is_file():
            return p
    return None


def resolve_vocab(vocab: str | Path | None, vocab_size: int) -> Path:
    """The BERT vocabulary for a converted checkpoint: ``vocab`` or the cn_clip wheel's."""
    p = Path(vocab) if vocab else wheel_vocab()
    if p is None:
        raise CnClipCheckpointError(
            "cn_clip conversion needs the BERT vocabulary (vocab.txt, 21128 lines): pass --vocab FILE (e.g. the "
            "vocab.txt of an OFA-Sys/chinese-clip-vit-* folder) or `pip install --no-deps cn-clip==1.6.0`")
    if not p.is_file():
        raise CnClipCheckpointError(f"vocabulary {p}: no such file")
    n = sum(1 for _ in p.open(encoding="utf-8"))
    if n != vocab_size:
        raise CnClipCheckpointError(f"vocabulary {p} has {n} tokens but the checkpoint's embedding has {vocab_size}")
    return p


def image_processor(image_size: int):
    """The transformers processor config of cn_clip's transform (squash resize, bicubic, CLIP mean/std)."""
    from transformers import ChineseCLIPImageProcessorPil

    return ChineseCLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                        crop_size={"height": image_size, "width": image_size})


def convert_checkpoint(pt: str | Path, out_dir: str | Path, *, vocab: str | Path | None = None) -> Path:
    """Write a ``chinese-clip:``-loadable folder for a cn_clip ``.pt`` file and return it."""
    from transformers import BertTokenizer

    pt, out = Path(pt), Path(out_dir)
    sd = load_cn_clip_state_dict(pt)
    model, arch = hf_model_from_state_dict(sd, source=str(pt))
    voc = resolve_vocab(vocab, arch.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    (out / "vocab.txt").write_bytes(voc.read_bytes())
    BertTokenizer.from_pretrained(str(out), do_lower_case=True, model_max_length=512).save_pretrained(str(out))
    image_processor(arch.image_resolution).save_pretrained(str(out))
    digest = hashlib.sha256(pt.read_bytes()).hexdigest()
    (out / "cn_clip_source.json").write_text(json.dumps(
        {"source": pt.name, "sha256": digest, "arch": asdict(arch),
         "converted_by": "sgmft convert-cn-clip"}, indent=2) + "\n", encoding="utf-8")
    return out
