"""``sgmft export RUN --format onnx|torch-export --out FILE``: the head on features as a
standalone graph (:mod:`sgmft.predict.export`; registered in :data:`sgmft.cli.VERBS`)."""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

HELP = "export the trained head on features to ONNX or torch.export (text, image, masks -> logits)"
DESCRIPTION = ("Write the model of a run as a standalone graph: inputs text and image (float32, B x D), "
               "text_mask and image_mask (bool, B), output logits (B x K, the order of labels.json); "
               "B is dynamic. The file is checked against the PyTorch model on random features "
               "(largest absolute logit difference <= --tol). ONNX needs 'sgmft[export]'. "
               "See docs/predict.md, section Export.")


def cmd_export(args) -> int:
    from sgmft.predict.export import export_model

    if not Path(args.run_dir).exists():
        raise FileNotFoundError(f"run directory not found: {args.run_dir}")
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):   # exporter chatter
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = export_model(args.run_dir, args.format, args.out, tol=args.tol)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    diff = ("not checked (onnxruntime is not installed)" if s["max_abs_diff"] is None
            else f"max |logit difference| {s['max_abs_diff']:.2g} vs PyTorch ({s['verified_with']})")
    print(f"exported {s['arch']} ({args.format}, D={s['dim']}, {len(s['labels'])} places) -> {s['out']}; {diff}")
    return 0


def export_args(s: argparse.ArgumentParser) -> None:
    from sgmft.predict.export import FORMATS

    s.add_argument("run_dir", help="training run directory (or its model/ directory)")
    s.add_argument("--format", required=True, choices=FORMATS, help="onnx, or torch-export (a .pt2 file)")
    s.add_argument("--out", required=True, help="output file (e.g. model.onnx, model.pt2)")
    s.add_argument("--tol", type=float, default=1e-5,
                   help="largest allowed absolute logit difference from the PyTorch model")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
