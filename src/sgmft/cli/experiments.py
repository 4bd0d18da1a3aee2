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
                              tsne_points=args.tsne_points)
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
    s.add_argument("--store", help="feature store to use instead of generating SimFeat")
    s.add_argument("--posts", help="post manifest for the CNN baseline instead of generating SimPosts")
    s.add_argument("--tsne-points", type=int, dest="tsne_points", help="points per t-SNE panel (default: the scale's setting)")
    # --progress / --no-progress come with every verb that has bars (sgmft.cli.VERBS)
