"""``sgmft learning-curve``: accuracy / oracle against training-set size, per model.

One SimFeat dataset is generated for the largest size, with a **fixed test set** of
``test_size`` posts (the profile's: 3,400 at the paper's scale). A size ``S`` counts posts
the way the paper does (80 % for training and validation, 20 % test), so the cell of size
``S`` trains on the first ``S - round(S * test_fraction)`` posts of one fixed random order
of the non-test posts (the subsets are nested) and is scored on the same test posts as
every other size. The oracle's accuracy is therefore one number for the whole curve (the
generator's exact Bayes posterior on that test set), drawn as a line.

Layout of ``out``::

    curve.json                  the settings (a re-run with other settings is refused)
    data/simfeat/               the generated store (largest size + the test set)
    data/size<S>/               the training subset of size S + the test posts (deleted once
                                every cell of that size is done, unless keep_stores)
    size<S>/runs/<model>/seed<k>/   one training run per cell; a finished cell is skipped
    learning_curve.csv          one line per (size, model, seed), per-regime accuracies too
    learning_curve.png          accuracy and accuracy / oracle against size, oracle as a line
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import csv
import functools
import io
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from sgmft.atomic import write_text
from sgmft.experiments.runner import Row, default_preset, run_one, seed_run, simfeat_config

DEFAULT_SIZES = (2000, 4250, 8500, 17000, 34000, 68000)


def default_models() -> list[str]:
    """The default model, the textbook bar (shrinkage LDA, logistic regression), the paper's
    baselines and the peers (QMF, PDF): issue 17's comparison."""
    return list(dict.fromkeys([default_preset(), "lda", "logreg", "concat", "sgmft", "qmf", "pdf"]))


def auto_epochs(n_train: int) -> int:
    """Epochs for a cell with ``n_train`` non-test posts: about 60,000 post-passes, 3 to 10."""
    return int(min(10, max(3, math.ceil(60000 / max(1, n_train)))))


def _n_train(size: int, test_fraction: float) -> int:
    return size - int(round(size * test_fraction))


def _subset_store(big, path: Path, rows: np.ndarray, size: int, log) -> Path:
    from sgmft.features import FeatureStore, write_feature_store

    if (path / "meta.json").exists():
        return path
    log(f"[lc] writing the size-{size} store ({len(rows)} posts incl. the test set) -> {path}")
    fs = big
    extra = dict(fs.meta.get("extra", {}))
    extra["learning_curve"] = {"size": size, "source": str(fs.path), "rows": len(rows)}
    write_feature_store(path, ids=np.asarray(fs.ids[rows]), text=np.asarray(fs.text[rows]),
                        image=np.asarray(fs.image[rows]), label_names=fs.label_names,
                        labels=np.asarray(fs.labels[rows]),
                        users=None if fs.users is None else np.asarray(fs.users[rows]),
                        split=np.asarray(fs.split[rows]), backbone=fs.backbone,
                        normalization=fs.meta.get("normalization", "l2"), dtype=fs.meta["dtype"], extra=extra,
                        regime=None if fs.regime is None else np.asarray(fs.regime[rows]),
                        regime_names=fs.regime_names, overwrite=True)
    return FeatureStore.open(path, validate=False).path


