"""``sgmft`` command line: a thin layer over the Python API.

:data:`VERBS` is the one verb table: each verb maps to a command function that calls one
API function, and to the function that declares its options. The feature verbs live here,
the raw-post verbs in :mod:`sgmft.cli.raw` and the experiment suite in
:mod:`sgmft.cli.experiments`. Every exception in :data:`sgmft.errors.USER_ERRORS` (errors
a user can fix: :class:`sgmft.errors.SgmftError` and the OS's file errors) ends as
``sgmft VERB: error: <message>`` with exit status 2; any other exception is a bug and keeps its
traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sgmft import __version__

from sgmft.cli import cn_clip as _cn_clip
from sgmft.cli import experiments as _experiments
from sgmft.cli import export as _export
from sgmft.cli import raw as _raw
from sgmft.cli import serve as _serve
from sgmft.cli import zero_shot as _zero_shot
from sgmft.cli import store as _store
from sgmft.cli.output import emit, progress_on, quiet_stdout
from sgmft.errors import USER_ERRORS, UserError


def _overrides(items: list[str] | None) -> tuple[list[str], list[str]]:
    """Split ``--set model.x=1 --set train.lr=1e-3`` into model and train override lists."""
    model, train = [], []
    for item in items or []:
        section, _, rest = item.partition(".")
        if section == "model" and rest:
            model.append(rest)
        elif section == "train" and rest:
            train.append(rest)
        else:
            raise UserError(f"--set {item!r}: write model.<field>=<value> or train.<field>=<value>")
    return model, train


def _count_arg(value: str) -> int:
    """A whole number >= 0 (argparse type)."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number >= 0")
    return n


def _devices_arg(value: str):
    from sgmft.config import parse_devices

    v = parse_devices(value)
    if isinstance(v, str) and v != "auto":
        raise argparse.ArgumentTypeError(f"{value!r}: expected a count, 'auto', or device indices such as 0,1")
    return v


def _resolved_preset(args, store=None):
    """The preset after ``--set`` and the train flags, checked field by field and against what the
    architecture reads (:func:`sgmft.models.registry.resolve_model`: a field it does not read or
    a misspelt option is refused). With ``store``, ``dim`` and ``num_classes`` come from it, as
    training would set them."""
    import dataclasses

    from sgmft.config import DEFAULT_PRESET, apply_overrides, load_preset, replace_checked
    from sgmft.models.registry import apply_model_overrides, resolve_model

    p = load_preset(args.preset or DEFAULT_PRESET)
    mo, tr = _overrides(args.set)
    if p.candidates and mo:                 # a selecting preset has no model of its own
        raise UserError(f"preset {p.name!r} chooses between the presets {', '.join(p.candidates)} and has no model "
                        f"options of its own; to set {', '.join('model.' + m.split('=')[0] for m in mo)}, train "
                        f"one of them: --preset {p.candidates[0]} --set ...")
    if not p.candidates:
        p.model = apply_model_overrides(p.model, mo, "model")
    p.train = apply_overrides(p.train, tr, "train")
    flags = {key: getattr(args, key) for key in ("epochs", "seed", "devices", "strategy", "accelerator",
                                                 "num_nodes", "batch_size", "lr", "tensorboard")
             if getattr(args, key, None) is not None}
    if getattr(args, "progress", None) is not None:     # --progress / --no-progress; else: TTY only
        flags["progress"] = args.progress
    p.train = replace_checked(p.train, "train options", **flags)
    if p.candidates:
        return p
    if store is not None:
        from sgmft.features import FeatureStore

        fs = FeatureStore.open(store)
        p.model = dataclasses.replace(p.model, dim=fs.dim, num_classes=len(fs.label_names))
    p.model = resolve_model(p.model, where=f"preset {p.name}: model")
    return p


