"""The backbone interface: a frozen dual encoder that maps texts and images to D-vectors.

Every backbone returns float32, L2-normalised ``(B, D)`` numpy arrays (Chinese-CLIP's
README asks for normalised features; the feature store records ``normalization="l2"``).
The work is split so a benchmark can time each stage: ``tokenize`` / ``preprocess_images``
(CPU) and ``forward_text`` / ``forward_images`` (the bare model forward, under
``torch.inference_mode()``, with fp16/bf16 autocast on CUDA when ``dtype="auto"``).
``encode_text`` / ``encode_images`` chain them in chunks of ``batch_size``.
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import abc
import hashlib
import json
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from sgmft.errors import BackboneUnavailableError  # noqa: F401  (re-exported)
from sgmft.features.backbones.precision import (  # noqa: F401  (re-exported)
    INT8_ENGINE_PREFERENCE, announce_auto, auto_cpu_precision, int8_engine,
)

# autocast dtypes; "int8" = dynamic int8 quantisation of the Linear layers (CPU), fp32 elsewhere
_PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRECISIONS = ("float32", "bfloat16", "float16", "int8")
PRECISION_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "qint8": "int8"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` = this process's GPU (``LOCAL_RANK`` under torchrun) if any, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def canonical_precision(dtype: str) -> str:
    """``"fp32"``/``"bf16"``/``"fp16"``/``"int8"`` (or the long names, or ``"auto"``) -> the long name."""
    d = PRECISION_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if d != "auto" and d not in PRECISIONS:
        raise InputError(f"precision/dtype must be 'auto' or one of fp32, bf16, fp16, int8 "
                         f"({', '.join(PRECISIONS)}), got {dtype!r}")
    return d


def resolve_precision(dtype: str, device: torch.device) -> str:
    """``"auto"`` = bf16 (or fp16 where bf16 is unsupported) autocast on CUDA; on CPU the
    machine's choice (:func:`sgmft.features.backbones.precision.auto_cpu_precision`: bf16
    with AMX tiles, int8 with VNNI or AVX2 and no AMX, fp32 otherwise), announced once per process.

    ``"int8"`` (dynamic int8 quantisation of every ``nn.Linear``, activations quantised per
    post) runs on CPU only: PyTorch's dynamic-quantised kernels have no CUDA version.
    """
    d = canonical_precision(dtype)
    if d == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if device.type != "cpu":
            return "float32"
        choice, reason = auto_cpu_precision()
        announce_auto(choice, reason)
        return choice
    if d == "int8" and device.type != "cpu":
        raise InputError(f"precision int8 (dynamic quantisation) runs on CPU only, not on {device}; "
                         "use bf16 or fp16 on a GPU")
    return d


# How each non-fp32 precision is computed. Part of the backbone fingerprint (see
# ``precision_recipe``): two recipes give (slightly) different features, so the extraction
# cache and the feature contract must not mix them. fp32 has no entry, so fp32
# fingerprints are unchanged.
#   bf16: weights stored in bfloat16 (``model.to(bfloat16)``) AND the forward under bf16
#         autocast (casts the float32 pixel input for the patch conv). Faster than autocast
#         over fp32 weights, which re-casts every weight matrix on every batch (autocast's
#         cast cache only keeps casts of leaf tensors that require grad) and keeps every
#         activation in fp32; measured in benchmarks/bench_extract.py --precisions.
#   int8: torch.ao dynamic quantisation of every nn.Linear (int8 weights with one scale per
#         output channel: per-tensor scales drifted below mean cosine 0.999 on ViT-H/14;
#         activations quantised per batch), packed for the quantized engine named here
#         (oneDNN where available: faster than fbgemm/x86 on AVX-512-VNNI in
#         bench_extract's ceiling check, no reduce_range, and AMX-int8 kernels on CPUs
#         with AMX; fbgemm has none).
#   (INT8_ENGINE_PREFERENCE and int8_engine live in sgmft.features.backbones.precision.)


def precision_recipe(precision: str) -> str | None:
    """How ``precision`` is computed (``None`` for fp32/fp16: the stored model, autocast for fp16).
    Backbones put it in their fingerprint next to the precision name."""
    if precision == "bfloat16":
        return "bf16-weights+autocast"
    if precision == "int8":
        if int8_scheme() == "per-token":
            return "int8-linear-per-channel-per-token-u8s8:onednn"
        return f"dynamic-int8-linear-per-channel-per-post:{int8_engine()}"
    return None


def int8_scheme(flags=None) -> str:
    """How ``int8`` quantises activations on this CPU (``flags``: default, this CPU's usable ones):
    ``"per-token"`` (:class:`~sgmft.features.backbones.int8_linear.TokenInt8Linear`) where oneDNN's
    u8 x s8 int8 matmul is exact (VNNI or AMX-int8) and the build has oneDNN's quantized ops,
    ``"per-post"`` (:class:`PerPostLinear`, dynamic quantisation) elsewhere."""
    from sgmft.features.backbones.precision import EXACT_INT8_FLAGS, usable_cpu_flags

    flags = usable_cpu_flags() if flags is None else frozenset(flags)
    has_ops = hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available()
    return "per-token" if flags & EXACT_INT8_FLAGS and has_ops else "per-post"


def apply_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model to run at ``precision`` (modified in place; pass a model nobody else uses).

    * ``int8`` on a CPU with VNNI or AMX-int8 (:func:`int8_scheme`): every ``nn.Linear`` becomes a
      :class:`~sgmft.features.backbones.int8_linear.TokenInt8Linear` (one activation scale per
      token, oneDNN's prepacked u8 x s8 kernel). Elsewhere (AVX2 only):
    * ``int8``: every ``nn.Linear`` becomes a dynamically quantised one (int8 weights, one
      scale per output channel; ``torch.ao.quantization.quantize_dynamic`` with
      ``per_channel_dynamic_qconfig``), packed for :func:`int8_engine`, and run one post at a
      time (:class:`PerPostLinear`): dynamic quantisation takes one activation scale per call, so
      a batch would give each post a scale set by its batch-mates.
      The packed weights carry their engine, so the forward does not depend on the global
      ``torch.backends.quantized.engine``, which is restored afterwards.
    * ``bfloat16``: parameters and buffers cast to bfloat16 (halves the weights' memory);
      the forward also runs under bf16 autocast (:meth:`Backbone._autocast`). On CPU each
      ``nn.Linear`` then keeps its weight in oneDNN's blocked layout (:class:`PackedLinear`).
    * others: ``model`` unchanged (fp16 autocasts in :meth:`Backbone._autocast`).
    """
    if precision == "bfloat16":
        return pack_linears(model.to(torch.bfloat16))
    if precision != "int8":
        return model
    if int8_scheme() == "per-token":
        from sgmft.features.backbones.int8_linear import COMPILE_QUANTIZER_MIN_PARAMS, TokenInt8Linear

        big = sum(p.numel() for p in model.parameters()) >= COMPILE_QUANTIZER_MIN_PARAMS
        return _swap_linears(model, torch.nn.Linear, lambda lin: TokenInt8Linear(lin, compiled_quantizer=big))
    import warnings

    eng, prev = int8_engine(), torch.backends.quantized.engine
    torch.backends.quantized.engine = eng
    try:
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, still works
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
            return torch.ao.quantization.quantize_dynamic(
                model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8,
                mapping={torch.nn.Linear: PerPostLinear}, inplace=True)
    finally:
        torch.backends.quantized.engine = prev


class PerPostLinear(DynamicQuantizedLinear):
    """A dynamically quantised Linear applied to each post (index of dim 0) on its own.

    ``quantize_dynamic`` quantises a call's whole input with one scale (its min and max), so in a
    batch a post's int8 activations, and so its features, would depend on the other posts (up
    to 0.08 on a Linear's output; 1e-3 on a tiny model's probabilities). One call per post keeps
    a post's features the same in any batch, which the content-addressed cache, the byte-identical
    engines and "one post predicted alone == its row in the store" rely on. The int32 accumulation
    is exact, so the split itself changes nothing else. Cost: 1.54x -> 1.46x fp32 on one ViT-B MLP
    Linear (fbgemm, AVX2; docs/scale.md). The backbones here are batch-first (transformers).
    ``quantize_dynamic`` builds it in place of its own class (``mapping``), through ``from_float``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = super().forward
        if x.dim() < 2 or x.shape[0] == 1:
            return one(x)
        return torch.cat([one(row) for row in x.split(1)])


# the row count oneDNN blocks a packed weight for (a hint: any row count runs, with the same results)
PACK_ROWS_HINT = 2048


class PackedLinear(torch.nn.Module):
    """A bf16 ``nn.Linear`` on CPU whose weight oneDNN reordered once, at load, into the blocked
    layout its AMX / AVX-512 GEMM kernels read (``mkldnn._reorder_linear_weight``, what Inductor's
    freezing does for a compiled model), instead of on every call as ``F.linear`` on a plain weight
    does. The same kernel computes the same sums: with one thread the features are bit for bit
    those of the plain Linear (``tests/test_precision.py``); with more, oneDNN may split a GEMM
    between the threads otherwise and the last bit of some outputs can differ (as the thread count
    itself makes it), so it is not part of the fingerprint. The speed-up is measured in
    ``benchmarks/bench_extract.py --variants bf16:plain-linear`` (docs/scale.md). The weight is kept
    only packed (no second copy); :meth:`to_linear` gives the plain Linear back
    (``Backbone.compile_forward`` does, since Inductor packs by itself)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS_HINT)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, self.bias, "none", [], "")

    def __getstate__(self) -> dict:   # oneDNN's opaque tensor has no storage to pickle: the plain weight
        state = super().__getstate__().copy()
        state["packed"] = self.packed.to_dense()
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.packed, PACK_ROWS_HINT)

    def to_linear(self) -> torch.nn.Linear:
        lin = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              dtype=torch.bfloat16, device="meta")
        lin.weight = torch.nn.Parameter(self.packed.to_dense(), requires_grad=False)
        if self.bias is not None:
            lin.bias = torch.nn.Parameter(self.bias, requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack_bf16(model: torch.nn.Module) -> bool:
    """Whether :class:`PackedLinear` runs here: a CPU model and a oneDNN build with bf16 kernels."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return (dev.type == "cpu" and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def _swap_linears(model: torch.nn.Module, kind: type, make) -> torch.nn.Module:
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is kind:
                setattr(mod, name, make(child))
    return model


def pack_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Every bf16 ``nn.Linear`` of ``model`` as a :class:`PackedLinear` (in place), where it can run."""
    return _swap_linears(model, torch.nn.Linear, PackedLinear) if can_pack_bf16(model) else model


def unpack_linears(model: torch.nn.Module) -> torch.nn.Module:
    """The inverse of :func:`pack_linears` (in place): plain Linears with the same weights."""
    return _swap_linears(model, PackedLinear, PackedLinear.to_linear)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with its first dimension padded to ``rows`` by repeating row 0 (a valid input)."""
    if len(x) >= rows or len(x) == 0:
        return x
    return torch.cat([x, x[:1].expand(rows - len(x), *x.shape[1:])])


def hash_state_dict(module: torch.nn.Module, *, full_limit_bytes: int = 256 << 20) -> str:
    """A stable digest of a module's parameters and buffers.

    Small models (<= ``full_limit_bytes``) are hashed in full. Larger ones hash names,
    shapes, dtypes and an evenly strided sample of 65,536 values per tensor (plus its
    float64 sum): any retraining or fine-tuning changes it, and a ViT-H is hashed in well
    under a second instead of reading 4 GB.
    """
    sd = module.state_dict()
    total = sum(t.numel() * t.element_size() for t in sd.values())
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.reshape(-1)
        if total > full_limit_bytes and flat.numel() > 65536:
            flat = flat[:: flat.numel() // 65536][:65536].contiguous()
            # numpy's (pairwise, single-threaded) sum: torch's parallel sum differs in the last bits
            # with the thread count, which made the fingerprint depend on torch.set_num_threads
            h.update(repr(float(t.double().numpy().sum())).encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def digest_json(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True, default=str).encode()).hexdigest()


class Backbone(abc.ABC):
    """A frozen text/image encoder. Subclasses implement the five abstract methods."""

    name: str = "abstract"     # registry name, e.g. "chinese-clip"
    spec: str = ""             # what load_backbone was given, e.g. "chinese-clip:/models/vit-h"
    dim: int = 0               # D
    image_size: int = 0        # side of the square model input, in pixels
    device: torch.device = torch.device("cpu")
    precision: str = "float32"  # compute precision: float32, or the CUDA autocast dtype
    batch_size: int = 32

    # -- identity -------------------------------------------------------------------
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Hex digest identifying weights + tokenizer + image preprocessing + precision.

        Stable across processes and runs; changes whenever any of those change. Used in
        the extraction cache key.
        """

    # -- CPU-side preparation ---------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token tensors for ``texts`` (fixed padded length, so a text's tokens do not
        depend on its batch-mates)."""

    @abc.abstractmethod
    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """RGB PIL images -> a float32 ``(B, 3, H, W)`` CPU tensor, ready for the model."""

    # -- the bare forward ------------------------------------------------------------
    @abc.abstractmethod
    def _text_embed(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unnormalised ``(B, D)`` text embeddings; inputs are already on ``self.device``."""

    @abc.abstractmethod
    def _image_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unnormalised ``(B, D)`` image embeddings; input already on ``self.device``."""

    def fingerprint_at(self, precision: str) -> str | None:
        """The fingerprint this backbone would have at ``precision`` (``None``: cannot tell).
        Lets a consumer that accepts a precision mismatch still verify the weights."""
        return self.fingerprint() if precision == self.precision else None

    def _autocast(self):
        dt = _PRECISIONS.get(self.precision, torch.float32)
        return torch.autocast(device_type=self.device.type, dtype=dt, enabled=dt != torch.float32)

    compiled: bool = False     # forward through torch.compile (see compile_forward)

    def forward_text(self, tokens: dict[str, torch.Tensor]) -> np.ndarray:
        """One batch through the text tower -> float32 L2-normalised ``(B, D)``."""
        n = len(next(iter(tokens.values())))
        with torch.inference_mode(), self._autocast():
            x = self._text_embed({k: _pad_rows(v.to(self.device, non_blocking=True), self._bucket(n))
                                  for k, v in tokens.items()})
        return F.normalize(x[:n].float(), dim=-1).cpu().numpy()

    def forward_images(self, pixel_values: torch.Tensor) -> np.ndarray:
        """One batch through the image tower -> float32 L2-normalised ``(B, D)``."""
        n = len(pixel_values)
        with torch.inference_mode(), self._autocast():
            x = self._image_embed(_pad_rows(pixel_values.to(self.device, non_blocking=True), self._bucket(n)))
        return F.normalize(x[:n].float(), dim=-1).cpu().numpy()

    def _bucket(self, n: int) -> int:
        """Rows a batch of ``n`` is padded to: ``n`` in eager mode; compiled, the next of
        ``batch_size, batch_size/2, batch_size/4, batch_size/8`` (so at most four graphs per
        tower are compiled, and a ragged last chunk wastes less than half its work)."""
        if not self.compiled or n <= 0:
            return n
        b = max(1, int(self.batch_size))
        sizes = sorted({max(1, b >> k) for k in range(4)})
        return next((s for s in sizes if s >= n), n)

    def compile_forward(self) -> "Backbone":
        """Run both towers through ``torch.compile`` (Inductor, with freezing: weights folded
        as constants and pre-packed for oneDNN, LayerNorm/GELU/residual ops fused into few
        kernels). Batches are padded to a few bucket sizes (:meth:`_bucket`) so shapes stay
        static. Each bucket compiles on first use (tens of seconds to minutes on CPU), so it
        pays on long extractions only; rows are independent in these models, so padding rows
        change nothing but the last bits (as a torch thread count does)."""
        if not self.compiled:
            if isinstance(getattr(self, "model", None), torch.nn.Module):
                unpack_linears(self.model)   # Inductor's freezing packs the plain weights itself
                for m in self.model.modules():   # int8 per token: torch._int_mm on the plain weight
                    if hasattr(m, "for_compile"):
                        m.for_compile()
            opts = {"freezing": True}
            self._text_embed = torch.compile(self._text_embed, dynamic=False, options=opts)
            self._image_embed = torch.compile(self._image_embed, dynamic=False, options=opts)
            self.compiled = True
        return self

    # -- convenience ------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> ``(len(texts), D)`` float32, L2-normalised, in chunks of ``batch_size``."""
        texts = list(texts)
        out = [self.forward_text(self.tokenize(texts[i:i + self.batch_size]))
               for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """RGB PIL images -> ``(len(images), D)`` float32, L2-normalised."""
        images = list(images)
        out = [self.forward_images(self.preprocess_images(images[i:i + self.batch_size]))
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(spec={self.spec!r}, dim={self.dim}, device={self.device}, "
                f"precision={self.precision})")