def plot_learning_curve(records: list[dict], oracle: float | None, path, title: str = "") -> Path:
    """Two panels against training-set size (log axis): accuracy (%) with the oracle as a
    dashed line, and accuracy / oracle with 1 as the line. Mean over seeds, bars = min..max."""
    from sgmft.eval.plots import _new_figure, _palette, _save_png

    models = list(dict.fromkeys(r["model"] for r in records))
    fig = _new_figure((11, 4.2))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = _palette(len(models))
    for m, c in zip(models, colours):
        sizes = sorted({r["size"] for r in records if r["model"] == m})
        for ax, key, scale in ((ax1, "accuracy", 100.0), (ax2, "accuracy_over_oracle", 1.0)):
            vals = [[scale * r[key] for r in records if r["model"] == m and r["size"] == s
                     and r.get(key) is not None] for s in sizes]
            keep = [(s, v) for s, v in zip(sizes, vals) if v]
            if not keep:
                continue
            xs = [s for s, _ in keep]
            mean = np.array([np.mean(v) for _, v in keep])
            lo = mean - np.array([np.min(v) for _, v in keep])
            hi = np.array([np.max(v) for _, v in keep]) - mean
            ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", color=c, label=m, capsize=3)
    if oracle is not None:
        ax1.axhline(100 * oracle, color="black", ls="--", lw=1.2, label=f"oracle ({100 * oracle:.1f} %)")
        ax2.axhline(1.0, color="black", ls="--", lw=1.2, label="oracle")
    for ax, ylab in ((ax1, "test accuracy (%)"), (ax2, "accuracy / oracle")):
        ax.set_xscale("log")
        ax.set_xlabel("posts (training + validation = 80 %; fixed test set)")
        ax.set_ylabel(ylab)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def _check_args(sizes, models, seeds: int) -> tuple[list[int], list[str]]:
    """Sorted sizes and the model list, refused before any work when wrong."""
    from sgmft.config import load_preset

    sizes = sorted({int(s) for s in sizes})
    models = list(dict.fromkeys(models or default_models()))
    if not sizes or sizes[0] < 10:
        raise InputError(f"sizes must be integers >= 10, got {sizes}")
    if seeds < 1:
        raise InputError(f"seeds must be >= 1, got {seeds}")
    for m in models:
        load_preset(m)                                   # unknown model: error before any work
    return sizes, models


def _settings(out: Path, profile: str, simfeat: dict | None, sizes: list[int], models: list[str], seeds: int,
              epochs: int | None):
    """``(SimFeat config of the largest size + the fixed test set, test fraction)``; records them in
    ``curve.json``, and refuses a folder made with other settings."""
    base = simfeat_config(profile, **(simfeat or {}))
    frac = base.test_size / base.num_posts
    pool = _n_train(sizes[-1], frac)
    cfg = simfeat_config(profile, **{**(simfeat or {}), "num_posts": pool + base.test_size,
                                     "test_size": base.test_size})
    settings = {"profile": profile, "simfeat": json.loads(json.dumps(asdict(cfg))), "test_fraction": frac,
                "epochs": epochs}
    marker = out / "curve.json"
    if marker.exists():
        have = json.loads(marker.read_text(encoding="utf-8"))
        if {k: have.get(k) for k in settings} != settings:
            raise InputError(f"{marker}: this folder holds a learning curve made with other settings "
                             f"(profile, SimFeat config, largest size or epochs); use another --out")
    write_text(marker, json.dumps({**settings, "sizes": sizes, "models": models, "seeds": seeds}, indent=2))
    return cfg, frac


def _big_store(out: Path, cfg, profile: str, log):
    """``(store, oracle dict, test rows, the fixed order of the other rows)``; the store is
    generated on the first run."""
    from sgmft.data.simfeat import write_simfeat
    from sgmft.features import FeatureStore

    big_path = out / "data" / "simfeat"
    if not (big_path / "meta.json").exists():
        log(f"[lc] generating SimFeat profile {profile}: {cfg.num_posts} posts ({cfg.num_posts - cfg.test_size} "
            f"train pool + {cfg.test_size} fixed test), D = {cfg.dim} -> {big_path}")
        write_simfeat(big_path, cfg, overwrite=True)
    big = FeatureStore.open(big_path, validate=False)
    oracle = big.meta.get("extra", {}).get("simfeat", {}).get("oracle", {})
    test_rows = big.indices("test")
    rest = np.setdiff1d(np.arange(len(big)), test_rows)
    order = np.random.default_rng(cfg.seed).permutation(rest)   # one fixed order: nested subsets
    log(f"[lc] oracle test accuracy {oracle.get('test_accuracy')} on the fixed {len(test_rows)} test posts")
    return big, oracle, test_rows, order