def cmd_presets(args) -> int:
    from sgmft.config import DEFAULT_PRESET, list_presets, load_preset
    from sgmft.models import FUSIONS, list_models

    presets = []
    for name in list_presets():
        p = load_preset(name)
        arch = "select:" + "|".join(p.candidates) if p.candidates else p.model.arch   # auto: no model of its own
        presets.append({"name": name, "arch": arch, "fusion": getattr(p.model, "fusion", None)
                        if arch == "sgmft" else None, "default": name == DEFAULT_PRESET,
                        "candidates": list(p.candidates) or None, "description": p.description})
    doc = {"default": DEFAULT_PRESET, "presets": presets, "architectures": list_models(), "fusions": FUSIONS.names()}
    def short(text: str, width: int = 78) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width - 3].rsplit(" ", 1)[0] + " ..."

    lines = [f"{'*' if p['default'] else ' '} {p['name']:14s} arch={p['arch']:14s} {short(p['description'])}"
             for p in presets]
    lines += ["", f"* default preset: {DEFAULT_PRESET} (what `sgmft train` uses without --preset); "
              "sgmft is the recommended reading of the paper's SG-MFT, paper its literal reading",
              "", "registered architectures: " + ", ".join(doc["architectures"]),
              "registered fusions (model.fusion, with arch sgmft): " + ", ".join(doc["fusions"])]
    emit(args, doc, "\n".join(lines))
    return 0


def _simfeat_config(args):
    """The profile's SimFeatConfig with the flags and ``--set`` on top. A post count given
    without a test size keeps the profile's test fraction (20 % by default): ``--num-posts 600``
    holds out 120 test posts."""
    from sgmft.data.simfeat import parse_overrides, profile_config

    changes = list(args.set or [])
    for key in ("num_posts", "dim", "seed"):
        if getattr(args, key, None) is not None:
            changes.append(f"{key}={getattr(args, key)}")
    overrides = parse_overrides(changes)
    if "num_posts" in overrides and "test_size" not in overrides:
        base = profile_config(args.profile)
        overrides["test_size"] = max(1, round(int(overrides["num_posts"]) * base.test_size / base.num_posts))
    return profile_config(args.profile, **overrides)


def _simulate_out(args) -> str:
    """The output folder, given as ``OUT`` or as ``--out OUT`` (every other verb's spelling)."""
    given = [o for o in (args.out, args.out_option) if o is not None]
    if not given:
        raise UserError("give the output feature-store folder: sgmft simulate OUT (or --out OUT)")
    if len(given) == 2 and Path(given[0]) != Path(given[1]):
        raise UserError(f"two output folders: {given[0]} and --out {given[1]}; give one")
    return given[0]


def cmd_simulate(args) -> int:
    from sgmft.data.simfeat import write_simfeat

    args.out = _simulate_out(args)
    path = write_simfeat(args.out, _simfeat_config(args), overwrite=args.overwrite)
    from sgmft.features import FeatureStore

    fs = FeatureStore.open(path)
    sim = fs.meta.get("extra", {}).get("simfeat", {})
    emit(args, {"store": str(path), "num_posts": len(fs), "dim": fs.dim,
                "test_size": (sim.get("config") or {}).get("test_size"), "oracle": sim.get("oracle", {})})
    return 0


def cmd_simfeat_report(args) -> int:
    from sgmft.data.simfeat import proxy_report

    with quiet_stdout(args):
        report = proxy_report(_simfeat_config(args), epochs=args.epochs, dropout=args.dropout,
                              logreg=not args.no_logreg)
    emit(args, report)
    return 0


def cmd_train(args) -> int:
    if args.print_config:
        p = _resolved_preset(args, store=args.store)
        import yaml

        from sgmft.models.registry import model_view

        d = p.to_dict()
        doc = ({"preset": p.name, "candidates": d["candidates"], "train": d["train"]} if p.candidates else
               {"preset": p.name, "model": model_view(p.model), "train": d["train"]})
        emit(args, doc, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).rstrip("\n"))
        return 0
    if args.store is None or args.out is None:
        raise UserError("train needs a feature store and --out RUN (or --print-config)")
    from sgmft.train import train

    p = _resolved_preset(args)
    # Lightning draws its bars on stdout: send them (and its messages) to stderr, so stdout
    # holds only the result
    with contextlib.redirect_stdout(sys.stderr):
        res = train(args.store, args.out, p, overwrite=args.overwrite)
    doc = {"run_dir": str(res.run_dir), "checkpoint": str(res.checkpoint), "best_val_acc": res.best_val_acc,
           "seconds": round(res.seconds, 2), "status": res.status}
    if res.status == "complete":
        text = (f"{res.run_dir}: already complete (same configuration, store and seed); nothing changed. "
                "Use --overwrite to train it again.")
    elif res.best_val_acc is not None:
        text = f"best val_acc {res.best_val_acc:.4f}; model exported to {res.checkpoint}"
    else:
        text = f"model exported to {res.checkpoint}"
    emit(args, doc, text)
    return 0


