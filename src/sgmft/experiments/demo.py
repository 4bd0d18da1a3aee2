"""``sgmft demo``: the embedded default job, offline, on 2 CPU cores in minutes.

For each SimFeat profile (``default`` and ``hetero`` unless ``profile`` says otherwise):
simulates it at the paper's scale (17,000 posts, D = 1024), trains the package's default
model (``sgmft.config.DEFAULT_PRESET``), the recommended SG-MFT, concatenation and the two
single-modality baselines, evaluates them on the held-out 20 % and writes, per profile,
``<out>/<profile>/`` (the store, the runs with their confusion matrices and t-SNE plots, a
t-SNE panel figure), and at the top ``report.md`` and ``results.json/csv`` with overall and
per-regime accuracy beside the oracle's (docs/simfeat.md explains the regimes).
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from sgmft.atomic import write_text
from sgmft.eval.metrics import regime_table
from sgmft.experiments.runner import Row, aggregate_regimes, default_preset, format_table, run_rows, simfeat_config

from sgmft.data.simfeat import PROFILES

PROFILE_CHOICES = ("both", *PROFILES)      # "both": default and hetero
SGMFT_EPOCHS = 4    # SG-MFT is ~5x dearer per epoch than the others: 4 epochs (not its preset's 10)
                    # keep both profiles x 5 models under 10 min on 2 cores; the rest train their own epochs
QUICK = dict(num_posts=3000, test_size=600, dim=256)


def demo_rows() -> list[Row]:
    """The demo's models: the default model first (once, if it is ``sgmft`` itself), then
    SG-MFT, concatenation, the textbook bar (shrinkage LDA, logistic regression) and the
    single-modality baselines."""
    rows = []
    dp = default_preset()
    if dp != "sgmft":
        rows.append(Row(dp, dp, label=f"{dp} (default model)"))
    rows += [Row("sgmft", "sgmft", train=[f"epochs={SGMFT_EPOCHS}"],
                 label="SG-MFT (recommended)" + (" (default model)" if dp == "sgmft" else "")),
             Row("concat", "concat", label="Concatenation (+ CLIP)"),
             Row("lda", "lda", label="Shrinkage LDA (textbook bar)"),
             Row("logreg", "logreg", label="Logistic regression (textbook bar)"),
             Row("text_only", "text_only", label="Text only"),
             Row("image_only", "image_only", label="Image only")]
    return rows


def _profiles(profile: str) -> list[str]:
    if profile not in PROFILE_CHOICES:
        raise InputError(f"unknown demo profile {profile!r}; choose one of {', '.join(PROFILE_CHOICES)}")
    return ["default", "hetero"] if profile == "both" else [profile]


def _config(profile: str, quick: bool):
    return simfeat_config(profile, **(QUICK if quick else {}))


def _run_profile(out: Path, profile: str, rows: list[Row], *, quick: bool, seeds: int, epochs: int | None,
                 progress: bool) -> dict:
    from sgmft.data.simfeat import write_simfeat
    from sgmft.eval.plots import plot_tsne_panels
    from sgmft.features import FeatureStore

    cfg = _config(profile, quick)
    pdir = out / profile
    pdir.mkdir(parents=True, exist_ok=True)
    store = pdir / "simfeat"
    if (store / "meta.json").exists():
        have = FeatureStore.open(store, validate=False).meta.get("extra", {}).get("simfeat", {}).get("config")
        from dataclasses import asdict

        if have != json.loads(json.dumps(asdict(cfg))):
            raise InputError(f"{store}: holds a SimFeat store made with other settings "
                             f"(e.g. --quick vs. full scale); use another --out")
    else:
        print(f"[demo] {profile}: simulating SimFeat ({cfg.num_posts} posts, D={cfg.dim}) -> {store}", flush=True)
        write_simfeat(store, cfg)
    fs = FeatureStore.open(store)
    oracle = fs.meta["extra"]["simfeat"]["oracle"]
    print(f"[demo] {profile}: oracle (Bayes-optimal) test accuracy {oracle['test_accuracy']:.4f}", flush=True)
    extra = [f"epochs={epochs}"] if epochs else None

    def report(row, seed, m):
        print(f"[demo] {profile}: {row.label:34s} seed {seed}: accuracy {m['accuracy']:.4f}  "
              f"acc/oracle {m.get('accuracy_over_oracle', float('nan')):.3f}  ({m.get('train_seconds', 0):.0f} s)",
              flush=True)

    table, results = run_rows(rows, fs, pdir, seeds=range(seeds), extra_train=extra, progress=progress,
                              tsne_max_points=400 if quick else 1000, on_result=report)
    labels = {r.name: r.label for r in rows}
    regimes = aggregate_regimes(results)
    panels = []
    for r in rows:
        z = np.load(pdir / "runs" / r.name / "seed0" / "eval-test" / "tsne_coords.npz")
        panels.append((labels[r.name], z["coords"], z["labels"]))
    plot_tsne_panels(panels, fs.label_names, pdir / "tsne_panels.png", ncols=3 if len(rows) > 4 else 2,
                     title=f"SimFeat profile {profile}: t-SNE of M_fuse per model (test split)")
    return {"profile": profile, "config": cfg, "store": str(store), "simfeat": fs.meta["extra"]["simfeat"],
            "table": table, "regimes": regimes, "labels": labels,
            "md": format_table(table, labels),
            "regime_md": regime_table({labels[k]: v for k, v in regimes.items()})}


def run_demo(out_dir="reports/demo", *, quick: bool = False, seeds: int = 1, progress: bool = True,
             profile: str = "both", epochs: int | None = None) -> dict:
    """Run the demo for ``profile`` (``both``, ``default`` or ``hetero``); finished runs are reused.

    ``epochs`` (every run) defaults to 3 with ``quick``; otherwise each preset trains its own
    epochs except SG-MFT (:data:`SGMFT_EPOCHS`)."""
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = demo_rows()
    epochs = epochs or (3 if quick else None)
    done = {p: _run_profile(out, p, rows, quick=quick, seeds=seeds, epochs=epochs, progress=progress)
            for p in _profiles(profile)}
    md = ["# sgmft demo report", ""]
    for p, d in done.items():
        cfg, o = d["config"], d["simfeat"]["oracle"]
        section = [f"## SimFeat profile `{p}`", "",
                   f"{cfg.num_posts} posts, D = {cfg.dim}, {len(d['simfeat']['oracle'].get('test_regime_counts', {})) or '?'} "
                   f"regimes; oracle test accuracy {100 * o['test_accuracy']:.2f} % "
                   f"(text-only oracle {100 * o['text_only_test_accuracy']:.2f} %, "
                   f"image-only oracle {100 * o['image_only_test_accuracy']:.2f} %); "
                   f"{f'{epochs} epochs per run' if epochs else f'each preset its own epochs, SG-MFT {SGMFT_EPOCHS}'}, "
                   f"{seeds} seed(s).", "", d["md"], "",
                   "Accuracy (%) per regime on the test split, beside the oracle's on the same posts:", "",
                   d["regime_md"], "",
                   f"![t-SNE of M_fuse per model, profile {p}]({p}/tsne_panels.png)", ""]
        md += section
        print("\n" + "\n".join(section[:-2]), flush=True)
    md += ["Per-model reports (metrics.json with `accuracy_by_regime`, confusion.png, tsne.png): "
           "`<profile>/runs/<model>/seed<k>/eval-test/`.", "", f"Total time {time.time() - t0:.0f} s.", ""]
    summary = {"quick": quick, "seeds": seeds, "epochs": epochs, "profiles": list(done),
               "results": {p: {k: d[k] for k in ("store", "simfeat", "table", "regimes")} for p, d in done.items()},
               "seconds": round(time.time() - t0, 1)}
    write_text(out / "results.json", json.dumps(summary, indent=2))
    recs = [{"profile": p, **r} for p, d in done.items() for r in d["table"]]
    for rec in recs:
        for reg, v in done[rec["profile"]]["regimes"].get(rec["row"], {}).items():
            rec[f"acc_{reg}"] = v["accuracy"]
            rec[f"oracle_{reg}"] = v["oracle_accuracy"]
    keys = list(dict.fromkeys(k for r in recs for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(recs)
    write_text(out / "results.csv", buf.getvalue())
    write_text(out / "report.md", "\n".join(md))
    print(f"[demo] report: {out / 'report.md'}  ({time.time() - t0:.0f} s)", flush=True)
    return summary
