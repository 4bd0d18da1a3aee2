"""CLIP-family backbones from Hugging Face transformers.

* ``chinese-clip:<hub-id-or-dir>`` -- ``ChineseCLIPModel`` + ``BertTokenizer`` +
  ``ChineseCLIPImageProcessorPil`` (the paper's backbone; default checkpoint
  ``OFA-Sys/chinese-clip-vit-huge-patch14``, D = 1024).
* ``hf-clip:<hub-id-or-dir>`` -- any other model with ``get_text_features`` /
  ``get_image_features`` (``CLIPModel``, ``AltCLIPModel``, ``SiglipModel``, ...) via
  ``AutoModel`` / ``AutoTokenizer`` / ``AutoImageProcessor(backend="pil")``.

Weights are resolved without surprises: an existing directory is used as is; a hub id is
looked up in the local Hugging Face cache first and downloaded only when the machine is
online (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` unset). Anything missing raises
:class:`BackboneUnavailableError` saying how to download the checkpoint on a connected
machine and point sgmft at it. Nothing here imports torchvision.
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import contextlib
import hashlib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from sgmft.features.backbones.base import (
    Backbone, BackboneUnavailableError, apply_precision, digest_json, hash_state_dict, precision_recipe, resolve_device,
    resolve_precision,
)

DEFAULT_CHINESE_CLIP = "OFA-Sys/chinese-clip-vit-huge-patch14"
# Chinese-CLIP was pre-trained with 52-token texts (cn_clip's context_length).
CHINESE_CLIP_MAX_LENGTH = 52
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "*.bin"]


@contextlib.contextmanager
def hf_progress_bars(enabled: bool):
    """Switch transformers' progress bars ("Loading weights") on or off for a block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def is_offline() -> bool:
    """True when the Hugging Face hub must not be contacted."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def download_help(ref: str, name: str) -> str:
    """The how-to-fix text appended to every "weights unavailable" error."""
    local = ref.rsplit("/", 1)[-1] if _HUB_ID.match(ref) else "chinese-clip-vit-huge-patch14"
    repo = ref if _HUB_ID.match(ref) else DEFAULT_CHINESE_CLIP
    return (
        "To use it without network access:\n"
        f"  1. on a machine with internet access run\n"
        f"       hf download {repo} --local-dir {local}\n"
        f"     (older huggingface_hub: huggingface-cli download {repo} --local-dir {local});\n"
        f"  2. copy the directory '{local}' to this machine;\n"
        f"  3. pass --backbone {name}:/path/to/{local} (or load_backbone('{name}:/path/to/{local}')).\n"
        "Alternatively fill the Hugging Face cache (HF_HOME) on a connected machine and copy it.\n"
        "For tests and demos only: sgmft.features.backbones.tiny.build_tiny_chinese_clip(dir) makes a tiny "
        "RANDOM Chinese-CLIP (meaningless features). See docs/backbones.md.")


def resolve_checkpoint(ref: str, name: str) -> Path:
    """A local directory holding the checkpoint ``ref`` (a directory or a hub id)."""
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BackboneUnavailableError(
                f"{name}: directory {p} has no config.json, so it is not a transformers checkpoint "
                f"(expected config.json, weights, tokenizer and preprocessor files).\n" + download_help(ref, name))
        return p
    if not _HUB_ID.match(ref) or p.exists():
        raise BackboneUnavailableError(
            f"{name}: checkpoint directory {ref!r} does not exist (and is not a hub id like "
            f"'{DEFAULT_CHINESE_CLIP}').\n" + download_help(ref, name))
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True, allow_patterns=_WEIGHT_PATTERNS))
    except Exception:
        pass
    if is_offline():
        raise BackboneUnavailableError(
            f"{name}: weights for '{ref}' are not in the local Hugging Face cache and this machine is "
            "offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set), so they cannot be downloaded.\n"
            + download_help(ref, name))
    try:
        return Path(snapshot_download(ref, allow_patterns=_WEIGHT_PATTERNS))
    except Exception as e:
        raise BackboneUnavailableError(
            f"{name}: could not download '{ref}' from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the machine is probably offline.\n"
            + download_help(ref, name)) from None


QUICK_GELU = 1.702   # QuickGELU(x) = x * sigmoid(1.702 x) (CLIP's activation)


@torch.no_grad()
def fold_quick_gelu(model: torch.nn.Module) -> int:
    """Rewrite every ``fc1 -> QuickGELU -> fc2`` MLP of ``model`` as ``fc1' -> SiLU -> fc2'`` with
    fc1' = 1.702 fc1 and fc2'.weight = fc2.weight / 1.702; returns how many MLPs were rewritten.

    The same function: x sigmoid(1.702 x) = SiLU(1.702 x) / 1.702, and the two factors go into the
    weights (once, in fp32, before any reduced-precision cast). The activation becomes one in-place
    pass over the (batch, tokens, 4 x width) tensor instead of three (a scalar multiply, a sigmoid, a
    multiply, each writing a new tensor): ViT-B/16 image forward at batch 32 on 2 AMX cores, one
    interleaved run, 0.909 -> 0.780 s in bf16 and 3.43 -> 3.26 s in fp32, features at cosine
    1.000000 to the unfolded model in fp32 (docs/scale.md). It changes only the last bits, like the
    thread count, so it is not part of the fingerprint. The weights' identity is hashed before.
    """
    n = 0
    for mod in model.modules():
        act = getattr(mod, "activation_fn", None)
        fc1, fc2 = getattr(mod, "fc1", None), getattr(mod, "fc2", None)
        if type(act).__name__ != "QuickGELUActivation" or not isinstance(fc1, torch.nn.Linear) \
                or not isinstance(fc2, torch.nn.Linear):
            continue
        fc1.weight.mul_(QUICK_GELU)
        if fc1.bias is not None:
            fc1.bias.mul_(QUICK_GELU)
        fc2.weight.div_(QUICK_GELU)
        mod.activation_fn = torch.nn.SiLU(inplace=True)
        n += 1
    return n


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


class HFClipBackbone(Backbone):
    """A transformers dual encoder (``get_text_features`` / ``get_image_features``)."""

    def __init__(self, name: str, ref: str, *, model, tokenizer, processor, ckpt_dir: Path,
                 device="auto", dtype="auto", batch_size: int = 32, max_length: int | None = None):
        self.name, self.spec, self.ckpt_dir = name, f"{name}:{ref}", ckpt_dir
        self.tokenizer, self.processor = tokenizer, processor
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.precision = resolve_precision(dtype, self.device)
        model.eval().requires_grad_(False)
        self._weights_digest = hash_state_dict(model)  # before any device move / quantisation: stable identity
        self._model_class = type(model).__name__
        fold_quick_gelu(model)
        self.model = apply_precision(model.to(self.device), self.precision)
        self._recipe = precision_recipe(self.precision)  # as applied now (the int8 engine is chosen here)
        cfg = model.config
        self.dim = int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)
        self.image_size = int(getattr(getattr(cfg, "vision_config", None), "image_size", 224))
        if max_length is None:
            tml = getattr(tokenizer, "model_max_length", 77)
            max_length = tml if isinstance(tml, int) and tml < 10_000 else 77
        self.max_length = int(max_length)
        self._fp: str | None = None
        # keep only the token tensors the model accepts (CLIP takes no token_type_ids)
        self._text_args = set(inspect.signature(model.get_text_features).parameters)

    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = self.fingerprint_at(self.precision)
        return self._fp

    def fingerprint_at(self, precision: str) -> str:
        """Fingerprint at ``precision`` (weights, tokenizer, preprocessing, precision)."""
        cfg = self.model.config.to_dict()
        for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            cfg.pop(k, None)
        proc = self.processor.to_dict()
        proc.pop("processor_class", None)
        vocab = "".join(_file_digest(self.ckpt_dir / f) for f in
                        ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "spiece.model"))
        ident = {
            "backbone": self.name, "model_class": self._model_class, "config": cfg,
            "weights": self._weights_digest, "vocab": vocab, "max_length": self.max_length,
            "tokenizer_class": type(self.tokenizer).__name__,
            "lower": getattr(self.tokenizer, "do_lower_case", None),
            "processor": proc, "precision": precision}
        recipe = self._recipe if precision == self.precision else precision_recipe(precision)
        if recipe is not None:  # how bf16/int8 are computed (absent for fp32: fingerprint unchanged)
            ident["precision_recipe"] = recipe
        return digest_json(ident)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in self._text_args}

    # -- long texts (sgmft.features.encode applies CleanConfig.long_text with these two) -----
    @property
    def text_budget(self) -> int:
        """Content tokens one forward sees: ``max_length`` minus the special tokens around them."""
        pre, post = self._special_layout()
        return self.max_length - len(pre) - len(post)

    def text_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Every content token id of each text (no special tokens, no truncation)."""
        return self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def _special_layout(self) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before and after a text's content ids."""
        if getattr(self, "_layout", None) is not None:
            return self._layout
        probe = "a"
        full = self.tokenizer(probe)["input_ids"]
        body = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        for i in range(len(full) - len(body) + 1):
            if full[i:i + len(body)] == body:
                self._layout = (list(full[:i]), list(full[i + len(body):]))
                return self._layout
        raise RuntimeError(f"{type(self.tokenizer).__name__}: cannot locate the content ids among {full}")

    def tokens_from_ids(self, windows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Model inputs for windows of content ids (each at most :attr:`text_budget` long), laid
        out as :meth:`tokenize` lays out a text: special tokens around, padded to ``max_length``."""
        tok, n = self.tokenizer, self.max_length
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(windows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(windows), n), dtype=torch.long)
        pre, post = self._special_layout()
        for r, w in enumerate(windows):
            full = pre + list(w)[:self.text_budget] + post
            ids[r, :len(full)] = torch.tensor(full, dtype=torch.long)
            mask[r, :len(full)] = 1
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        return {k: v for k, v in out.items() if k in self._text_args}

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"].float()

    def _text_embed(self, tokens):
        return self.model.get_text_features(**tokens).pooler_output

    def _image_embed(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output


def _load_pieces(name: str, ckpt: Path, loaders) -> tuple:
    try:
        return tuple(f(str(ckpt)) for f in loaders)
    except BackboneUnavailableError:
        raise
    except (OSError, ValueError) as e:
        raise BackboneUnavailableError(
            f"{name}: failed to load the checkpoint in {ckpt}: {type(e).__name__}: {e}\n"
            "The directory must hold config.json, the weights (model.safetensors or pytorch_model.bin), "
            "the tokenizer files and preprocessor_config.json.\n" + download_help(str(ckpt), name)) from e


def load_chinese_clip(ref: str = DEFAULT_CHINESE_CLIP, *, device="auto", dtype="auto",
                      batch_size: int = 32, max_length: int = CHINESE_CLIP_MAX_LENGTH) -> HFClipBackbone:
    """A Chinese-CLIP checkpoint (hub id or directory) as a :class:`Backbone`."""
    from transformers import BertTokenizer, ChineseCLIPImageProcessorPil, ChineseCLIPModel

    ref = ref or DEFAULT_CHINESE_CLIP
    ckpt = resolve_checkpoint(ref, "chinese-clip")
    model, tok, proc = _load_pieces("chinese-clip", ckpt, (
        ChineseCLIPModel.from_pretrained, BertTokenizer.from_pretrained,
        ChineseCLIPImageProcessorPil.from_pretrained))
    return HFClipBackbone("chinese-clip", ref, model=model, tokenizer=tok, processor=proc, ckpt_dir=ckpt,
                          device=device, dtype=dtype, batch_size=batch_size, max_length=max_length)


def load_hf_clip(ref: str, *, device="auto", dtype="auto", batch_size: int = 32,
                 max_length: int | None = None) -> HFClipBackbone:
    """Any transformers CLIP-like model (``CLIPModel``, ``SiglipModel``, ...) as a :class:`Backbone`."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    if not ref:
        raise InputError("hf-clip needs a checkpoint: 'hf-clip:<hub-id-or-dir>'")
    ckpt = resolve_checkpoint(ref, "hf-clip")
    model, tok, proc = _load_pieces("hf-clip", ckpt, (
        AutoModel.from_pretrained, AutoTokenizer.from_pretrained,
        lambda d: AutoImageProcessor.from_pretrained(d, backend="pil")))
    if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise InputError(f"hf-clip: {type(model).__name__} has no get_text_features/get_image_features")
    return HFClipBackbone("hf-clip", ref, model=model, tokenizer=tok, processor=proc, ckpt_dir=ckpt,
                          device=device, dtype=dtype, batch_size=batch_size, max_length=max_length)
