"""``sgmft export RUN --with-backbone --format onnx --out DIR``: the whole post in one ONNX graph.

Inputs (``B`` posts, dynamic; ``L`` = the backbone's text context; ``M`` images a post, dynamic)::

    input_ids       int64   (B, L)     tokens laid out as the backbone's tokenizer lays them out
    attention_mask  int64   (B, L)
    pixel_values    float32 (B, M, 3, S, S)  cn_clip/Chinese-CLIP preprocessed images, packed first
    image_valid     bool    (B, M)     which image slots hold an image (False: padding)
    text_mask       bool    (B,)       False: the post has no usable text

Outputs: ``probs`` (B, K; the checkpoint's calibrated probabilities, ``calibrated_probs``, in
the order of ``labels``) and ``logits``. Inside: the backbone's text and image towers, L2 normalisation,
the run's ``image_choice`` (``similar``: the image closest to the text, the first one when the
post has no text; ``first``; ``mean``), then the run's head. The same computation as
``sgmft predict``, from tokens and pixels.

``DIR`` gets ``model.onnx``, ``tokenizer.json`` (a ``tokenizers`` file), ``export.json`` (labels,
token layout, image side, text cleaning, long-text policy, image choice, decode limits) and a
README. The torch-free runner (``python -m sgmft.runner.onnx_runner DIR MANIFEST``, needing
numpy, Pillow, onnxruntime, tokenizers, jieba, stopwordsiso and sgmft installed with
``--no-deps``) cleans, tokenizes, preprocesses and predicts a posts manifest.
The export is verified with onnxruntime against the PyTorch module at batch sizes 1, 7 and 32.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sgmft import atomic
from sgmft.checkpoint import calibrated_probs, load_checkpoint
from sgmft.predict.export import ExportError, _graph_friendly_kernels

__all__ = ["POST_INPUTS", "WholePost", "export_whole_post"]

POST_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_valid", "text_mask")
CHECK_BATCHES = (1, 7, 32)


class WholePost(torch.nn.Module):
    """Backbone towers + image choice + head: tokens and pixels -> (probs, logits)."""

    def __init__(self, hf_model, head, *, image_choice: str, temperature: float, token_types: bool,
                 uniform_weight: float = 0.0):
        super().__init__()
        self.clip, self.head = hf_model, head
        self.image_choice, self.temperature, self.token_types = image_choice, float(temperature), token_types
        self.uniform_weight = float(uniform_weight)

    def forward(self, input_ids, attention_mask, pixel_values, image_valid, text_mask):
        kw = {"token_type_ids": torch.zeros_like(input_ids)} if self.token_types else {}
        t = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kw).pooler_output
        t = F.normalize(t.float(), dim=-1) * text_mask[:, None].to(t.dtype)
        B, M = image_valid.shape
        v = self.clip.get_image_features(pixel_values=pixel_values.flatten(0, 1)).pooler_output
        v = F.normalize(v.float(), dim=-1).reshape(B, M, -1)
        valid = image_valid.to(v.dtype)
        if self.image_choice == "mean":
            m = (v * valid[..., None]).sum(1)
            img = F.normalize(m, dim=-1)
        else:
            if self.image_choice == "similar":
                score = torch.einsum("bmd,bd->bm", v, t)
                score = torch.where(image_valid, score, torch.full_like(score, -3.0))
                # no text: the first image (choose_image's fallback); a text: the most similar image
                first = torch.zeros_like(score).index_fill(1, torch.zeros(1, dtype=torch.long), 1.0)
                score = torch.where(text_mask[:, None], score, first)
                idx = score.argmax(1)
            else:  # "first": images are packed, so the first slot
                idx = torch.zeros(B, dtype=torch.long, device=v.device)
            img = v.gather(1, idx[:, None, None].expand(B, 1, v.shape[-1])).squeeze(1)
        has_img = image_valid.any(1)
        img = img * has_img[:, None].to(img.dtype)
        logits = self.head(t, img, text_mask, has_img).logits.float()
        return calibrated_probs(logits, self.temperature, self.uniform_weight), logits


def _backbone_for(info, contract):
    from sgmft.features.backbones import load_backbone

    if not contract.backbone:
        raise ExportError("--with-backbone: the run records no backbone (features not made by `sgmft extract`)")
    bb = load_backbone(contract.backbone, device="cpu", dtype="float32", batch_size=32)
    if not hasattr(getattr(bb, "model", None), "get_text_features") or not hasattr(bb, "text_ids"):
        raise ExportError(f"--with-backbone: backbone {bb.spec!r} is not a transformers CLIP model; only "
                          "chinese-clip:, cn-clip: and hf-clip: backbones export whole posts")
    _check_transform(bb)
    notes = contract.check_backbone(bb, where=str(info["path"]), allow_precision_mismatch=True)
    return bb, notes


def _check_transform(bb) -> None:
    """The runner preprocesses with cn_clip's transform: refuse a backbone whose own preprocessing
    differs (e.g. a shortest-edge resize + centre crop), checked on a few odd-sized random images."""
    from PIL import Image

    from sgmft.features.backbones.cn_clip_transform import cn_clip_batch

    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((31, 57), (300, 200))]
    ours = cn_clip_batch(ims, int(bb.image_size))
    theirs = bb.preprocess_images(ims).numpy()
    if ours.shape != theirs.shape or float(np.abs(ours - theirs).max()) > 1e-6:
        raise ExportError(f"--with-backbone: backbone {bb.spec!r} preprocesses images differently from cn_clip's "
                          "transform (squash resize, bicubic, CLIP mean/std), which the torch-free runner uses")


def _meta(bb, info, contract, image_choice: str) -> dict:
    from sgmft.features.backbones.cn_clip_transform import transform_spec
    from sgmft.features.encode import DEFAULT_MAX_IMAGES, reduce_side

    pre, post = bb._special_layout()
    tok = bb.tokenizer
    ext = contract.extraction or {}
    return {"format": "sgmft-whole-post-onnx", "version": 1, "labels": list(info["label_names"]),
            "backbone": bb.spec, "backbone_fingerprint": bb.fingerprint(), "dim": int(bb.dim),
            "inputs": list(POST_INPUTS), "outputs": ["probs", "logits"],
            "text": {"max_length": int(bb.max_length), "budget": int(bb.text_budget), "prefix_ids": pre,
                     "suffix_ids": post, "pad_id": int(tok.pad_token_id if tok.pad_token_id is not None else 0)},
            "image": {"side": int(bb.image_size), **transform_spec(int(bb.image_size)),
                      "reduce_to": reduce_side(bb), "max_images": DEFAULT_MAX_IMAGES},
            "clean_config": ext.get("clean_config"), "image_choice": image_choice,
            "calibration": dict(info["calibration"])}


def _example(bb, batch: int, images: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    L, S = bb.max_length, bb.image_size
    ids = torch.randint(100, 1000, (batch, L), generator=g)
    lengths = torch.randint(3, L + 1, (batch,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    pix = torch.randn(batch, images, 3, S, S, generator=g)
    valid = torch.rand(batch, images, generator=g) > 0.3
    valid[:, 0] = True
    valid = valid.cumsum(1) == torch.arange(1, images + 1)[None, :]     # packed first
    if batch > 2:
        valid[1] = False                                                   # a post without images
    tm = torch.rand(batch, generator=g) > 0.2
    tm[0] = True
    return ids, mask, pix, valid, tm


def _export(module: WholePost, example, out: Path) -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install 'sgmft[export]'") from None
    b, m = torch.export.Dim("batch", min=1), torch.export.Dim("images", min=1)
    shapes = {"input_ids": {0: b}, "attention_mask": {0: b}, "pixel_values": {0: b, 1: m},
              "image_valid": {0: b, 1: m}, "text_mask": {0: b}}
    prog = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=shapes, input_names=list(POST_INPUTS),
                             output_names=["probs", "logits"], verbose=False)
    prog.optimize()
    prog.save(str(out), external_data=False)


def verify(module: WholePost, bb, onnx_path: Path, batches=CHECK_BATCHES, seed: int = 11) -> dict:
    """Largest |probability difference| between onnxruntime and the PyTorch module, per batch size."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = {}
    for i, n in enumerate(batches):
        ex = _example(bb, n, 1 + (i % 3), seed + i)
        with torch.inference_mode():
            want = module(*ex)[0].numpy()
        got = sess.run(["probs"], {k: x.numpy() for k, x in zip(POST_INPUTS, ex)})[0]
        out[n] = float(np.max(np.abs(got - want)))
    return out


