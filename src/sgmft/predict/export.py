"""``sgmft export``: the trained head on features as a standalone graph.

The exported function is ``(text, image, text_mask, image_mask) -> logits``: ``text`` and
``image`` are float32 ``(B, D)`` feature vectors, the masks bool ``(B,)`` (False = the
modality is missing, as in the feature store), ``logits`` float32 ``(B, K)`` in the label
order of ``labels.json``, already calibrated as the checkpoint says (:mod:`sgmft.train.calibrate`):
``logits / T``, or with a uniform weight eps > 0 ``log((1 - eps) softmax(logits / T) + eps / K)``;
either way softmax gives the calibrated probabilities ``sgmft predict`` reports (a checkpoint
without calibration: the raw logits). The batch size B is dynamic.

Formats:

* ``onnx``: ``torch.onnx.export`` (the dynamo exporter, which needs ``onnx`` and
  ``onnxscript``), checked with ``onnxruntime`` when it is installed (``pip install
  'sgmft[export]'``);
* ``torch-export``: ``torch.export.export`` saved with ``torch.export.save`` (a ``.pt2``
  file; load with ``torch.export.load(path).module()``; no sgmft code needed to run it).

After writing, the exported model is run on random features (masks included) and compared
with the PyTorch model; the largest absolute logit difference is returned (and must be
below ``tol``, 1e-5 by default). Imports neither Lightning nor the training code.
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from sgmft import atomic
from sgmft.checkpoint import load_checkpoint

__all__ = ["FORMATS", "ExportError", "LogitsHead", "export_model"]

FORMATS = ("onnx", "torch-export")
INPUTS = ("text", "image", "text_mask", "image_mask")


from sgmft.errors import InputError  # noqa: E402  (user errors: SgmftError and ValueError)


class ExportError(InputError):
    """The model cannot be exported in this format, or the export does not match the model."""


class LogitsHead(torch.nn.Module):
    """A registered model reduced to ``(text, image, text_mask, image_mask) -> calibrated logits``:
    ``logits / T``, and with ``uniform_weight`` eps > 0 the log of (1 - eps) softmax(logits / T)
    + eps / K (:func:`sgmft.checkpoint.calibrated_probs`); T = 1, eps = 0 leave the logits
    as they are."""

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, uniform_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.uniform_weight = float(uniform_weight)
        self.register_buffer("inv_temperature", torch.tensor(1.0 / float(temperature)), persistent=False)

    def forward(self, text, image, text_mask, image_mask):
        z = self.model(text, image, text_mask, image_mask).logits * self.inv_temperature
        if self.uniform_weight:
            eps = self.uniform_weight
            z = torch.log((1.0 - eps) * torch.softmax(z, -1) + eps / z.shape[-1])
        return z


def _example(dim: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    tm = torch.rand(batch, generator=g) > 0.2
    im = torch.rand(batch, generator=g) > 0.2
    tm[0] = im[0] = True                                # at least one full post and one of each kind
    if batch > 2:
        tm[1], im[2] = False, False
    return text * tm[:, None], image * im[:, None], tm, im


def _export_onnx(head: LogitsHead, example, out: Path, opset: int | None) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install 'sgmft[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    shapes = {"text": {0: batch}, "image": {0: batch}, "text_mask": {0: batch}, "image_mask": {0: batch}}
    kw = {} if opset is None else {"opset_version": opset}
    with atomic.atomic_file(out, "wb") as f:
        prog = torch.onnx.export(head, example, dynamo=True, dynamic_shapes=shapes, input_names=list(INPUTS),
                                 output_names=["logits"], verbose=False, **kw)
        prog.optimize()
        f.write(prog.model_proto.SerializeToString())       # one self-contained file (no external data)


def _run_onnx(path: Path, inputs) -> np.ndarray | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: x.numpy() for name, x in zip(INPUTS, inputs)}
    return sess.run(["logits"], feed)[0]


def _export_torch(head: LogitsHead, example, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    shapes = {"text": {0: batch}, "image": {0: batch}, "text_mask": {0: batch}, "image_mask": {0: batch}}
    ep = torch.export.export(head, example, dynamic_shapes=shapes, strict=False)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    atomic.write_bytes(out, buf.getvalue())


def _run_torch_export(path: Path, inputs) -> np.ndarray:
    ep = torch.export.load(io.BytesIO(Path(path).read_bytes()))
    with torch.inference_mode():
        return ep.module()(*inputs).numpy()


def _graph_friendly_kernels(module: torch.nn.Module) -> int:
    """Swap the exact moment kernel (d = 1; data-dependent binning that the exporters cannot
    trace) for the exact fused rank-one kernel, which computes the same attention in one
    static graph. Returns how many modules were switched; the export is still verified
    against the model as loaded."""
    switched = 0
    for m in module.modules():
        if getattr(m, "impl", None) == "moments":
            m.impl = "rank1"
            switched += 1
    return switched


def export_model(checkpoint, fmt: str, out, *, tol: float = 1e-5, batch: int = 8, seed: int = 0,
                 opset: int | None = None) -> dict:
    """Export the model of ``checkpoint`` (a run or model folder) to ``out``; verify it.

    Returns a summary: ``format``, ``out``, ``arch``, ``dim``, ``labels``, ``max_abs_diff``
    (exported vs PyTorch logits on random features; ``None`` for ONNX without onnxruntime),
    ``verified_with``, ``seconds``. Raises :class:`ExportError` when the architecture cannot be
    exported or the difference exceeds ``tol`` (the file is then removed).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    model, info = load_checkpoint(checkpoint)
    cal = info.get("calibration") or {}
    temperature, uniform_weight = float(cal.get("temperature", 1.0)), float(cal.get("uniform_weight", 0.0))
    head = LogitsHead(model.float().eval(), temperature, uniform_weight).eval()
    dim = int(info["model_cfg"].dim)
    out = Path(out)
    example = _example(dim, batch, seed)
    # the verification target is the model as loaded, before any kernel swap below
    check = _example(dim, batch + 5, seed + 1)
    with torch.inference_mode():
        want = head(*check).numpy()
    _graph_friendly_kernels(head)
    try:
        with warnings.catch_warnings():                  # the exporters' notes on dims and ops
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                _export_onnx(head, example, out, opset)
            else:
                _export_torch(head, example, out)
    except ExportError:
        raise
    except Exception as e:                               # the exporter's own failure: name the model
        raise ExportError(f"{info['model_cfg'].arch!r} cannot be exported to {fmt}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    # verify on other random features, with another batch size (the batch dimension is dynamic)
    got, verified_with = (_run_onnx(out, check), "onnxruntime") if fmt == "onnx" else \
        (_run_torch_export(out, check), "torch.export.load")
    diff = None
    if got is None:
        verified_with = None
    else:
        diff = float(np.max(np.abs(got - want)))
        if not diff <= tol:
            out.unlink(missing_ok=True)
            raise ExportError(f"the {fmt} export of {info['model_cfg'].arch!r} differs from the PyTorch model "
                              f"by {diff:.3g} > {tol:g} on random features; file not written")
    return {"format": fmt, "out": str(out), "arch": info["model_cfg"].arch, "dim": dim,
            "labels": info["label_names"], "inputs": list(INPUTS), "outputs": ["logits"],
            "max_abs_diff": diff, "verified_with": verified_with, "temperature": temperature,
            "uniform_weight": uniform_weight,
            "seconds": round(time.perf_counter() - t0, 2)}