def cmd_evaluate(args) -> int:
    from sgmft.eval.run import default_report_dir, evaluate

    out = args.out or str(default_report_dir(args.checkpoint, args.split))
    with quiet_stdout(args):
        m = evaluate(args.checkpoint, args.store, out, split=args.split, tsne_max_points=args.tsne_points,
                     progress=progress_on(args))
    keep = {k: m[k] for k in ("accuracy", "macro_f1", "num_samples", "oracle_accuracy",
                              "accuracy_over_oracle", "ece", "ece_bins", "nll", "brier", "calibration",
                              "risk_coverage") if k in m}
    if m.get("accuracy_by_regime"):
        keep["accuracy_by_regime"] = m["accuracy_by_regime"]
    emit(args, {**keep, "split": args.split, "report": str(out)})   # stdout: one JSON document
    if m.get("accuracy_by_regime"):                                  # stderr: the same, as a table
        from sgmft.eval.metrics import regime_table

        note = "" if m.get("oracle_accuracy") is not None else " (known only on a generator's own test split)"
        print("\naccuracy by regime (%):\n" + regime_table({"model": m["accuracy_by_regime"]}, note),
              file=sys.stderr)
    if m.get("risk_coverage"):                                       # stderr: abstention, in words
        for t, c in m["risk_coverage"]["coverage_at_accuracy"].items():
            how = (f"{100 * c['coverage']:.1f} % of posts (--min-confidence {c['min_confidence']:.3f})"
                   if c["min_confidence"] is not None else "no posts")
            print(f"coverage at {100 * float(t):g} % accuracy: {how}", file=sys.stderr)
    print(f"report written to {out}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from sgmft.experiments.demo import run_demo

    with quiet_stdout(args):
        summary = run_demo(args.out, quick=args.quick, seeds=args.seeds, progress=progress_on(args),
                           profile=args.profile, epochs=args.epochs)
    emit(args, {**summary, "out": str(args.out)}, "")
    return 0


# -- options of each verb ------------------------------------------------------------------------
def _presets_args(s: argparse.ArgumentParser) -> None:
    pass


def _simfeat_args(s: argparse.ArgumentParser) -> None:
    from sgmft.data.simfeat import PROFILES

    s.add_argument("--profile", default="default", choices=sorted(PROFILES),
                   help="start from this profile's settings (docs/simfeat.md)")
    s.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any SimFeatConfig field, e.g. --set test_size=500 (repeatable)")


def _simulate_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("out", nargs="?", help="output feature-store directory (or --out OUT, as the other verbs take it)")
    s.add_argument("--out", dest="out_option", metavar="OUT", help=argparse.SUPPRESS)
    s.add_argument("--num-posts", type=int, dest="num_posts",
                   help="posts in total (profile default: 17000); the test part keeps the profile's "
                        "fraction (20 %%) unless --set test_size=N")
    s.add_argument("--dim", type=int, help="feature width D (profile default: 1024)")
    s.add_argument("--seed", type=int, help="generator seed (profile default: 0)")
    _simfeat_args(s)
    s.add_argument("--overwrite", action="store_true", help="replace an existing store at OUT")


def _simfeat_report_args(s: argparse.ArgumentParser) -> None:
    _simfeat_args(s)
    s.add_argument("--epochs", type=int, default=20, help="MLP proxy epochs")
    s.add_argument("--dropout", type=float, default=0.3, help="MLP proxy dropout")
    s.add_argument("--no-logreg", action="store_true", dest="no_logreg", help="skip the logistic-regression proxies")


def _train_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("store", nargs="?", help="feature-store directory (optional with --print-config)")
    s.add_argument("--out", help="run directory (created; an interrupted run resumes; a complete one is left "
                                 "as it is); required to train")
    s.add_argument("--overwrite", action="store_true",
                   help="delete what an earlier run wrote in --out (other configuration, store or seed) and "
                        "train from scratch")
    s.add_argument("--print-config", action="store_true", dest="print_config",
                   help="print the resolved configuration (YAML; JSON with --json) and exit")
    s.add_argument("--preset", default=None,
                   help="preset name or YAML path (see `sgmft presets`); default: sgmft.config.DEFAULT_PRESET")
    s.add_argument("--set", action="append", metavar="model.F=V|train.F=V",
                   help="override a config field or an architecture's option, e.g. --set model.use_sim=false, "
                        "--set model.hidden=256 (repeatable; docs/training.md, \"Model options\")")
    s.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    s.add_argument("--batch-size", type=int, dest="batch_size", help="batch size (default: the preset's)")
    s.add_argument("--lr", type=float, help="Adam learning rate (default: the preset's)")
    s.add_argument("--seed", type=int, help="seed of the split, initialisation and shuffling (default: 0)")
    s.add_argument("--accelerator", help="Lightning accelerator: auto, cpu, gpu, cuda, mps (default: auto)")
    s.add_argument("--devices", type=_devices_arg,
                   help="Lightning devices: a count (-1 = all), 'auto', or device indices such as 0,1 "
                        "(default: 1)")
    s.add_argument("--strategy", help="Lightning strategy: auto, ddp, ddp_spawn, fsdp (default: auto)")
    s.add_argument("--num-nodes", type=int, dest="num_nodes", help="machines for multi-node training (default: 1)")
    s.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log to TensorBoard (RUN/tensorboard/, beside lightning/metrics.csv); "
                        "needs pip install 'sgmft[tensorboard]'")


