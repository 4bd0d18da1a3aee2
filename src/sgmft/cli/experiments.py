"""``sgmft experiments``: the paper's comparison tables (listed in ``sgmft.cli.VERBS``)."""

from __future__ import annotations

from sgmft.errors import UserError


def cmd_experiments(args) -> int:
    from sgmft.cli.output import emit, progress_on, quiet_stdout
    from sgmft.experiments.suite import run_experiments

    if args.full and args.quick:
        raise UserError("--full and --quick exclude each other")
    scale = "full" if args.full else "quick" if args.quick else "default"
    tables = None if args.suite == "all" else [args.suite]
    if args.config and args.suite != "all":
        raise UserError("give --suite or --config, not both")
    with quiet_stdout(args):
        res = run_experiments(args.out, tables=tables, config=args.config, scale=scale, seeds=args.seeds,
                              store=args.store, posts_manifest=args.posts, progress=progress_on(args),
                              tsne_points=args.tsne_points, profile=args.profile)
    emit(args, {**res, "out": str(args.out)}, "")
    return 0


HELP = "reproduce the paper's comparison tables (1-4) on SimFeat / SimPosts"
DESCRIPTION = ("Train and evaluate every row of the paper's Tables 1-4 over several seeds and "
               "write a report (markdown + CSV tables like the paper's, mean ± std, accuracy / "
               "oracle, t-SNE panels of M_fuse). Interrupted runs resume. Default: the CPU scale "
               "(about an hour on 2 cores); --full: paper scale (GPU); --quick: a smoke run.")


def experiments_args(s) -> None:
    s.add_argument("--suite", default="all", choices=["all", "table1", "table2", "table3", "table4"],
                   help="which table to run (default: all four)")
    s.add_argument("--config", help="a suite or table YAML file (see sgmft/configs/experiments/)")
    s.add_argument("--seeds", type=int, help="seeds per table (default: the scale's setting, see the report)")
    s.add_argument("--out", default="reports/experiments", help="report folder, with runs, data and figures inside (default: reports/experiments)")
    s.add_argument("--full", action="store_true", help="paper scale: every preset's own epochs, 5 seeds (GPU)")
    s.add_argument("--quick", action="store_true", help="smoke run: tiny data, 2 epochs, 1 seed")
    from sgmft.data.simfeat import PROFILES

    s.add_argument("--profile", default="default", choices=sorted(PROFILES),
                   help="SimFeat profile of the generated data (docs/simfeat.md); hetero: text and image often disagree")
    s.add_argument("--store", help="feature store to use instead of generating SimFeat")
    s.add_argument("--posts", help="post manifest for the CNN baseline instead of generating SimPosts")
    s.add_argument("--tsne-points", type=int, dest="tsne_points", help="points per t-SNE panel (default: the scale's setting)")
    # --progress / --no-progress come with every verb that has bars (sgmft.cli.VERBS)

def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--sizes {text!r}: expected comma-separated integers such as 2000,4250,8500") from None
    if not vals:
        raise UserError("--sizes is empty")
    return vals


def cmd_learning_curve(args) -> int:
    from sgmft.cli.output import emit, progress_on, quiet_stdout
    from sgmft.data.simfeat import parse_overrides
    from sgmft.experiments.learning_curve import run_learning_curve

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    with quiet_stdout(args):
        res = run_learning_curve(args.out, profile=args.profile, sizes=_int_list(args.sizes), models=models,
                                 seeds=args.seeds, epochs=args.epochs, simfeat=parse_overrides(args.set or []),
                                 keep_stores=args.keep_stores, progress=progress_on(args))
    emit(args, {**res, "out": str(args.out)}, "")
    return 0


LC_HELP = "learning curve: accuracy / oracle against training-set size per model (PNG + CSV)"
LC_DESCRIPTION = ("Generate one SimFeat dataset with a fixed test set, train each model on nested "
                  "training subsets of the given sizes (posts counted as in the paper: 80 % train+val, "
                  "20 % test), and write learning_curve.csv and learning_curve.png with the oracle as a "
                  "line. Finished cells are skipped on re-run (docs/experiments.md).")


def learning_curve_args(s) -> None:
    from sgmft.data.simfeat import PROFILES
    from sgmft.experiments.learning_curve import DEFAULT_SIZES, default_models

    s.add_argument("--profile", default="hetero", choices=sorted(PROFILES), help="SimFeat profile")
    s.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                   help="dataset sizes in posts, comma-separated; the training pool is drawn for the largest "
                        "size and the smaller ones are subsets of it, so commands with another largest size "
                        "see other data and another fixed test set")
    s.add_argument("--models", help=f"presets, comma-separated (default: {','.join(default_models())})")
    s.add_argument("--seeds", type=int, default=1, help="seeds per cell")
    s.add_argument("--epochs", type=int, help="epochs per run (default: ceil(60000 / training posts), 3..10)")
    s.add_argument("--set", action="append", metavar="FIELD=VALUE", help="SimFeatConfig override (e.g. dim=256)")
    s.add_argument("--out", default="reports/learning-curve", help="output folder (re-run to resume)")
    s.add_argument("--keep-stores", action="store_true", dest="keep_stores",
                   help="keep each size's subset store after its cells are done")
