"""int8 Linears with one activation scale per token, on oneDNN's u8 x s8 kernels (VNNI / AMX).

``precision="int8"`` on a CPU whose oneDNN has exact int8 dot products (``avx512_vnni``,
``avx_vnni`` or ``amx_int8``, not capped away by ``ONEDNN_MAX_CPU_ISA``) replaces every
``nn.Linear`` with a :class:`TokenInt8Linear`:

* weights: int8, one scale per output channel (``max |w| / 127``), reordered once at load into
  oneDNN's blocked layout (``onednn::qlinear_prepack``), as :class:`PackedLinear` does for bf16;
* activations: one scale per token (``max |x| / 127`` over the row), rounded to int8 and shifted
  by 128 into u8, the operand VNNI's dot product reads (zero point 128 for oneDNN);
* ``onednn::qlinear_pointwise`` computes the exact int32 sums and multiplies by the weight
  scales; the token scale and the bias follow in one in-place pass (``addcmul``).

A token's features depend on nothing but its own row, so a post's features are the same in any
batch (what the cache, the engines and "one post predicted alone" rely on), with no per-post
calls and no concatenation. Where this class cannot run exactly (AVX2 without VNNI: oneDNN's u8 x s8
pairs saturate at int16, measured: errors of the order of the sums themselves), ``int8`` keeps
the per-post dynamic recipe (``base.PerPostLinear``). Figures: docs/scale.md ("int8 with one
scale per token").
"""

from __future__ import annotations

import warnings

import torch

# the rounding offset: 128 (u8 zero point) + 0.5 (round half up, then truncate toward zero)
_SHIFT = 128.5
_ZERO_POINT = 128
# models at least this large quantise activations with a compiled kernel (one fused pass; the
# eager ops take four); smaller ones stay eager (compiling costs ~10 s the first time)
COMPILE_QUANTIZER_MIN_PARAMS = 50_000_000


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``x`` (rows x features, float32) as u8 with zero point 128 and one scale per
    row, ``x ~= scale * (q - 128)``. ``scale = max |x_row| / 127``; an all-zero row gets a tiny
    scale (its q is all 128). Exact elementwise IEEE arithmetic: a compiled copy of this function
    gives the same bytes (tests/test_precision.py)."""
    amax = torch.maximum(x.amax(1, keepdim=True), -x.amin(1, keepdim=True)).clamp_min(1e-30)
    inv = 127.0 / amax
    return (x * inv).add_(_SHIFT).to(torch.uint8), 1.0 / inv


_compiled = {}


def _quantizer(compiled: bool):
    """The eager :func:`quantize_per_token`, or its ``torch.compile`` copy (dynamic shapes, built once
    per process). A build that cannot compile (no C++ compiler, say) says so once and stays eager:
    the two give the same bytes, so only the speed differs."""
    if not compiled:
        return quantize_per_token
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(quantize_per_token, dynamic=True)
    return _compiled["fn"]


class TokenInt8Linear(torch.nn.Module):
    """An ``nn.Linear`` as int8 weights (per output channel) x int8 activations (per token) on
    oneDNN's prepacked u8 x s8 kernel (module docstring). Build it only where
    ``precision.EXACT_INT8_FLAGS`` hold (``base.int8_scheme``)."""

    def __init__(self, linear: torch.nn.Linear, compiled_quantizer: bool = False):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("w_scale", (w.abs().amax(1) / 127.0).clamp_min(1e-30))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.compiled_quantizer = compiled_quantizer
        self._pack(torch.round(w / self.w_scale[:, None]).to(torch.int8))

    def _pack(self, w_int8: torch.Tensor) -> None:
        self.w_t = None
        self.packed = torch.ops.onednn.qlinear_prepack(w_int8.contiguous(), None)
        self._w_zp = torch.zeros(self.out_features, dtype=torch.int64)

    def int8_weight(self) -> torch.Tensor:
        """The ``(out, in)`` int8 weight (the packed one is oneDNN's opaque layout)."""
        return self.w_t.t().contiguous() if self.packed is None else self.packed.to_dense().t().contiguous()

    def for_compile(self) -> "TokenInt8Linear":
        """Switch to ``torch._int_mm`` on the plain int8 weight, which Inductor can trace (it cannot
        take oneDNN's packed weight as a module attribute); ``Backbone.compile_forward`` calls it.
        Same integer sums; the float epilogue is Inductor's, so the last bits may differ."""
        if self.packed is not None:
            self.w_t, self.packed = self.int8_weight().t(), None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        try:
            q, scale = _quantizer(self.compiled_quantizer)(x2)
        except Exception as e:  # noqa: BLE001 -- torch.compile's failures have no common type
            if not self.compiled_quantizer:
                raise
            _compile_failed(e)
            self.compiled_quantizer = False
            q, scale = quantize_per_token(x2)
        if self.packed is None:  # compiled (for_compile): signed int8 for torch._int_mm
            acc = torch._int_mm((q.to(torch.int16) - _ZERO_POINT).to(torch.int8), self.w_t)
            y = acc * self.w_scale * scale
            return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], self.out_features)
        y = torch.ops.onednn.qlinear_pointwise(q, 1.0, _ZERO_POINT, self.packed, self.w_scale, self._w_zp,
                                               None, 1.0, 0, torch.float32, "none", [], "")
        if self.bias is None:
            y.mul_(scale)
        else:  # one pass, in place: y * token scale + bias (half the time of mul_ then add_)
            torch.addcmul(self.bias, y, scale, out=y)
        return y.view(*x.shape[:-1], self.out_features)

    def __getstate__(self) -> dict:  # oneDNN's opaque tensor does not pickle: the plain int8 weight
        state = super().__getstate__().copy()
        state["packed"] = self.int8_weight()
        state.pop("_w_zp", None)
        state.pop("w_t", None)
        return state

    def __setstate__(self, state: dict) -> None:
        w_int8 = state.pop("packed")
        super().__setstate__(state)
        self._pack(w_int8)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activations=per-token u8, weights=per-channel s8")


def _compile_failed(err: Exception) -> None:
    from sgmft.errors import SgmftNote

    warnings.warn(f"int8: could not compile the activation quantiser ({type(err).__name__}: "
                  f"{str(err).splitlines()[0][:200] if str(err) else ''}); using the eager one "
                  "(same features, slower)", SgmftNote, stacklevel=3)
