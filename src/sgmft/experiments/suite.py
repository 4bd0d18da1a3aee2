"""``run_experiments()``: run the paper's comparison tables and write a report folder.

Layout of ``out`` (default ``reports/experiments``)::

    README.md              the report: scale, data, one section per table, figures, row settings
    table<k>.md / .csv     each table laid out like the paper's (mean ± std over seeds)
    table<k>_tsne.png      t-SNE of M_fuse on the test split, one panel per row (one seed)
    results.json           every run's metrics, the aggregated tables, timings, settings
    suite.json             the scale and data settings this folder was made with
    data/                  the generated SimFeat store, SimPosts corpus and its CNN store
    runs/<row>/seed<k>/    one training run each (checkpoint, split, evaluation); a finished
                           run is skipped on re-run, so an interrupted suite resumes
    tsne/<row>.npz         cached t-SNE coordinates of each row's panel

Runs go seed by seed (every row at seed 0, then every row at seed 1, ...), and the tables
are rewritten after each round, so an interrupted suite still leaves complete tables.
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import json
import platform
import textwrap
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from sgmft.atomic import write_text
from sgmft.experiments.runner import aggregate, aggregate_regimes, run_rows, safe_name, seed_run, simfeat_config
from sgmft.experiments.tables import (Suite, SuiteRow, collect_rows, format_paper_table, load_suite,
                                      table_csv, table_rows)

__all__ = ["run_experiments", "prepare_data", "write_tables", "tsne_figures"]

_IGNORED_TRAIN = {"progress", "seed"}
_IGNORED_MODEL = {"dim", "num_classes", "rank1_chunk"}  # rank1_chunk: retired field


# --------------------------------------------------------------------------- data
def _simfeat_store(out: Path, overrides: dict, log, name: str = "simfeat", profile: str = "default") -> Path:
    from sgmft.data.simfeat import write_simfeat
    from sgmft.features import FeatureStore

    path = out / "data" / name
    cfg = simfeat_config(profile, **overrides)
    want = json.loads(json.dumps(asdict(cfg)))
    if path.exists():
        have = FeatureStore.open(path, validate=False).meta.get("extra", {}).get("simfeat", {}).get("config")
        if have != want:
            raise InputError(f"{path}: holds a SimFeat store made with other settings than this scale's "
                             f"({overrides or 'defaults'}); use another --out")
        return path
    log(f"generating SimFeat profile {profile} {overrides or '(defaults)'} -> {path}")
    return write_simfeat(path, cfg)


def _cnn_store(out: Path, overrides: dict, manifest: str | Path | None, progress: bool, log) -> tuple[Path | None, str]:
    from sgmft.features.backbones.cnn_wordemb import cnn_available
    from sgmft.features.extract import extract_features

    ok, why = cnn_available()
    if not ok:
        return None, f"the CNN baseline could not run: {why}"
    store = out / "data" / "simposts-cnn"
    if store.exists():
        return store, ""
    if manifest is None:
        from sgmft.data.simposts import SimPostsConfig, generate_simposts

        corpus = out / "data" / "simposts"
        manifest = corpus / "manifest.jsonl"
        if not manifest.exists():
            log(f"generating SimPosts {overrides or '(defaults)'} -> {corpus}")
            generate_simposts(corpus, SimPostsConfig(**overrides), overwrite=True)
    log(f"extracting EfficientNet-Lite0 + word-embedding features of {manifest} -> {store}")
    t0 = time.time()
    extract_features(manifest, store, backbone="cnn-wordemb", image_choice="mean", batch_size=32,
                     progress=progress, keep_cache=False)
    log(f"  done in {time.time() - t0:.0f} s")
    return store, ""


def prepare_data(out: Path, kinds: set[str], scale: dict, *, store=None, posts_manifest=None,
                 progress: bool = False, log=print, profile: str = "default") -> tuple[dict[str, Path], dict[str, str]]:
    """Feature stores per data kind (generated under ``out/data`` unless given), and why any is missing."""
    stores: dict[str, Path] = {}
    missing: dict[str, str] = {}
    if "simfeat" in kinds:
        stores["simfeat"] = (Path(store) if store is not None
                             else _simfeat_store(out, scale["simfeat"], log, profile=profile))
    if "simfeat-small" in kinds:
        stores["simfeat-small"] = _simfeat_store(out, scale["simfeat_small"], log, "simfeat-small", profile)
    if "simposts-cnn" in kinds:
        path, why = _cnn_store(out, scale["simposts"], posts_manifest, progress, log)
        if path is None:
            missing["simposts-cnn"] = why
            log(f"WARNING: {why}; rows on simposts-cnn are skipped")
        else:
            stores["simposts-cnn"] = path
    return stores, missing


def _check_marker(out: Path, marker: dict) -> None:
    p = out / "suite.json"
    if p.exists():
        have = json.loads(p.read_text(encoding="utf-8"))
        keys = ("scale", "simfeat", "simfeat_small", "simposts", "train", "store", "posts_manifest", "profile")
        if any(have.get(k, "default" if k == "profile" else None) != marker.get(k) for k in keys):
            raise InputError(f"{out} holds runs made at another scale or on other data "
                             f"({ {k: have.get(k) for k in keys} }); use another --out")
    write_text(p, json.dumps(marker, indent=2))


def _model_view(model) -> dict:
    """What the arch reads (sgmft.models.registry.model_view) of a ModelConfig or of a run.json's
    ``model``, old (every flat field) or new (the view): the two compare equal for the same model."""
    from sgmft.config import model_config_from_dict
    from sgmft.models.registry import model_view

    if isinstance(model, dict):
        try:
            model = model_config_from_dict(model)
        except ValueError:
            return model
    return model_view(model)


def _check_existing(row, seed: int, out: Path) -> None:
    """A finished run of the same name must have been trained with the same configuration."""
    run = seed_run(out, row.name, seed).run_json
    if not run.exists():
        return
    have = json.loads(run.read_text(encoding="utf-8"))
    p = row.resolve(seed)
    want_m = {k: v for k, v in _model_view(p.model).items() if k not in _IGNORED_MODEL}
    want_t = {k: v for k, v in json.loads(json.dumps(asdict(p.train))).items() if k not in _IGNORED_TRAIN}
    have_m = {k: v for k, v in _model_view(have.get("model", {})).items() if k not in _IGNORED_MODEL}
    have_t = {k: v for k, v in have.get("train", {}).items() if k not in _IGNORED_TRAIN}
    if have_m != want_m or have_t != want_t:
        diff = sorted({k for k in set(want_m) | set(have_m) if want_m.get(k) != have_m.get(k)}
                      | {k for k in set(want_t) | set(have_t) if want_t.get(k) != have_t.get(k)})
        raise InputError(f"{run.parent}: an earlier run of row {row.name!r} used another configuration "
                         f"(differs in {diff}); use another --out or delete that run folder")


# --------------------------------------------------------------------------- tables
def write_tables(out: Path, suite: Suite, scale: str, results: dict[str, list[dict]],
                 seeds_of: dict[tuple[str, str], int], profile: str = "default") -> dict[str, list[dict]]:
    """Aggregate each table over its own number of seeds; write table<k>.md / .csv."""
    tables: dict[str, list[dict]] = {}
    for spec in suite.tables:
        agg = {}
        for r in spec.rows_at(scale):
            runs = results.get(r.name, [])[: seeds_of[(spec.name, r.name)]]
            if runs:
                agg[r.name] = aggregate({r.name: runs})[0]
        recs = table_rows(spec, agg, scale)
        tables[spec.name] = recs
        md = f"## {spec.title}{_profile_suffix(profile)}\n\n{format_paper_table(spec, recs)}\n"
        regimes = regime_md(spec, scale, results, seeds_of)
        if regimes:
            md += f"\nAccuracy (%) per regime on the SimFeat test split, beside the oracle's:\n\n{regimes}\n"
        write_text(out / f"{spec.name}.md", md)
        write_text(out / f"{spec.name}.csv", table_csv(recs))
    return tables


def _profile_suffix(profile: str) -> str:
    return f" — SimFeat profile `{profile}`"


def regime_md(spec, scale: str, results: dict[str, list[dict]], seeds_of: dict[tuple[str, str], int]) -> str:
    """Per-regime accuracy table of a table's rows on the main SimFeat store (empty when the
    store has no regimes). Rows on other data are left out: their regimes and oracle differ."""
    from sgmft.eval.metrics import regime_table

    runs = {r.display_label(scale): results.get(r.name, [])[: seeds_of[(spec.name, r.name)]]
            for r in spec.rows_at(scale) if r.data == "simfeat"}
    by_row = aggregate_regimes({k: v for k, v in runs.items() if v})
    return regime_table(by_row) if by_row else ""


# --------------------------------------------------------------------------- t-SNE
def _row_tsne(out: Path, row: SuiteRow, store: Path, seed: int, points: int, log) -> tuple | None:
    from sgmft.eval.plots import tsne_embed
    from sgmft.eval.run import select_rows
    from sgmft.features import FeatureStore
    from sgmft.predict import Predictor

    run = seed_run(out, row.name, seed)
    weights = run.model / "model.safetensors"
    if not weights.exists():
        return None
    stamp = weights.stat().st_mtime_ns                     # a retrained run invalidates the cache
    cache = out / "tsne" / f"{safe_name(row.name)}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if int(z["seed"]) == seed and int(z["points"]) == points and int(z["stamp"]) == stamp:
            return z["coords"], z["labels"], [str(n) for n in z["label_names"]]
    fs = FeatureStore.open(store, validate=False)
    idx = select_rows(fs, run, "test")
    import torch

    pred = Predictor.load(run.root, device="cuda" if torch.cuda.is_available() else "cpu")
    fused = pred.predict_store(fs, idx, return_fused=True).fused
    labels = np.asarray(fs.labels[idx])
    t0 = time.time()
    coords, keep = tsne_embed(fused.reshape(len(idx), -1), max_points=points, seed=seed, labels=labels)
    log(f"  t-SNE of {row.name}: {len(keep)} points, {time.time() - t0:.0f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, coords=coords, labels=labels[keep], label_names=np.array(pred.label_names),
             seed=seed, points=points, stamp=stamp)
    return coords, labels[keep], pred.label_names


def tsne_figures(out: Path, suite: Suite, stores: dict[str, Path], points: int, seed: int = 0,
                 log=print, scale: str = "default") -> dict[str, str]:
    """One figure per table: t-SNE of M_fuse on the test split, a panel per row (seed ``seed``)."""
    from sgmft.eval.plots import plot_tsne_panels

    figures = {}
    for spec in suite.tables:
        panels, names = [], None
        for r in spec.rows_at(scale):
            if r.data not in stores:
                continue
            got = _row_tsne(out, r, stores[r.data], seed, points, log)
            if got is None:
                continue
            coords, labels, label_names = got
            names = names or label_names
            if label_names != names:
                continue  # another label set: cannot share a legend
            title = textwrap.fill(r.display_label(scale), 36)
            if r.data != "simfeat":
                title += f"\n[{r.data}]"
            panels.append((title, coords, labels))
        if panels:
            path = out / f"{spec.name}_tsne.png"
            plot_tsne_panels(panels, names, path, ncols=min(3, len(panels)),
                             title=f"{spec.title.split('. ', 1)[0]}: t-SNE of M_fuse (test split, seed {seed})")
            figures[spec.name] = path.name
    return figures


# --------------------------------------------------------------------------- report
def _describe_data(stores: dict[str, Path], missing: dict[str, str]) -> list[str]:
    from sgmft.features import FeatureStore

    lines = []
    for kind in ("simfeat", "simfeat-small"):
        if kind not in stores:
            continue
        fs = FeatureStore.open(stores[kind], validate=False)
        sim = fs.meta.get("extra", {}).get("simfeat")
        n_test = int((np.asarray(fs.split) == "test").sum()) if fs.split is not None else 0
        name = "SimFeat" if kind == "simfeat" else "SimFeat-small (data `simfeat-small`)"
        if sim:
            o = sim["oracle"]
            lines.append(f"- **{name}** (`{fs.path}`): {len(fs)} posts, D = {fs.dim}, {n_test} test posts. "
                         f"Bayes-optimal (oracle) test accuracy {100 * o['test_accuracy']:.2f} %; text-only "
                         f"oracle {100 * o['text_only_test_accuracy']:.2f} %, image-only "
                         f"{100 * o['image_only_test_accuracy']:.2f} % (docs/simfeat.md).")
        else:
            lines.append(f"- **Feature store** `{fs.path}` (backbone {fs.backbone}): {len(fs)} posts, "
                         f"D = {fs.dim}, {n_test} test posts.")
    if "simposts-cnn" in stores:
        fs = FeatureStore.open(stores["simposts-cnn"], validate=False)
        n_test = int((np.asarray(fs.split) == "test").sum()) if fs.split is not None else 0
        lines.append(f"- **SimPosts** raw posts (`{fs.meta.get('extra', {}).get('manifest', '')}`): {len(fs)} "
                     f"posts, {n_test} test; features: frozen EfficientNet-Lite0 (ImageNet) image vector + mean "
                     f"hashed word embeddings of the cleaned jieba tokens, D = {fs.dim} "
                     f"(sgmft.features.backbones.cnn_wordemb).")
    for kind, why in missing.items():
        lines.append(f"- **{kind}: not run** -- {why}.")
    return lines


def _row_settings(suite: Suite, scale: str, scale_train: list[str], rows: dict[str, SuiteRow]) -> list[str]:
    lines = ["| row | preset | model overrides | train overrides | epochs | data |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        row = r.row(scale, scale_train)
        p = row.resolve(0)
        train = [t for t in row.train]
        lines.append(f"| {name} | {r.preset} | {', '.join(row.model) or '–'} | {', '.join(train) or '–'} | "
                     f"{p.train.epochs} | {r.data} |")
    return lines


def _write_readme(out: Path, suite: Suite, scale: str, sc: dict, tables: dict[str, list[dict]],
                  figures: dict[str, str], data_lines: list[str], settings: list[str],
                  seeds_per_table: dict[str, int], timing: dict, profile: str = "default",
                  regimes: dict[str, str] | None = None) -> Path:
    import torch

    parts = ["# SG-MFT: the paper's comparisons, reproduced in kind", "",
             f"Made by `sgmft experiments` (scale **{scale}**, SimFeat profile **{profile}**). "
             f"{sc['description'].strip()}", "",
             "## Scale and data", "", *data_lines, "",
             f"- Seeds per table: {', '.join(f'{k}: {v}' for k, v in seeds_per_table.items())}. "
             f"Every row trains with its preset's optimiser; this scale's train overrides: "
             f"{', '.join(sc['train']) or 'none (each preset as it is)'}; per-row settings below.",
             f"- Machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
             f"{', CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else ', no GPU'}. "
             f"Wall time of this invocation: {timing['wall_seconds'] / 60:.1f} min "
             f"(training {timing['train_seconds'] / 60:.1f} min over {timing['runs_trained']} new runs).",
             "",
             "The paper's figures are single runs on its private Weibo dataset; ours are mean ± standard "
             "deviation over seeds on synthetic data (SimFeat: CLIP-like features with a known Bayes-optimal "
             "accuracy). Compare orderings and gaps against the spread, not absolute values. "
             "*acc / oracle* is accuracy divided by the oracle's accuracy on the same test posts.", ""]
    for spec in suite.tables:
        parts += [f"## {spec.title}{_profile_suffix(profile)}", "", spec.caption, "",
                  format_paper_table(spec, tables[spec.name]), "", f"CSV: [{spec.name}.csv]({spec.name}.csv)", ""]
        if (regimes or {}).get(spec.name):
            parts += ["Accuracy (%) per regime on the SimFeat test split (rows on the main SimFeat store), "
                      "beside the oracle's on the same posts:", "", regimes[spec.name], ""]
        if spec.name in figures:
            parts += [f"![t-SNE of M_fuse, {spec.name}]({figures[spec.name]})", ""]
    parts += ["## Row settings", "", *settings, "",
              "Rows with the same name in several tables are the same runs (e.g. `sgmft`).", ""]
    return write_text(out / "README.md", "\n".join(parts))


# --------------------------------------------------------------------------- main
def run_experiments(out="reports/experiments", *, tables: list[str] | None = None, config=None,
                    scale: str = "default", seeds: int | None = None, store=None, posts_manifest=None,
                    progress: bool = False, tsne_points: int | None = None,
                    log: Callable[[str], None] = print, profile: str = "default") -> dict:
    """Run the tables (all four by default) at ``scale`` and write the report to ``out``.

    ``seeds`` overrides every table's number of seeds.  ``store``: a feature store to use
    instead of generating SimFeat (e.g. real Chinese-CLIP features of your posts); ``profile``:
    the SimFeat profile (``default``, ``hetero``; docs/simfeat.md) of the generated stores;
    ``posts_manifest``: raw posts for the CNN baseline instead of generating SimPosts.
    Returns ``{"tables": ..., "results": ..., "report": path}``.
    """
    t_start = time.time()
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suite = load_suite(tables, config)
    sc = suite.scale(scale)
    rows = collect_rows(suite.tables, scale)
    seeds_per_table = {t.name: int(seeds) if seeds else t.num_seeds(scale, sc["seeds"]) for t in suite.tables}
    seeds_of = {(t.name, r.name): min(seeds_per_table[t.name], r.max_seeds(scale) or seeds_per_table[t.name])
                for t in suite.tables for r in t.rows_at(scale)}
    need = {name: max(n for (t, rn), n in seeds_of.items() if rn == name) for name in rows}
    _check_marker(out, {"scale": scale, "simfeat": sc["simfeat"], "simfeat_small": sc["simfeat_small"],
                        "simposts": sc["simposts"],
                        "train": sc["train"], "store": None if store is None else str(store),
                        "posts_manifest": None if posts_manifest is None else str(posts_manifest),
                        "profile": profile})
    stores, missing = prepare_data(out, {r.data for r in rows.values()}, sc, store=store,
                                   posts_manifest=posts_manifest, progress=progress, log=log, profile=profile)
    run_row = {name: r.row(scale, sc["train"]) for name, r in rows.items()}
    for name, row in run_row.items():
        for s in range(need[name]):
            _check_existing(row, s, out)

    results: dict[str, list[dict]] = {}
    timing = {"train_seconds": 0.0, "runs_trained": 0}
    def on_result(row, seed, m):
        log(f"[{row.name} seed {seed}] accuracy {100 * m['accuracy']:.2f} %"
            + (f", acc/oracle {m['accuracy_over_oracle']:.3f}" if m.get("accuracy_over_oracle") else "")
            + (f", trained in {m['train_seconds']:.0f} s" if m.get("train_seconds") is not None else ""))

    for seed in range(max(need.values())):
        for kind, store_path in stores.items():
            todo = [run_row[n] for n, r in rows.items() if r.data == kind and need[n] > seed]
            if not todo:
                continue
            for row in todo:
                done = seed_run(out, row.name, seed).eval_dir("test") / "metrics.json"
                fresh = not done.exists()
                _, res = run_rows([row], store_path, out, seeds=[seed], progress=progress,
                                  tsne_max_points=min(300, tsne_points or sc["tsne_points"]),
                                  on_result=on_result)
                m = res[row.name][0]
                results.setdefault(row.name, []).append(m)
                if fresh:
                    timing["train_seconds"] += float(m.get("train_seconds") or 0.0)
                    timing["runs_trained"] += 1
        write_tables(out, suite, scale, results, seeds_of, profile)

    table_recs = write_tables(out, suite, scale, results, seeds_of, profile)
    regimes = {spec.name: regime_md(spec, scale, results, seeds_of) for spec in suite.tables}
    figures = tsne_figures(out, suite, stores, tsne_points or sc["tsne_points"], seed=0, log=log, scale=scale)
    timing["wall_seconds"] = time.time() - t_start
    _write_readme(out, suite, scale, sc, table_recs, figures, _describe_data(stores, missing),
                  _row_settings(suite, scale, sc["train"], rows), seeds_per_table, timing, profile, regimes)
    summary = {"scale": scale, "profile": profile, "scale_settings": sc, "seeds_per_table": seeds_per_table,
               "regimes": aggregate_regimes(results),
               "stores": {k: str(v) for k, v in stores.items()}, "missing": missing, "timing": timing,
               "tables": table_recs, "results": results, "figures": figures}
    write_text(out / "results.json", json.dumps(summary, indent=2, default=str))
    log(f"report written to {out / 'README.md'}")
    return {"tables": table_recs, "results": results, "report": out / "README.md", "figures": figures,
            "timing": timing}
