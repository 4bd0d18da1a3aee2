"""Multi-seed experiment suites (demo, paper tables)."""

from sgmft.experiments.runner import Row, aggregate, format_table, run_one, run_rows

__all__ = ["Row", "aggregate", "format_table", "run_one", "run_rows"]
