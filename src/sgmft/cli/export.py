"""``sgmft export RUN --format onnx|torch-export --out FILE``: the head on features as a
standalone graph (:mod:`sgmft.predict.export`; registered in :data:`sgmft.cli.VERBS`)."""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

HELP = ("export the trained head on features to ONNX or torch.export (text, image, masks -> logits); "
        "--with-backbone: the whole post (tokens + pixels -> probabilities) to ONNX")
DESCRIPTION = ("Write the model of a run as a standalone graph: inputs text and image (float32, B x D), "
               "text_mask and image_mask (bool, B), output logits (B x K, the order of labels.json); "
               "B is dynamic. The file is checked against the PyTorch model on random features "
               "(largest absolute logit difference <= --tol). ONNX needs 'sgmft[export]'. "
               "See docs/predict.md, section Export. With --with-backbone, --out is a folder: the backbone's "
               "towers, the run's image choice and head in one ONNX graph (tokens, pixels, masks -> "
               "probabilities; dynamic batch), checked with onnxruntime at batch sizes 1, 7 and 32 "
               "(|probability difference| <= --tol, default 1e-4 there), plus tokenizer.json and export.json "
               "for the torch-free runner `python -m sgmft.runner.onnx_runner` (docs/backbones.md).")


def _cmd_whole_post(args) -> int:
    from sgmft.predict.export_post import export_whole_post

    if args.format != "onnx":
        from sgmft.errors import UserError

        raise UserError("--with-backbone exports to ONNX only: pass --format onnx")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace its files")
    s = export_whole_post(args.run_dir, out, tol=1e-4 if args.tol is None else args.tol)
    if args.json:
        print(json.dumps(s, indent=2, ensure_ascii=False))
        return 0
    per = ", ".join(f"batch {b}: {d:.2g}" for b, d in s["per_batch"].items())
    print(f"exported {s['backbone']} + {s['arch']} (whole post, ONNX, {len(s['labels'])} places) -> {s['out']}; "
          f"max |probability difference| vs PyTorch ({per})")
    for n in s["notes"]:
        print(f"  note: {n}")
    print(f"  run it without torch: python -m sgmft.runner.onnx_runner {s['out']} posts.jsonl")
    return 0


def cmd_export(args) -> int:
    from sgmft.predict.export import export_model

    if args.with_backbone:
        if not Path(args.run_dir).exists():
            raise FileNotFoundError(f"run directory not found: {args.run_dir}")
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        return _cmd_whole_post(args)
    if args.tol is None:
        args.tol = 1e-5
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
    s.add_argument("--tol", type=float, default=None,
                   help="largest allowed absolute difference from the PyTorch model: logits, default 1e-5; "
                        "with --with-backbone probabilities, default 1e-4")
    s.add_argument("--with-backbone", dest="with_backbone", action="store_true",
                   help="export the whole post (backbone towers + image choice + head; --format onnx; --out is a "
                        "folder), for the torch-free runner")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
