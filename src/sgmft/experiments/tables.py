"""The paper's comparison tables as experiment suites: configuration and table layout.

A *table config* (``sgmft/configs/experiments/table<k>.yaml``, or a user YAML file) names
the table and lists its rows; a row is a preset plus overrides (a
:class:`~sgmft.experiments.runner.Row`), the data it runs on and the paper's number::

    name: table3
    title: "Table 3. Fusion module swapped (SIM on)"
    caption: >
      ...
    seeds: {quick: 1, default: 3, full: 5}     # seeds per scale (``--seeds`` overrides)
    rows:
      - name: sgmft__fusion_coattn             # run folder name; same name = same run
        preset: sgmft
        model: [fusion=coattn]
        label: Co-attention
        paper: 86.47                           # the paper's accuracy (%), or omitted
        data: simfeat                          # simfeat (default) or simposts-cnn
        scales:                                # per-scale overrides, optional:
          default: {train: [epochs=4], seeds: 1, note: "CPU budget"}  # seeds caps, note labels

A *suite config* (``suite.yaml``) lists tables and the scales: which data, how many
epochs, seeds and t-SNE points each scale uses.  Rows of the same name in several tables
are one run (so the full SG-MFT is trained once for all four tables); they must then
resolve to the same configuration, which :func:`collect_rows` checks.
"""

from __future__ import annotations

from sgmft.errors import ConfigError, UnknownNameError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import csv
import dataclasses
import io
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sgmft.config import find_yaml, load_preset
from sgmft.experiments.runner import Row

__all__ = ["SCALES", "DATA_KINDS", "SuiteRow", "TableSpec", "Suite", "load_table", "load_suite",
           "list_tables", "collect_rows", "table_rows", "format_paper_table", "table_csv"]

SCALES = ("quick", "default", "full")
DATA_KINDS = ("simfeat", "simfeat-small", "simposts-cnn")


def _config_dir():
    return resources.files("sgmft") / "configs" / "experiments"


def list_tables() -> list[str]:
    return sorted(p.name[:-5] for p in _config_dir().iterdir()
                  if p.name.endswith(".yaml") and p.name.startswith("table"))


def _read_yaml(name_or_path: str | Path) -> tuple[str, dict]:
    """A table or suite config by name or path: the lookup of presets (:func:`sgmft.config.find_yaml`)."""
    name, text = find_yaml(name_or_path, _config_dir(), "experiment config", list_tables)
    try:
        return name, yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"experiment config {name}: not valid YAML: {e}") from None


def _strs(v, where: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{where}: expected a list of 'field=value' strings, got {v!r}")
    return list(v)


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = set(d) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(allowed)}")


