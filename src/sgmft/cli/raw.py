"""Raw-post verbs of the ``sgmft`` command line (listed in ``sgmft.cli.VERBS``):

* ``sgmft extract MANIFEST --out STORE --backbone SPEC``   raw posts -> a feature store;
* ``sgmft predict RUN_DIR --text ... --image ...``          one raw post -> place probabilities;
* ``sgmft predict RUN_DIR --manifest FILE --out preds.jsonl|.csv``  many posts;
* ``sgmft predict RUN_DIR --store STORE --out preds.csv|.jsonl``   a feature store (any, labelled or not);
* ``sgmft demo-raw``                                        the raw-post demo, offline.

Errors a user can fix (missing files, a backbone that is unavailable offline or differs
from the training one, an existing output) end with ``sgmft <verb>: error: ...`` and exit
status 2, like the other verbs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from sgmft.cli.output import emit
from sgmft.errors import UserError
from sgmft.ingest.text import CleanConfig

# every on/off switch of CleanConfig gets a --no-<step> flag
CLEAN_STEPS = tuple(f.name for f in dataclasses.fields(CleanConfig) if f.type in (bool, "bool"))


def _hf_progress_bars(enabled: bool):
    from sgmft.features.backbones.hf_clip import hf_progress_bars

    return hf_progress_bars(enabled)


def clean_config_from_args(args) -> CleanConfig:
    off = {step: False for step in CLEAN_STEPS if getattr(args, f"no_{step}", False)}
    if args.user_dict and not Path(args.user_dict).is_file():
        raise FileNotFoundError(f"--user-dict: file not found: {args.user_dict}")
    from sgmft.ingest.text import clean_config   # the one config builder: errors in the common shape

    return clean_config({**off, "user_dict": str(Path(args.user_dict).resolve()) if args.user_dict else None,
                         "long_text": getattr(args, "long_text", None) or "truncate"})


def input_safety_kwargs(args) -> dict:
    """``image_root``, ``allow_any_path``, ``field_limits`` and ``max_images`` from the flags
    of :func:`input_safety_args` (shared by extract and predict --manifest)."""
    mi = args.max_images if args.max_images > 0 else None
    return dict(image_root=args.image_root, allow_any_path=args.allow_any_path, max_images=mi,
                field_limits={f"max_{k}_chars": (getattr(args, f"max_{k}_chars") or None)
                              for k in ("id", "user", "text")})


def input_safety_args(s: argparse.ArgumentParser) -> None:
    from sgmft.features.encode import DEFAULT_MAX_IMAGES
    from sgmft.ingest.manifest import DEFAULT_MAX_ID_CHARS, DEFAULT_MAX_TEXT_CHARS, DEFAULT_MAX_USER_CHARS

    g = s.add_argument_group("input safety (docs/posts-manifest.md)")
    g.add_argument("--image-root", dest="image_root",
                   help="image paths must resolve inside this folder (default: the manifest's folder)")
    g.add_argument("--allow-any-path", dest="allow_any_path", action="store_true",
                   help="do not confine image paths (trusted manifests only)")
    g.add_argument("--max-images", dest="max_images", type=int, default=DEFAULT_MAX_IMAGES,
                   help=f"images used per post; the rest are rejected (default {DEFAULT_MAX_IMAGES}; 0 = no limit)")
    for k, d in (("id", DEFAULT_MAX_ID_CHARS), ("user", DEFAULT_MAX_USER_CHARS), ("text", DEFAULT_MAX_TEXT_CHARS)):
        g.add_argument(f"--max-{k}-chars", dest=f"max_{k}_chars", type=int, default=d,
                       help=f"reject rows whose '{k}' is longer (default {d}; 0 = no limit)")


# -- extract -------------------------------------------------------------------------------------
def _extract_dtype(args) -> str:
    """``--precision`` (fp32/bf16/int8) and the older ``--dtype``: one of them, or both agreeing."""
    from sgmft.features.backbones.base import canonical_precision

    prec = getattr(args, "precision", None)
    if prec is None:
        return args.dtype
    if args.dtype != "auto" and canonical_precision(args.dtype) != canonical_precision(prec):
        raise UserError(f"--precision {prec} and --dtype {args.dtype} disagree; give only --precision")
    return canonical_precision(prec)


def cmd_extract(args) -> int:
    from sgmft.cli.output import progress_on, quiet_stdout
    from sgmft.features.extract import extract_features
    from sgmft.features.extract_options import ExtractOptions

    out = Path(args.out)
    rejects = Path(args.rejects) if args.rejects else out.with_name(out.name + ".rejects.jsonl")
    progress = progress_on(args)
    opts = ExtractOptions(  # the flags, one to one (docs/extract.md)
        clean_cfg=clean_config_from_args(args), image_choice=args.image_choice, batch_size=args.batch_size,
        cache_dir=args.cache_dir, rejects_path=rejects, on_error="raise" if args.strict else "skip",
        progress=progress, device=args.device, dtype=_extract_dtype(args), num_processes=args.num_processes,
        threads=args.threads, overwrite=args.overwrite, keep_cache=not args.no_cache_keep,
        **input_safety_kwargs(args), prefetch_bytes=int(args.prefetch_mb * 2**20), engine=args.engine,
        **engine_kwargs(args), **({"label_names": label_names_arg(args.label_names)} if args.label_names else {}))
    with _hf_progress_bars(progress), quiet_stdout(args):
        res = extract_features(args.manifest, out, backbone=args.backbone, options=opts)
    from sgmft.features import FeatureStore

    fs = FeatureStore.open(res.store_path)
    n_rows = len({r.line for r in res.rejects if r.stage == "manifest"})
    _check_rejected_rows(res, n_rows, args.max_rejected, rejects)
    if args.json:     # the Python result's one JSON form (ExtractResult.to_dict), plus what the CLI chose
        print(json.dumps({**res.to_dict(args.show_rejects), "backbone": fs.backbone, "dim": fs.dim,
                          "image_choice": args.image_choice, "engine": args.engine, "rejects_path": str(rejects)},
                         ensure_ascii=False, indent=2))
        return 0
    print(f"extracted {res.num_posts} posts -> {res.store_path}  (backbone {fs.backbone}, D={fs.dim}, "
          f"image choice {args.image_choice})")
    print(f"  encoded {res.encoded}, from cache {res.cached_hits}  ({res.seconds:.1f} s, "
          + (f"ray: {res.engine['actors']} replica(s) x {res.engine['threads']} thread(s)"
             f"{' on GPUs' if res.engine['gpu'] else ''}, start-up {res.engine['startup_s']:.1f} s)"
             if res.engine else f"{res.world_size} process{'es' if res.world_size > 1 else ''})"))
    print(f"  masks: {res.text_missing} post(s) without usable text (text_mask False), "
          f"{res.image_missing} without a usable image (image_mask False)")
    print(f"  long texts: {res.text_over} post(s) longer than the text encoder's context, {res.text_cut} "
          f"of them seen only in part (--long-text {getattr(args, 'long_text', None) or 'truncate'})")
    print(f"  rejects: {res.num_rejects} ({n_rows} manifest row(s) dropped, {res.images_rejected} image "
          f"file(s) unusable) -> {rejects}")
    for r in res.rejects[:args.show_rejects]:
        print(f"    line {r.line} [{r.id or '-'}] {r.field}: {r.reason}")
    if res.num_rejects > args.show_rejects:
        print(f"    ... {res.num_rejects - args.show_rejects} more in {rejects}")
    return 0


def label_names_arg(value: str) -> list[str]:
    """``--label-names``: ``a,b,c`` or ``@FILE`` (one name a line, UTF-8); unique, non-empty."""
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise FileNotFoundError(f"--label-names: file not found: {path}")
        names = [x.strip() for x in path.read_text(encoding="utf-8-sig").splitlines() if x.strip()]
    else:
        names = [x.strip() for x in value.split(",")]
    dup = sorted({n for n in names if names.count(n) > 1})
    if len(names) < 2 or not all(names) or dup:
        raise UserError(f"--label-names {value!r}: give at least two distinct, non-empty names "
                        f"(comma-separated or @FILE){f'; repeated: {dup}' if dup else ''}")
    return names


def _check_rejected_rows(res, n_rows: int, max_rejected: float, rejects: Path) -> None:
    """A manifest whose rows are (almost) all rejected is an error, not a store of the few
    left: more than ``max_rejected`` (a fraction) of the rows dropped ends with exit status 2."""
    total = res.num_posts + n_rows
    if total == 0 or n_rows / total <= max_rejected:
        return
    from collections import Counter

    from sgmft.errors import InputError

    why = Counter(f"{r.field}: {r.reason}" for r in res.rejects if r.stage == "manifest").most_common(3)
    raise InputError(
        f"{n_rows} of {total} manifest rows were rejected ({100 * n_rows / total:.0f} %, over --max-rejected "
        f"{max_rejected:g}); most common: " + "; ".join(f"{w} (x{c})" for w, c in why)
        + f". The store {res.store_path} holds only {res.num_posts} post(s); fix the manifest "
        f"(docs/posts-manifest.md; every reject is in {rejects}) or pass --max-rejected 1 to keep it")


def engine_kwargs(args) -> dict:
    """``address``, ``num_cpus``, ``actors`` of the Ray engine from :func:`engine_args`'s flags
    (empty for ``--engine local``)."""
    if args.engine != "ray":
        if args.address or args.ray_cpus or args.actors:
            raise UserError("--address, --ray-cpus and --actors need --engine ray")
        return {}
    return dict(address=args.address, num_cpus=args.ray_cpus, actors=args.actors)


def engine_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("engine (docs/scale.md)")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (and --num-processes); ray: Ray Data, on a local Ray instance or a "
                        "cluster (pip install 'sgmft[ray]'); same results either way")
    g.add_argument("--address", help="ray: the cluster to join ('auto' = the one this node was `ray start`ed in, "
                                     "or ray://HOST:10001); default: start a local Ray instance")
    g.add_argument("--ray-cpus", dest="ray_cpus", type=int, help="ray: CPUs of the local Ray instance (default: all)")
    g.add_argument("--actors", type=int, help="ray: backbone replicas (default: one per GPU; on CPUs, "
                                             "CPUs // (threads + 1), with --threads torch threads each, default min(4, CPUs))")


# -- predict -------------------------------------------------------------------------------------
def _predictor_kwargs(args) -> dict:
    return dict(backbone=args.backbone, batch_size=args.batch_size, check_backbone=not args.ignore_backbone_mismatch,
                precision=args.precision, allow_precision_mismatch=args.allow_precision_mismatch)


def _load_predictor(args):
    from sgmft.predict import PostPredictor

    from sgmft.cli.output import progress_on

    # no "Loading weights" bar around a one-post answer
    with _hf_progress_bars(bool(args.manifest) and progress_on(args)):
        pp = PostPredictor.load(args.run_dir, device=args.device, **_predictor_kwargs(args))
    from sgmft.errors import note

    for text in pp.notes:          # the one warning channel: `sgmft predict: note: ...`
        note(text)
    return pp


def format_prediction(res: dict, width: int = 30) -> str:
    """A small table: the top place, then every place with its probability and a bar."""
    flag = "  UNCERTAIN (below --min-confidence)" if res.get("uncertain") else ""
    lines = [f"top place: {res['label']}  (p = {res['prob']:.3f}){flag}", "", f"{'place':<12s} {'prob':>6s}"]
    for name, p in sorted(res["probs"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<12s} {p:6.3f}  {'#' * int(round(p * width))}")
    img = res["image_used"]
    img = ", ".join(img) if isinstance(img, list) else img
    lines += ["", f"text used : {res['text_used'] or '(none)'}", f"image used: {img or '(none)'}"]
    if res.get("explanation"):
        lines.append(f"why       : {res['explanation']['sentence']}")
    lines += [f"warning: {w}" for w in res["warnings"]]
    return "\n".join(lines)


def _predict_store(args) -> int:
    from sgmft.features.backbones.base import resolve_device
    from sgmft.predict import Predictor

    if args.text is not None or args.image or args.manifest:
        raise UserError("give --store, or --manifest, or --text/--image, not several")
    if not args.out:
        raise UserError("--store needs --out FILE (.csv or .jsonl)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pred = Predictor.load(args.run_dir, device=str(resolve_device(args.device)))
    from sgmft.cli.output import progress_on

    s = pred.predict_store_to_file(args.store, args.out, split=args.split, progress=progress_on(args),
                                   allow_precision_mismatch=args.allow_precision_mismatch,
                                   min_confidence=args.min_confidence)
    emit(args, s, "\n".join(_summary_lines(s, f"predicted {s['posts']} posts of {s['store']} -> {s['out']}")))
    return 0


def _summary_lines(s: dict, head: str) -> list[str]:
    """The human summary shared by ``predict --store`` and ``predict --manifest``."""
    lines = [f"{head}  ({s['seconds']:.1f} s)"]
    if s["predicted"]:
        top = sorted(s["predicted"].items(), key=lambda kv: -kv[1])
        lines.append("  top places: " + ", ".join(f"{k} {v}" for k, v in top))
    if "uncertain" in s:
        lines.append(f"  uncertain (top probability below {s['min_confidence']:g}): {s['uncertain']} of {s['posts']}")
    if "accuracy" in s:
        lines.append(f"  accuracy on the {s['labelled']} labelled posts: {s['accuracy']:.4f}")
    return lines


def cmd_predict(args) -> int:
    if not Path(args.run_dir).exists():
        raise FileNotFoundError(f"run directory not found: {args.run_dir}")
    ray_kw = engine_kwargs(args)
    if args.engine == "ray" and not args.manifest:
        raise UserError("--engine ray is for --manifest (batch prediction of raw posts)")
    if args.store:
        return _predict_store(args)
    single = args.text is not None or bool(args.image)
    if args.manifest and single:
        raise UserError("give either --manifest or --text/--image, not both")
    if not args.manifest and not single:
        raise UserError("give a post (--text and/or --image), --manifest FILE --out FILE, "
                        "or --store STORE --out FILE")
    if args.manifest and not args.out:
        raise UserError("--manifest needs --out FILE (.jsonl or .csv)")
    if args.manifest and not Path(args.manifest).is_file():
        raise FileNotFoundError(f"manifest not found: {args.manifest}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pp = _load_predictor(args)
    kw = input_safety_kwargs(args)
    pp.max_images = kw.pop("max_images")
    kw["min_confidence"] = args.min_confidence
    if not args.manifest:
        res = pp.predict_post(args.text or "", args.image or [], min_confidence=args.min_confidence)
        print(json.dumps(res, ensure_ascii=False, indent=2) if args.json else format_prediction(res))
        return 0
    from sgmft.cli.output import progress_on

    if args.engine == "ray":
        from sgmft.predict.ray_predict import predict_manifest_ray

        s = predict_manifest_ray(pp, args.manifest, args.out, args.rejects, run_dir=args.run_dir,
                                 load_kwargs=_predictor_kwargs(args), device=args.device, threads=args.threads,
                                 progress=progress_on(args), **ray_kw, **kw)
    else:
        s = pp.predict_manifest(args.manifest, args.out, args.rejects, progress=progress_on(args), **kw)
    lines = _summary_lines(s, f"predicted {s['posts']} posts -> {s['out']}")
    lines.append(f"  masks: {s['text_missing']} post(s) without usable text, {s['image_missing']} without a "
                 "usable image")
    lines.append(f"  rejects: {s['rejects']} ({s['rows_rejected']} manifest row(s) skipped, "
                 f"{s['images_rejected']} image file(s) unusable) -> {s['rejects_path']}")
    emit(args, s, "\n".join(lines))
    return 0


# -- demo-raw ------------------------------------------------------------------------------------
def cmd_demo_raw(args) -> int:
    from sgmft.cli.output import emit, progress_on, quiet_stdout
    from sgmft.experiments.raw_demo import run_raw_demo

    with quiet_stdout(args):
        summary = run_raw_demo(args.out, backbone=args.backbone, num_posts=args.posts, epochs=args.epochs,
                               threads=args.threads, progress=progress_on(args))
    emit(args, {**summary, "out": str(args.out)}, "")
    return 0


# -- options of each verb (the verb table is sgmft.cli.VERBS) -------------------------------
EXTRACT_HELP = "raw posts (manifest + images) -> feature store, with a frozen backbone"
EXTRACT_DESCRIPTION = ("Clean texts, load images robustly, encode both with a frozen backbone and write a "
    "feature store with text/image masks. Bad rows and image files are skipped and listed "
    "in a rejects file; finished batches are cached, so an interrupted run resumes. "
    "See docs/extract.md.")


class _ExplainHardware(argparse.Action):
    """``--explain-hardware``: print the report and exit, like ``--version`` (no manifest needed)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from sgmft.features.backbones.precision import explain_hardware

        print(explain_hardware(), flush=True)
        parser.exit(0)