def _evaluate_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("checkpoint", help="run directory or its model/ directory")
    s.add_argument("store", help="feature-store directory")
    s.add_argument("--out", help="report directory (default: eval-<split> in the run folder)")
    s.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="which posts: a split of the run's own saved split (else the store's), or all")
    s.add_argument("--tsne-points", type=_count_arg, default=2000, dest="tsne_points",
                   help="points in the t-SNE plot (a random subset when the split is larger); 0: no "
                        "t-SNE plot (the slow part of a report)")


def _demo_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", default="reports/demo", help="report folder (data and runs inside)")
    s.add_argument("--quick", action="store_true", help="small data and few epochs (a smoke run, about 7 minutes "
                   "on 2 cores: with so few posts the default cross-validates)")
    s.add_argument("--seeds", type=int, default=1, help="seeds per model (mean and spread when > 1)")
    s.add_argument("--profile", default="both", choices=["both", "default", "hetero"],
                   help="SimFeat profile(s) to run (docs/simfeat.md); default: both")
    s.add_argument("--epochs", type=int, help="epochs of every run (default: each preset its own, SG-MFT 4; 3 with --quick)")


# -- the verb table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verb:
    run: Callable[[argparse.Namespace], int]          # the command: one API call
    add_arguments: Callable[[argparse.ArgumentParser], None]
    help: str
    description: str | None = None
    progress: bool = False                             # has progress bars: --progress / --no-progress
    json: bool = True                                  # --json: stdout is one JSON document