@dataclass
class SuiteRow:
    """One table line: what to train (preset + overrides), on which data, and the paper's figure."""

    name: str
    preset: str
    model: list[str] = field(default_factory=list)
    train: list[str] = field(default_factory=list)
    label: str = ""
    paper: float | None = None
    paper_label: str = ""
    data: str = "simfeat"
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)

    def max_seeds(self, scale: str) -> int | None:
        """A per-row cap on the seeds at ``scale`` (e.g. a row too slow for the CPU scale)."""
        v = self.scales.get(scale, {}).get("seeds")
        return None if v is None else int(v)

    def skipped(self, scale: str) -> bool:
        return bool(self.scales.get(scale, {}).get("skip", False))

    def at(self, scale: str) -> "SuiteRow":
        """This row with its data resolved for ``scale`` (a scale may move a row to other data)."""
        return dataclasses.replace(self, data=self.scales.get(scale, {}).get("data", self.data))

    def display_label(self, scale: str) -> str:
        note = self.scales.get(scale, {}).get("note")
        return (self.label or self.name) + (f" [{note}]" if note else "")

    def row(self, scale: str, scale_train: list[str] | None = None) -> Row:
        """The runner's :class:`Row` at ``scale``.  Train overrides apply in the order: the
        scale's (``scale_train``, e.g. fewer epochs), the row's, the row's for this scale --
        so a row can override what its scale sets for every row."""
        s = self.scales.get(scale, {})
        return Row(self.name, self.preset, model=self.model + s.get("model", []),
                   train=list(scale_train or []) + self.train + s.get("train", []),
                   label=self.label or self.name)

    def signature(self, scale: str) -> tuple:
        r = self.row(scale)
        return (r.preset, tuple(r.model), tuple(r.train), self.at(scale).data)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "SuiteRow":
        _check_keys(d, {"name", "preset", "model", "train", "label", "paper", "paper_label", "data", "scales"}, where)
        for key in ("name", "preset"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise ConfigError(f"{where}: '{key}' must be a non-empty string")
        try:
            load_preset(d["preset"])          # the one preset lookup: a typo fails here, naming the row
        except UnknownNameError as e:
            raise ConfigError(f"{where}: {e}") from None
        data = d.get("data", "simfeat")
        if data not in DATA_KINDS:
            raise ConfigError(f"{where}: data must be one of {DATA_KINDS}, got {data!r}")
        scales = {}
        for sc, ov in (d.get("scales") or {}).items():
            if sc not in SCALES:
                raise ConfigError(f"{where}: unknown scale {sc!r} in scales; known: {SCALES}")
            _check_keys(ov, {"model", "train", "seeds", "note", "data", "skip"}, f"{where}.scales.{sc}")
            scales[sc] = {k: _strs(ov.get(k), f"{where}.scales.{sc}.{k}") for k in ("model", "train")}
            if ov.get("seeds") is not None:
                scales[sc]["seeds"] = int(ov["seeds"])
            if ov.get("note"):
                scales[sc]["note"] = str(ov["note"])
            if ov.get("skip"):
                scales[sc]["skip"] = True
            if "data" in ov:
                if ov["data"] not in DATA_KINDS:
                    raise ConfigError(f"{where}.scales.{sc}: data must be one of {DATA_KINDS}, got {ov['data']!r}")
                scales[sc]["data"] = ov["data"]
        paper = d.get("paper")
        return cls(name=d["name"], preset=d["preset"], model=_strs(d.get("model"), f"{where}.model"),
                   train=_strs(d.get("train"), f"{where}.train"), label=str(d.get("label", "")),
                   paper=None if paper is None else float(paper), paper_label=str(d.get("paper_label", "")),
                   data=data, scales=scales)


@dataclass
class TableSpec:
    name: str
    title: str
    caption: str
    rows: list[SuiteRow]
    seeds: dict[str, int] = field(default_factory=dict)

    def num_seeds(self, scale: str, default: int) -> int:
        return int(self.seeds.get(scale, default))

    def rows_at(self, scale: str) -> list[SuiteRow]:
        """The rows run at ``scale`` (skipped ones left out), their data resolved."""
        return [r.at(scale) for r in self.rows if not r.skipped(scale)]


def load_table(name_or_path: str | Path) -> TableSpec:
    name, d = _read_yaml(name_or_path)
    where = f"experiment table {name}"
    _check_keys(d, {"name", "title", "caption", "seeds", "rows"}, where)
    rows = [SuiteRow.from_dict(r, f"{where}: rows[{k}]") for k, r in enumerate(d.get("rows") or [])]
    if not rows:
        raise ConfigError(f"{where}: no rows")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: row names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    seeds = d.get("seeds") or {}
    _check_keys(seeds, set(SCALES), f"{where}.seeds")
    return TableSpec(name=str(d.get("name", name)), title=str(d.get("title", name)),
                     caption=str(d.get("caption", "")).strip(), rows=rows,
                     seeds={k: int(v) for k, v in seeds.items()})


@dataclass
class Suite:
    """Tables to run plus the per-scale settings (data sizes, epochs, seeds, t-SNE points)."""

    tables: list[TableSpec]
    scales: dict[str, dict[str, Any]]

    def scale(self, name: str) -> dict[str, Any]:
        if name not in self.scales:
            from sgmft.errors import UnknownNameError

            raise UnknownNameError(f"scale {name!r} not configured; known: {sorted(self.scales)}")
        s = dict(self.scales[name])
        s.setdefault("simfeat", {})
        s.setdefault("simposts", {})
        s.setdefault("simfeat_small", {})
        s["train"] = _strs(s.get("train"), f"suite scale {name}.train")
        s.setdefault("seeds", 1)
        s.setdefault("tsne_points", 1000)
        s.setdefault("description", "")
        return s


def load_suite(tables: list[str] | None = None, config: str | Path | None = None) -> Suite:
    """The packaged suite (``suite.yaml``) restricted to ``tables``, or a user config.

    ``config`` may be a suite file (with ``tables:`` and optionally ``scales:``; missing
    scales come from the packaged suite) or a single table file.
    """
    _, base = _read_yaml("suite")
    scales = dict(base.get("scales") or {})
    names = list(base.get("tables") or [])
    specs: list[TableSpec] | None = None
    if config is not None:
        cname, d = _read_yaml(config)
        if "rows" in d:
            specs = [load_table(config)]
        else:
            _check_keys(d, {"tables", "scales"}, f"suite config {cname}")
            scales.update(d.get("scales") or {})
            base_dir = Path(config).parent if Path(config).exists() else None
            names = []
            for t in d.get("tables") or []:
                cand = base_dir / t if base_dir is not None else None
                names.append(str(cand) if cand is not None and cand.exists() else t)
    if specs is None:
        if tables:
            names = list(tables)
        specs = [load_table(t) for t in names]
    for sc, s in scales.items():
        if sc not in SCALES:
            raise ConfigError(f"suite: unknown scale {sc!r}; known: {SCALES}")
        _check_keys(s, {"description", "simfeat", "simposts", "train", "seeds", "tsne_points",
                        "simfeat_small"}, f"suite scale {sc}")
    return Suite(tables=specs, scales=scales)


def collect_rows(tables: list[TableSpec], scale: str) -> dict[str, SuiteRow]:
    """Every distinct row of ``tables`` by name; the same name must mean the same run."""
    out: dict[str, SuiteRow] = {}
    where: dict[str, str] = {}
    for t in tables:
        for r in t.rows_at(scale):
            if r.name in out and out[r.name].signature(scale) != r.signature(scale):
                raise ConfigError(f"row {r.name!r} is defined differently in {where[r.name]} and {t.name} "
                                 f"({out[r.name].signature(scale)} vs {r.signature(scale)}); rows with the "
                                 f"same name share one run folder, so give one of them another name")
            out.setdefault(r.name, r)
            where.setdefault(r.name, t.name)
    return out


# --------------------------------------------------------------------------- layout
def table_rows(spec: TableSpec, aggregated: dict[str, dict], scale: str = "default") -> list[dict]:
    """One flat record per table line: label, paper figure, data and the aggregated metrics."""
    out = []
    for r in spec.rows_at(scale):
        agg = aggregated.get(r.name, {})
        out.append({"table": spec.name, "row": r.name, "label": r.display_label(scale),
                    "paper_label": r.paper_label, "paper_accuracy": r.paper, "data": r.data,
                    "seeds": agg.get("seeds", 0), **{k: v for k, v in agg.items() if k not in ("row", "seeds")}})
    return out


def _pm(rec: dict, key: str, scale: float = 100.0, digits: int = 2) -> str:
    if rec.get(f"{key}_mean") is None:
        return "n/a"
    if rec.get("seeds", 0) < 2:                     # one run: no spread to show
        return f"{scale * rec[f'{key}_mean']:.{digits}f}"
    return f"{scale * rec[f'{key}_mean']:.{digits}f} ± {scale * rec[f'{key}_std']:.{digits}f}"


def format_paper_table(spec: TableSpec, records: list[dict]) -> str:
    """Markdown laid out like the paper's table, with our mean ± std beside its number."""
    lines = ["| Method | paper (%) | accuracy (%) | macro-F1 (%) | acc / oracle | seeds | data | train s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for rec in records:
        paper = f"{rec['paper_accuracy']:.2f}" if rec.get("paper_accuracy") is not None else "–"
        secs = f"{rec['train_seconds_mean']:.0f}" if rec.get("train_seconds_mean") is not None else "n/a"
        label = rec["label"] + (f" (paper: {rec['paper_label']})" if rec.get("paper_label") else "")
        lines.append(f"| {label} | {paper} | {_pm(rec, 'accuracy')} | {_pm(rec, 'macro_f1')} | "
                     f"{_pm(rec, 'accuracy_over_oracle', 1.0, 3)} | {rec['seeds']} | {rec['data']} | {secs} |")
    return "\n".join(lines)


CSV_FIELDS = ("table", "row", "label", "paper_label", "paper_accuracy", "data", "seeds",
              "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std",
              "accuracy_over_oracle_mean", "accuracy_over_oracle_std", "oracle_accuracy",
              "train_seconds_mean", "train_seconds_std", "ece_mean", "ece_std", "ece_before_mean", "ece_before_std")


def table_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for rec in records:
        w.writerow({k: ("" if rec.get(k) is None else rec.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()