def export_whole_post(checkpoint, out_dir, *, tol: float = 1e-4, batches=CHECK_BATCHES) -> dict:
    """Export run ``checkpoint`` with its backbone to ``out_dir`` (see the module docstring); verify it."""
    from sgmft.ingest.text import parse_long_text

    t0 = time.perf_counter()
    head, info = load_checkpoint(checkpoint)
    contract = info["contract"]
    ext = contract.extraction or {}
    policy = parse_long_text((ext.get("clean_config") or {}).get("long_text", "truncate"))[0]
    if policy == "chunk-mean":
        raise ExportError("--with-backbone: the run's long-text policy is chunk-mean (several text rows a post), "
                          "which the one-row-a-post graph does not compute; export the head alone")
    bb, notes = _backbone_for(info, contract)
    image_choice = ext.get("image_choice") or "similar"
    head = head.float().eval()
    _graph_friendly_kernels(head)
    module = WholePost(bb.model.float().eval(), head, image_choice=image_choice,
                       temperature=float(info["calibration"].get("temperature", 1.0)),
                       uniform_weight=float(info["calibration"].get("uniform_weight", 0.0)),
                       token_types="token_type_ids" in bb._text_args).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _export(module, _example(bb, 2, 2, 0), onnx_path)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"whole-post export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
            from e
    diffs = verify(module, bb, onnx_path, batches)
    worst = max(diffs.values())
    if not worst <= tol:
        onnx_path.unlink(missing_ok=True)
        raise ExportError(f"the whole-post ONNX graph differs from PyTorch by {worst:.3g} > {tol:g} in probability")
    bb.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    meta = _meta(bb, info, contract, image_choice)
    meta["verified"] = {"max_abs_prob_diff": {str(k): v for k, v in diffs.items()}, "tol": tol}
    atomic.write_text(out / "export.json", json.dumps(meta, ensure_ascii=False, indent=2) + "\n")
    atomic.write_text(out / "README.md", _README.format(labels=", ".join(meta["labels"]), spec=bb.spec))
    return {"format": "onnx", "with_backbone": True, "out": str(out), "arch": info["model_cfg"].arch,
            "backbone": bb.spec, "labels": meta["labels"], "inputs": list(POST_INPUTS),
            "outputs": ["probs", "logits"], "max_abs_diff": worst, "per_batch": diffs,
            "verified_with": "onnxruntime", "notes": notes, "seconds": round(time.perf_counter() - t0, 2)}


_README = """# Whole-post ONNX model (sgmft export --with-backbone)

Backbone `{spec}` + the run's head in `model.onnx`: tokens + pixels -> place probabilities
({labels}). `export.json` says how to make the inputs; `tokenizer.json` is the tokenizer.

Run it without torch or transformers:

    pip install numpy pillow onnxruntime tokenizers jieba stopwordsiso
    pip install --no-deps sgmft          # only the torch-free modules are imported
    python -m sgmft.runner.onnx_runner THIS_FOLDER posts.jsonl --out predictions.jsonl

See docs/backbones.md, "Whole-post ONNX".
"""
