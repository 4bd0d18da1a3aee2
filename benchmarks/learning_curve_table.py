"""Markdown table of a learning curve (``sgmft learning-curve`` writes learning_curve.csv): accuracy in %,
mean ± sd over seeds per size and model, and the default's (``auto``) margin over the best other model.

    python benchmarks/learning_curve_table.py reports/lc/learning_curve.csv
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict


def table(path: str, default: str = "auto") -> str:
    cells: dict[tuple[int, str], list[float]] = defaultdict(list)
    models: list[str] = []
    for row in csv.DictReader(open(path, encoding="utf-8")):
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
        best = max((mean[m] for m in others if m in mean), default=float("nan"))
        margin = f"{mean[default] - best:+.2f}" if default in mean else "-"
        lines.append(f"| {size:,} | " + " | ".join(fmt(m) for m in models) + f" | {margin} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