VERBS: dict[str, Verb] = {
    "presets": Verb(cmd_presets, _presets_args, "list model presets, registered architectures and fusions"),
    "simulate": Verb(cmd_simulate, _simulate_args, "write the SimFeat synthetic feature store",
                     "Generate SimFeat (docs/simfeat.md) into a feature store and print its summary "
                     "and oracle accuracies as JSON."),
    "simfeat-report": Verb(cmd_simfeat_report, _simfeat_report_args,
                           "SimFeat's proxy report: accuracies of simple models on the generator (JSON)",
                           "Generate SimFeat in memory, train logistic-regression and MLP proxies on each "
                           "modality and on both, and print their test accuracies next to the oracle's "
                           "(docs/simfeat.md; about 15 min on 2 CPU cores at the default scale)."),
    "extract": Verb(_raw.cmd_extract, _raw.extract_args, _raw.EXTRACT_HELP, _raw.EXTRACT_DESCRIPTION, True),
    "train": Verb(cmd_train, _train_args, "train a preset on a feature store",
                  "Train a preset (sgmft presets) on a feature store with Lightning; the run folder "
                  "holds the exported model, run.json and the split (docs/training.md).", True),
    "evaluate": Verb(cmd_evaluate, _evaluate_args, "metrics, confusion matrix and t-SNE of a trained model",
                     "Evaluate a run on a feature store: metrics.json, predictions, confusion.png and "
                     "tsne.png in the report folder; the key metrics as JSON on stdout.", True),
    "predict": Verb(_raw.cmd_predict, _raw.predict_args, _raw.PREDICT_HELP, _raw.PREDICT_DESCRIPTION, True),
    "export": Verb(_export.cmd_export, _export.export_args, _export.HELP, _export.DESCRIPTION),
    "convert-cn-clip": Verb(_cn_clip.cmd_convert_cn_clip, _cn_clip.convert_cn_clip_args, _cn_clip.HELP,
                            _cn_clip.DESCRIPTION),
    "zero-shot": Verb(_zero_shot.cmd_zero_shot, _zero_shot.zero_shot_args, _zero_shot.HELP, _zero_shot.DESCRIPTION),
    "store": Verb(_store.cmd_store, _store.store_args, _store.HELP, _store.DESCRIPTION),
    "demo": Verb(cmd_demo, _demo_args, "offline end-to-end demo on SimFeat, profiles default and hetero",
                 "Simulate SimFeat (profiles default and hetero) at the paper's scale, train the default "
                 "model, SG-MFT, concatenation and the single-modality baselines, evaluate them overall "
                 "and per regime beside the oracle, and write a report (under 10 minutes on 2 CPU cores; "
                 "--quick: a smoke run).", True),
    "demo-raw": Verb(_raw.cmd_demo_raw, _raw.demo_raw_args, _raw.DEMO_RAW_HELP, _raw.DEMO_RAW_DESCRIPTION, True),
    "experiments": Verb(_experiments.cmd_experiments, _experiments.experiments_args, _experiments.HELP,
                        _experiments.DESCRIPTION, True),
    "learning-curve": Verb(_experiments.cmd_learning_curve, _experiments.learning_curve_args,
                           _experiments.LC_HELP, _experiments.LC_DESCRIPTION, True),
    # a long-running server: its stdout is the server log, so no --json
    "serve": Verb(_serve.cmd_serve, _serve.serve_args, _serve.HELP, _serve.DESCRIPTION, json=False),
}


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default once, and only when there is one worth showing (not None,
    not a switch's False, not already named in the help text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is False or action.default is argparse.SUPPRESS
                or isinstance(action.default, list) and not action.default
                or "default" in text or action.nargs == 0 or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _common_args(s: argparse.ArgumentParser, verb: Verb) -> None:
    g = s.add_argument_group("output")
    if verb.json:
        g.add_argument("--json", action="store_true",
                       help="print exactly one JSON document on stdout (messages go to stderr)")
    if verb.progress:
        g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show progress bars (on stderr); by default only when stderr is a terminal")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sgmft", formatter_class=HelpFormatter,
        description="Semantic location prediction from social-media posts (SG-MFT and baselines).",
        epilog="`sgmft VERB --help` lists a verb's options. Docs: README.md and docs/.")
    ap.add_argument("--version", action="version", version=f"sgmft {__version__}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, verb in VERBS.items():
        s = sub.add_parser(name, help=verb.help, description=verb.description or verb.help,
                           formatter_class=HelpFormatter)
        verb.add_arguments(s)
        _common_args(s, verb)
        s.set_defaults(func=verb.run)
    return ap


def _show_warnings(verb: str):
    """Print the library's notes and warnings as ``sgmft VERB: note|warning: ...``, others as usual."""
    import warnings

    from sgmft.errors import SgmftNote, SgmftWarning

    default = warnings.showwarning
    shown: set[tuple[str, str]] = set()         # one line per distinct message: a run's candidates and folds repeat them

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SgmftWarning):
            kind = "note" if issubclass(category, SgmftNote) else "warning"
            if (kind, str(message)) not in shown:
                shown.add((kind, str(message)))
                print(f"sgmft {verb}: {kind}: {message}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _parse(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``ap.parse_args``, except that arguments the verb does not know are refused by the verb's own
    parser (``sgmft train: error: unrecognized arguments: ...`` and its usage), not by ``sgmft``'s."""
    args, extra = ap.parse_known_args(argv)
    if extra:
        sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.verb].error(f"unrecognized arguments: {' '.join(extra)} "
                                     f"(`sgmft {args.verb} --help` lists its options)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one verb. An error the user can fix (:data:`sgmft.errors.USER_ERRORS`: an
    :class:`~sgmft.errors.SgmftError` or the OS's file errors) prints one line and returns 2;
    anything else is a bug and propagates with its traceback (exit status 1)."""
    args = _parse(build_parser(), argv)
    _show_warnings(args.verb)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        msg = " ".join(str(e).split("\n", 1)[0].split()) if isinstance(e, OSError) else str(e)
        print(f"sgmft {args.verb}: error: {msg}", file=sys.stderr)
        if getattr(args, "json", False):        # scripts still get one JSON document
            print(json.dumps({"error": str(msg), "verb": args.verb}, ensure_ascii=False))
        return 2
