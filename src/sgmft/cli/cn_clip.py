"""``sgmft convert-cn-clip CKPT --out DIR``: an official cn_clip ``.pt`` checkpoint as a
``chinese-clip:``-loadable folder (:mod:`sgmft.features.backbones.cn_clip_convert`; registered in
:data:`sgmft.cli.VERBS`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "convert an official cn_clip .pt checkpoint into a chinese-clip: folder (no cn_clip, no torchvision)"
DESCRIPTION = ("Read a cn_clip checkpoint (ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14 or a fine-tuned one), map "
               "its weights to the transformers ChineseCLIPModel layout as transformers' conversion script does, "
               "and write config.json, model.safetensors, vocab.txt, the tokenizer and preprocessor configs and "
               "cn_clip_source.json to --out. Load it with --backbone chinese-clip:DIR. See docs/backbones.md.")


def cmd_convert_cn_clip(args) -> int:
    from sgmft.features.backbones.cn_clip_convert import convert_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to write into it")
    folder = convert_checkpoint(args.checkpoint, out, vocab=args.vocab)
    src = json.loads((folder / "cn_clip_source.json").read_text(encoding="utf-8"))
    a = src["arch"]
    if args.json:
        print(json.dumps({"out": str(folder), **src}, indent=2))
    else:
        print(f"converted {args.checkpoint} (ViT width {a['vision_width']} x {a['vision_layers']}, patch "
              f"{a['vision_patch_size']}, input {a['image_resolution']}; text {a['text_hidden_size']} x "
              f"{a['text_num_hidden_layers']}; D={a['embed_dim']}) -> {folder}; use --backbone chinese-clip:{folder}")
    return 0


def convert_cn_clip_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("checkpoint", help="the cn_clip .pt file (e.g. clip_cn_vit-h-14.pt)")
    s.add_argument("--out", required=True, help="output folder (loadable as --backbone chinese-clip:OUT)")
    s.add_argument("--vocab", help="BERT vocab.txt (default: the one of the installed cn-clip wheel)")
    s.add_argument("--overwrite", action="store_true", help="write into an existing non-empty folder")