def extract_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("manifest", help="post manifest (.jsonl or .csv; docs/posts-manifest.md)")
    s.add_argument("--out", required=True, help="feature-store directory to write")
    s.add_argument("--backbone", required=True,
                   help="e.g. chinese-clip:/models/chinese-clip-vit-huge-patch14 (docs/backbones.md)")
    s.add_argument("--image-choice", dest="image_choice", default="similar", choices=["similar", "first", "mean"],
                   help="which image vector a multi-image post gets")
    s.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="posts per batch")
    s.add_argument("--cache-dir", dest="cache_dir", help="batch cache (default: <out>.cache)")
    s.add_argument("--no-cache-keep", dest="no_cache_keep", action="store_true",
                   help="delete the cache after a successful run")
    s.add_argument("--rejects", help="rejects JSONL (default: <out>.rejects.jsonl)")
    s.add_argument("--strict", action="store_true", help="stop at the first bad row or image instead of skipping")
    s.add_argument("--num-processes", dest="num_processes", type=int, default=1,
                   help="local worker processes (GPUs: one per device)")
    s.add_argument("--threads", type=int, help="torch CPU threads per process")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    s.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on CUDA; on CPU bf16 with AMX, int8 with "
                   "VNNI, else fp32), float32, ...")
    s.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8", "auto"], default=None,
                   help="compute precision of the same checkpoint: fp32, bf16 (bf16 weights + autocast), fp16 "
                        "(autocast), int8 "
                        "(dynamic quantisation of the Linear layers, CPU), auto (the machine's choice, printed "
                        "with its reason); recorded in the store and in models "
                        "trained on it (docs/scale.md). Default: --dtype")
    s.add_argument("--explain-hardware", action=_ExplainHardware, nargs=0,
                   help="print this CPU's GEMM ceiling (fp32/bf16/fp16/int8), its AMX/VNNI flags and the "
                        "precision --precision auto picks, with the reason, then exit without extracting")
    s.add_argument("--overwrite", action="store_true", help="replace an existing store")
    s.add_argument("--show-rejects", dest="show_rejects", type=int, default=10, help="rejects to print")
    s.add_argument("--max-rejected", dest="max_rejected", type=float, default=0.5, metavar="FRACTION",
                   help="fail (exit 2) when more than this fraction of the manifest's rows are rejected "
                        "(default 0.5; 1 = never); the store is still written")
    s.add_argument("--label-names", dest="label_names", metavar="NAMES",
                   help="the place names a row's 'label' may take, comma-separated (e.g. 家,餐厅,学校), or @FILE "
                        "with one name a line; their order is the label index order (default: the 8 names of "
                        "docs/posts-manifest.md)")
    s.add_argument("--prefetch-mb", dest="prefetch_mb", type=float, default=512,
                   help="memory for prepared batches waiting for the model, in MiB (default 512)")
    input_safety_args(s)
    engine_args(s)
    g = s.add_argument_group("text cleaning (docs/text-cleaning.md; every step is on by default)")
    for step in CLEAN_STEPS:
        g.add_argument(f"--no-{step}", dest=f"no_{step}", action="store_true", help=f"skip the '{step}' step")
    g.add_argument("--user-dict", dest="user_dict", help="jieba user dictionary file")
    g.add_argument("--long-text", dest="long_text", default="truncate", metavar="POLICY",
                   help="a text longer than the encoder's context (52 tokens): truncate, head-tail[:H] or "
                        "chunk-mean[:K] (docs/backbones.md, Long posts)")


