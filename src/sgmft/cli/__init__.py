"""``sgmft`` command line: a thin layer over the Python API.

:data:`VERBS` is the one verb table: each verb maps to a command function that calls one
API function, and to the function that declares its options. The feature verbs live here,
the raw-post verbs in :mod:`sgmft.cli.raw` and the experiment suite in
:mod:`sgmft.cli.experiments`. Every exception in :data:`sgmft.errors.USER_ERRORS` ends
as ``sgmft VERB: error: <message>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

from sgmft.cli import experiments as _experiments
from sgmft.cli import raw as _raw
from sgmft.cli import serve as _serve
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


def _devices_arg(value: str):
    from sgmft.config import parse_devices

    v = parse_devices(value)
    if isinstance(v, str) and v != "auto":
        raise argparse.ArgumentTypeError(f"{value!r}: expected a count, 'auto', or device indices such as 0,1")
    return v


def _resolved_preset(args, store=None):
    """The preset after ``--set`` and the train flags, checked field by field (and the
    architecture and fusion names against their registries). With ``store``, ``dim`` and
    ``num_classes`` come from it, as training would set them."""
    import dataclasses

    from sgmft.config import apply_overrides, load_preset, replace_checked
    from sgmft.models import FUSIONS, MODELS

    p = load_preset(args.preset)
    mo, tr = _overrides(args.set)
    p.model = apply_overrides(p.model, mo, "model")
    p.train = apply_overrides(p.train, tr, "train")
    flags = {key: getattr(args, key) for key in ("epochs", "seed", "devices", "strategy", "accelerator",
                                                 "num_nodes", "batch_size", "lr")
             if getattr(args, key, None) is not None}
    if getattr(args, "progress", None) is not None:
        flags["progress"] = args.progress
    p.train = replace_checked(p.train, "train options", **flags)
    MODELS.get(p.model.arch)
    FUSIONS.get(p.model.fusion)
    if store is not None:
        from sgmft.features import FeatureStore

        fs = FeatureStore.open(store)
        p.model = dataclasses.replace(p.model, dim=fs.dim, num_classes=len(fs.label_names))
    p.model.validate()
    return p


def cmd_presets(args) -> int:
    from sgmft.config import list_presets, load_preset
    from sgmft.models import list_models

    for name in list_presets():
        p = load_preset(name)
        print(f"{name:12s} arch={p.model.arch:10s} {p.description.splitlines()[0] if p.description else ''}")
    print("\nregistered architectures:", ", ".join(list_models()))
    return 0


def _simfeat_config(args):
    from sgmft.data.simfeat import parse_overrides, profile_config

    changes = list(args.set or [])
    for key in ("num_posts", "dim", "seed"):
        if getattr(args, key, None) is not None:
            changes.append(f"{key}={getattr(args, key)}")
    return profile_config(args.profile, **parse_overrides(changes))


def cmd_simulate(args) -> int:
    from sgmft.data.simfeat import write_simfeat

    path = write_simfeat(args.out, _simfeat_config(args), overwrite=args.overwrite)
    from sgmft.features import FeatureStore

    fs = FeatureStore.open(path)
    oracle = fs.meta.get("extra", {}).get("simfeat", {}).get("oracle", {})
    print(json.dumps({"store": str(path), "num_posts": len(fs), "dim": fs.dim, "oracle": oracle}, indent=2))
    return 0


def cmd_simfeat_report(args) -> int:
    from sgmft.data.simfeat import proxy_report

    report = proxy_report(_simfeat_config(args), epochs=args.epochs, dropout=args.dropout, logreg=not args.no_logreg)
    print(json.dumps(report, indent=1))
    return 0


def cmd_train(args) -> int:
    if args.print_config:
        p = _resolved_preset(args, store=args.store)
        import yaml

        d = p.to_dict()
        doc = {"preset": p.name, "model": d["model"], "train": d["train"]}
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        return 0
    if args.store is None or args.out is None:
        raise UserError("train needs a feature store and --out RUN (or --print-config)")
    from sgmft.train import train

    p = _resolved_preset(args)
    res = train(args.store, args.out, p)
    if res.best_val_acc is not None:
        print(f"best val_acc {res.best_val_acc:.4f}; model exported to {res.checkpoint}")
    return 0


def cmd_evaluate(args) -> int:
    from sgmft.eval.run import evaluate

    from sgmft.runs import RunDir

    out = args.out or str(RunDir(args.checkpoint).eval_dir(args.split))
    m = evaluate(args.checkpoint, args.store, out, split=args.split, tsne_max_points=args.tsne_points)
    keep = {k: m[k] for k in ("accuracy", "macro_f1", "num_samples", "oracle_accuracy",
                              "accuracy_over_oracle") if k in m}
    print(json.dumps(keep, indent=2))
    print(f"report written to {out}")
    return 0


def cmd_demo(args) -> int:
    from sgmft.experiments.demo import run_demo

    run_demo(args.out, quick=args.quick, seeds=args.seeds, progress=not args.no_progress)
    return 0


# -- options of each verb ------------------------------------------------------------------------
def _presets_args(s: argparse.ArgumentParser) -> None:
    pass


def _simfeat_args(s: argparse.ArgumentParser) -> None:
    from sgmft.data.simfeat import PROFILES

    s.add_argument("--profile", default="default", choices=sorted(PROFILES),
                   help="start from this profile's settings (docs/simfeat.md)")
    s.add_argument("--set", action="append", metavar="FIELD=VALUE", help="any SimFeatConfig field")


def _simulate_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("out", help="output feature-store directory")
    s.add_argument("--num-posts", type=int, dest="num_posts")
    s.add_argument("--dim", type=int)
    s.add_argument("--seed", type=int)
    _simfeat_args(s)
    s.add_argument("--overwrite", action="store_true")


def _simfeat_report_args(s: argparse.ArgumentParser) -> None:
    _simfeat_args(s)
    s.add_argument("--epochs", type=int, default=20, help="MLP proxy epochs")
    s.add_argument("--dropout", type=float, default=0.3, help="MLP proxy dropout")
    s.add_argument("--no-logreg", action="store_true", dest="no_logreg", help="skip the logistic-regression proxies")


def _train_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("store", nargs="?", help="feature-store directory (optional with --print-config)")
    s.add_argument("--out", help="run directory (created; an interrupted run resumes); required to train")
    s.add_argument("--print-config", action="store_true", dest="print_config",
                   help="print the resolved configuration (YAML; JSON with --json) and exit")
    s.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    s.add_argument("--preset", default="sgmft", help="preset name or YAML path (see `sgmft presets`)")
    s.add_argument("--set", action="append", metavar="model.F=V|train.F=V", help="override a config field")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int, dest="batch_size")
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--accelerator")
    s.add_argument("--devices", type=_devices_arg,
                   help="Lightning devices: a count (-1 = all), 'auto', or device indices such as 0,1")
    s.add_argument("--strategy", help="e.g. ddp, ddp_spawn, fsdp (Lightning strategies)")
    s.add_argument("--num-nodes", type=int, dest="num_nodes")
    s.add_argument("--no-progress", action="store_true")


def _evaluate_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("checkpoint", help="run directory or its model/ directory")
    s.add_argument("store", help="feature-store directory")
    s.add_argument("--out", help="report directory (default: <checkpoint>/eval-<split>)")
    s.add_argument("--split", default="test", help="test, val, train or all")
    s.add_argument("--tsne-points", type=int, default=2000, dest="tsne_points")


def _demo_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", default="reports/demo")
    s.add_argument("--quick", action="store_true", help="small data and few epochs (a smoke run)")
    s.add_argument("--seeds", type=int, default=1, help="seeds per model (mean and spread when > 1)")
    s.add_argument("--no-progress", action="store_true")


# -- the verb table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verb:
    run: Callable[[argparse.Namespace], int]          # the command: one API call
    add_arguments: Callable[[argparse.ArgumentParser], None]
    help: str
    description: str | None = None
    show_defaults: bool = False                        # ArgumentDefaultsHelpFormatter


VERBS: dict[str, Verb] = {
    "presets": Verb(cmd_presets, _presets_args, "list model presets and registered architectures"),
    "simulate": Verb(cmd_simulate, _simulate_args, "write the SimFeat synthetic feature store"),
    "simfeat-report": Verb(cmd_simfeat_report, _simfeat_report_args,
                           "SimFeat's proxy report: accuracies of simple models on the generator (JSON)",
                           "Generate SimFeat in memory, train logistic-regression and MLP proxies on each "
                           "modality and on both, and print their test accuracies next to the oracle's "
                           "(docs/simfeat.md; about 15 min on 2 CPU cores at the default scale).", True),
    "extract": Verb(_raw.cmd_extract, _raw.extract_args, _raw.EXTRACT_HELP, _raw.EXTRACT_DESCRIPTION, True),
    "train": Verb(cmd_train, _train_args, "train a preset on a feature store"),
    "evaluate": Verb(cmd_evaluate, _evaluate_args, "metrics, confusion matrix and t-SNE of a trained model"),
    "predict": Verb(_raw.cmd_predict, _raw.predict_args, _raw.PREDICT_HELP, _raw.PREDICT_DESCRIPTION, True),
    "demo": Verb(cmd_demo, _demo_args, "offline end-to-end demo on SimFeat (simulate, train 4 models, report)"),
    "demo-raw": Verb(_raw.cmd_demo_raw, _raw.demo_raw_args, _raw.DEMO_RAW_HELP, _raw.DEMO_RAW_DESCRIPTION, True),
    "experiments": Verb(_experiments.cmd_experiments, _experiments.experiments_args, _experiments.HELP,
                        _experiments.DESCRIPTION),
    "serve": Verb(_serve.cmd_serve, _serve.serve_args, _serve.HELP, _serve.DESCRIPTION, True),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sgmft", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    for name, verb in VERBS.items():
        s = sub.add_parser(name, help=verb.help, description=verb.description,
                           formatter_class=(argparse.ArgumentDefaultsHelpFormatter if verb.show_defaults
                                            else argparse.HelpFormatter))
        verb.add_arguments(s)
        s.set_defaults(func=verb.run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"sgmft {args.verb}: error: {msg}", file=sys.stderr)
        return 2