def _cell(out: Path, size: int, n_tr: int, m: str, k: int, e: int, make_store, progress: bool, tsne_points: int,
          log, label: str) -> tuple[dict, bool]:
    """Train (unless done) and score one (size, model, seed) cell; ``(record, was it done already)``.
    ``make_store()`` writes the cell's subset store (only when the cell is not done)."""
    sdir = out / f"size{size}"
    run = seed_run(sdir, m, k)
    finished = (run.eval_dir("test") / "metrics.json").exists()
    store = out / "data" / f"size{size}"
    if not finished:
        store = make_store()
        log(f"[lc] {label}: size {size} ({n_tr} train+val posts), {m}, seed {k}, {e} epochs ...")
    m_ = run_one(Row(m, m), k, store, sdir, extra_train=[f"epochs={e}"], progress=progress,
                 tsne_max_points=tsne_points)
    rec = {"size": size, "n_train_posts": n_tr, "model": m, "seed": k, "epochs": e,
           "accuracy": m_["accuracy"], "oracle_accuracy": m_.get("oracle_accuracy"),
           "accuracy_over_oracle": m_.get("accuracy_over_oracle"), "train_seconds": m_.get("train_seconds")}
    for reg, v in (m_.get("accuracy_by_regime") or {}).items():
        rec[f"acc_{reg}"] = v["accuracy"]
    return rec, finished


def run_learning_curve(out="reports/learning-curve", *, profile: str = "hetero",
                       sizes=DEFAULT_SIZES, models: list[str] | None = None, seeds: int = 1,
                       epochs: int | None = None, simfeat: dict | None = None, keep_stores: bool = False,
                       progress: bool = False, tsne_points: int = 200,
                       log: Callable[[str], None] = print) -> dict:
    """Train every (size, model, seed) cell not yet done and write the CSV and PNG.

    ``simfeat``: SimFeatConfig overrides on top of ``profile`` (``num_posts`` is set here);
    ``epochs``: per run (default: :func:`auto_epochs` of the cell's training posts)."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes, models = _check_args(sizes, models, seeds)
    cfg, frac = _settings(out, profile, simfeat, sizes, models, seeds, epochs)
    big, oracle, test_rows, order = _big_store(out, cfg, profile, log)
    n_cells = len(sizes) * len(models) * seeds
    records: list[dict] = []
    t_train = 0.0
    for size in sizes:
        n_tr = _n_train(size, frac)
        e = epochs or auto_epochs(n_tr)
        spath = out / "data" / f"size{size}"
        rows = np.sort(np.concatenate([order[:n_tr], test_rows]))
        make_store = functools.partial(_subset_store, big, spath, rows, size, log)
        for m in models:
            for k in range(seeds):
                n = len(records) + 1
                rec, finished = _cell(out, size, n_tr, m, k, e, make_store, progress, tsne_points, log,
                                      f"cell {n}/{n_cells}")
                t_train += 0.0 if finished else float(rec["train_seconds"] or 0)
                records.append(rec)
                log(f"[lc] {'done' if not finished else 'already done'}: size {size}, {m}, seed {k}: accuracy "
                    f"{100 * rec['accuracy']:.2f} %, acc/oracle {rec['accuracy_over_oracle'] or float('nan'):.3f} "
                    f"({n}/{n_cells} cells, {time.time() - t0:.0f} s elapsed)")
                _write_outputs(out, records, oracle, profile)
        if not keep_stores and spath.exists():
            shutil.rmtree(spath, ignore_errors=True)
    _write_outputs(out, records, oracle, profile)
    log(f"[lc] wrote {out / 'learning_curve.csv'} and {out / 'learning_curve.png'} ({time.time() - t0:.0f} s)")
    return {"records": records, "oracle": oracle, "csv": out / "learning_curve.csv",
            "png": out / "learning_curve.png", "train_seconds": t_train}


def _write_outputs(out: Path, records: list[dict], oracle: dict, profile: str) -> None:
    keys = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(records)
    write_text(out / "learning_curve.csv", buf.getvalue())
    plot_learning_curve(records, oracle.get("test_accuracy"), out / "learning_curve.png",
                        title=f"SimFeat profile {profile}: learning curve (fixed test set)")