PREDICT_HELP = ("predict the place of a raw post (--text/--image), of every post of a manifest, "
                "or of every post of a feature store (--store)")
PREDICT_DESCRIPTION = ("Uses the backbone, text cleaning and image choice the run's features were extracted "
    "with. Single post: prints the top place and every probability (--json for JSON). "
    "Manifest: writes one row per post (.jsonl or .csv) and a rejects file. "
    "Feature store (--store, any store: SimFeat, your own features, labelled or not): writes one row "
    "per post. Files follow one schema: id, pred, prob_<place>..., true (when known). "
    "See docs/predict.md.")


def predict_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("run_dir", help="training run directory (or its model/ directory)")
    s.add_argument("--text", help="the post's raw text")
    s.add_argument("--image", action="append", metavar="PATH", help="an image of the post (repeatable)")
    s.add_argument("--manifest", help="predict every post of this manifest instead")
    s.add_argument("--store", help="predict every post of this feature store (no backbone needed)")
    s.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                   help="store mode: all posts, or one split taken as `sgmft evaluate` takes it (the run's own "
                        "saved split when the run was trained on this store, else the store's split.npy)")
    s.add_argument("--out", help="manifest / store mode: output file, .csv or .jsonl (any other suffix)")
    s.add_argument("--rejects", help="manifest mode: rejects JSONL (default: <out stem>.rejects.jsonl)")
    s.add_argument("--backbone", help="backbone spec (default: the one recorded in the checkpoint)")
    s.add_argument("--ignore-backbone-mismatch", dest="ignore_backbone_mismatch", action="store_true",
                   help="allow a backbone whose fingerprint differs from the training one (a warning instead)")
    s.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8", "auto"], default=None,
                   help="backbone precision (default: the one the training features were extracted at)")
    s.add_argument("--allow-precision-mismatch", dest="allow_precision_mismatch", action="store_true",
                   help="accept a --precision other than the training features' one (a note instead of an error)")
    s.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="posts per backbone batch")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--min-confidence", dest="min_confidence", type=_probability, default=None, metavar="P",
                   help="mark posts whose top (calibrated) probability is below P (0..1) as uncertain; their "
                        "probabilities are kept (docs/predict.md, 'When to trust a probability')")
    input_safety_args(s)
    engine_args(s)


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}")
    return v


DEMO_RAW_HELP = "offline raw-post demo: SimPosts -> extract -> train -> evaluate -> predict"
DEMO_RAW_DESCRIPTION = ("Generates SimPosts (Weibo-like posts with image files), builds a tiny RANDOM "
    "Chinese-CLIP unless --backbone names real weights, extracts features, trains the "
    "recommended SG-MFT preset, evaluates it, shows the rejects of a small dirty corpus "
    "and predicts 5 new posts. With the random backbone the numbers show that the "
    "pipeline works, not the accuracy of a real model.")


def demo_raw_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", default="reports/demo-raw", help="report folder (posts, store, run inside)")
    s.add_argument("--backbone", help="a real backbone spec instead of the tiny random Chinese-CLIP")
    s.add_argument("--posts", type=int, default=600, help="SimPosts posts for training and evaluation")
    s.add_argument("--epochs", type=int, default=30, help="training epochs of the demo's SG-MFT")
    s.add_argument("--threads", type=int, help="torch threads (default: half the CPU cores)")
