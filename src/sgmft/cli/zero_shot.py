"""``sgmft zero-shot --backbone SPEC --out RUN``: a CLIP zero-shot run from prompts, with no labels
and no training (:mod:`sgmft.predict.zero_shot`; registered in :data:`sgmft.cli.VERBS`)."""

from __future__ import annotations

import argparse
import json

HELP = "make a zero-shot run from Chinese prompts (no labels, no training) that predict/serve/evaluate accept"
DESCRIPTION = ("Encode Chinese prompt templates x place names with the backbone's text tower, average them per "
               "place (prompt ensembling) and write a run folder whose 'zeroshot' head scores posts by CLIP's "
               "scaled cosine of their text and image with each place. Its accuracy depends on real Chinese-CLIP "
               "weights: measure it with `sgmft evaluate` on labelled posts. See docs/backbones.md, Zero-shot.")


def cmd_zero_shot(args) -> int:
    from sgmft.cli.raw import clean_config_from_args
    from sgmft.predict.zero_shot import build_zero_shot

    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    kw = {"labels": labels} if labels else {}
    s = build_zero_shot(args.backbone, args.out, prompts=args.prompts, text_weight=args.text_weight,
                        clean_cfg=clean_config_from_args(args), image_choice=args.image_choice,
                        overwrite=args.overwrite, device=args.device, dtype=args.precision, **kw)
    if args.json:
        print(json.dumps(s, ensure_ascii=False, indent=2))
    else:
        n = sum(s["num_prompts"].values())
        print(f"zero-shot run -> {args.out}  (backbone {s['backbone']}, D={s['dim']}, {len(s['labels'])} places, "
              f"{n} prompts, text weight {s['text_weight']}, logit scale {s['logit_scale']:.2f})")
        print(f"  use it like a trained run: sgmft predict {args.out} ..., sgmft evaluate {args.out} STORE")
    return 0


def zero_shot_args(s: argparse.ArgumentParser) -> None:
    from sgmft.features.encode import IMAGE_CHOICES

    s.add_argument("--backbone", default="chinese-clip:OFA-Sys/chinese-clip-vit-huge-patch14",
                   help="backbone spec (docs/backbones.md); predict and serve will use the same")
    s.add_argument("--out", required=True, help="the run folder to write")
    s.add_argument("--prompts", help="JSON {\"templates\": [\"我在{}\", ...], \"labels\": {\"gym\": [\"健身房\"], ...}} "
                                     "(default: sgmft's Chinese templates and names)")
    s.add_argument("--labels", help="comma-separated places, in output order (default: the paper's eight)")
    s.add_argument("--text-weight", dest="text_weight", type=float, default=0.5,
                   help="weight of the text score against the image score, in [0, 1]")
    s.add_argument("--image-choice", dest="image_choice", default="similar", choices=IMAGE_CHOICES,
                   help="which image of a post predict uses (as in sgmft extract)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    s.add_argument("--precision", default="auto", help="auto, fp32, bf16, fp16 or int8 (as in sgmft extract)")
    s.add_argument("--overwrite", action="store_true", help="write into an existing non-empty folder")
    g = s.add_argument_group("text cleaning of the posts predict will see (docs/text-cleaning.md)")
    from sgmft.cli.raw import CLEAN_STEPS

    for step in CLEAN_STEPS:
        g.add_argument(f"--no-{step}", dest=f"no_{step}", action="store_true", help=f"skip the '{step}' step")
    g.add_argument("--user-dict", dest="user_dict", help="jieba user dictionary file")
    g.add_argument("--long-text", dest="long_text", default="truncate", metavar="POLICY",
                   help="truncate, head-tail[:H] or chunk-mean[:K] (docs/backbones.md, Long posts)")
