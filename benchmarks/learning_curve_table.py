"""Markdown table of a learning curve (``sgmft learning-curve`` writes learning_curve.csv): accuracy in %,
mean ± sd over seeds per size and model, and the default's (``auto``) margin over the best other model.

    python benchmarks/learning_curve_table.py reports/lc/learning_curve.csv
    python benchmarks/learning_curve_table.py benchmarks/results-learning_curve-gate_off.csv   # per profile

``--plot OUT.png CSV [CSV ...]`` draws several curves side by side instead, one panel per CSV:
accuracy / oracle against posts (log axis), mean over seeds with min..max bars. The ratio to the
oracle, not the accuracy, because the sizes of one CSV may come from runs with different test sets
(issue 17's curves: 500, 1,000-5,000, 34,000 and 68,000 posts each have their own):

    python benchmarks/learning_curve_table.py --plot docs/img/learning_curves_issue17.png \
        benchmarks/results-learning_curve-*-issue17.csv
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path


def table(path: str, default: str = "auto") -> str:
    """One table, or one per profile (headed by its name) when the CSV has a ``profile`` column
    (e.g. ``results-learning_curve-gate_off.csv``, several profiles' cells in one file)."""
    groups: dict[str | None, list[dict]] = defaultdict(list)
    for row in csv.DictReader(open(path, encoding="utf-8")):
        groups[row.get("profile")].append(row)
    if list(groups) == [None]:
        return _table(groups[None], default)
    return "\n\n".join(f"`{name}`\n\n{_table(rows, default)}" for name, rows in groups.items())


def _table(rows: list[dict], default: str) -> str:
    cells: dict[tuple[int, str], list[float]] = defaultdict(list)
    models: list[str] = []
    for row in rows:
        cells[int(row["size"]), row["model"]].append(100 * float(row["accuracy"]))
        if row["model"] not in models:
            models.append(row["model"])
    models.sort(key=lambda m: m != default)
    others = [m for m in models if m != default]
    lines = ["| posts | " + " | ".join(f"**{m}**" if m == default else m for m in models)
             + " | default − best other |", "|---|" + "---|" * (len(models) + 1)]
    for size in sorted({s for s, _ in cells}):
        mean = {m: statistics.fmean(cells[size, m]) for m in models if cells.get((size, m))}

        def fmt(m):
            xs = cells.get((size, m))
            if not xs:
                return "-"
            sd = f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""
            return f"{mean[m]:.2f}{sd}"
        best = max((mean[m] for m in others if m in mean), default=None)
        margin = f"{mean[default] - best:+.2f}" if default in mean and best is not None else "-"
        lines.append(f"| {size:,} | " + " | ".join(fmt(m) for m in models) + f" | {margin} |")
    return "\n".join(lines)


def _ratios(path: str) -> dict[str, dict[int, list[float]]]:
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in csv.DictReader(open(path, encoding="utf-8")):
        out[row["model"]][int(row["size"])].append(float(row["accuracy_over_oracle"]))
    return out


def plot(out: str, paths: list[str], default: str = "auto") -> str:
    """One panel per CSV (titled by its profile): accuracy / oracle against posts, every model."""
    import math
    import re

    from sgmft.eval.plots import _new_figure, _palette, _save_png

    curves = [(re.sub(r"^results-learning_curve-|-issue17$", "", Path(p).stem), _ratios(p)) for p in paths]
    models = list(dict.fromkeys(m for _, c in curves for m in sorted(c, key=lambda m: m != default)))
    colours = dict(zip(models, _palette(len(models))))
    cols = min(4, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig = _new_figure((4.2 * cols, 3.4 * rows))
    for i, (name, c) in enumerate(curves):
        ax = fig.add_subplot(rows, cols, i + 1)
        for m in models:
            if m not in c:
                continue
            sizes = sorted(c[m])
            mean = [statistics.fmean(c[m][s]) for s in sizes]
            err = [[mu - min(c[m][s]) for s, mu in zip(sizes, mean)], [max(c[m][s]) - mu for s, mu in zip(sizes, mean)]]
            ax.errorbar(sizes, mean, yerr=err, marker="o", ms=3, capsize=2, color=colours[m],
                        lw=2.2 if m == default else 1.0, label=m, zorder=3 if m == default else 2)
        ax.axhline(1.0, color="black", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(top=1.02)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("posts (80 % training + validation)", fontsize=8)
        ax.set_ylabel("accuracy / oracle", fontsize=8)
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return str(_save_png(fig, out))


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("csv", nargs="+", help="learning_curve.csv files (one table each; one panel each with --plot)")
    ap.add_argument("--plot", metavar="OUT.png", help="draw the curves side by side into this PNG instead")
    ap.add_argument("--default", default="auto", help="the model whose margin the table gives (default: auto)")
    args = ap.parse_args(argv)
    missing = [c for c in args.csv if not Path(c).is_file()]
    if missing:
        ap.error(f"no such CSV: {', '.join(missing)}")
    if args.plot:
        print(plot(args.plot, args.csv, args.default))
    else:
        print("\n\n".join(table(c, args.default) for c in args.csv))


if __name__ == "__main__":
    main()
