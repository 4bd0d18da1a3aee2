"""``sgmft demo``: the embedded default job, offline, on 2 CPU cores in minutes.

Simulates SimFeat at the paper's scale, trains the recommended SG-MFT and three baselines
(concatenation, text only, image only), evaluates them on the held-out 20 % and writes a
report folder: report.md, results.json/csv, per-model confusion matrices and t-SNE plots,
and one figure with a t-SNE panel per model.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from sgmft.atomic import write_text
from sgmft.experiments.runner import Row, format_table, run_rows

ROWS = [
    Row("sgmft", "sgmft", label="SG-MFT (recommended)"),
    Row("concat", "concat", label="Concatenation (+ CLIP)"),
    Row("text_only", "text_only", label="Text only"),
    Row("image_only", "image_only", label="Image only"),
]


def run_demo(out_dir="reports/demo", *, quick: bool = False, seeds: int = 1, progress: bool = True) -> dict:
    from sgmft.data.simfeat import SimFeatConfig, write_simfeat
    from sgmft.eval.plots import plot_tsne_panels
    from sgmft.features import FeatureStore

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = SimFeatConfig(num_posts=3000, test_size=600, dim=256) if quick else SimFeatConfig()
    store = out / "simfeat"
    if not (store / "meta.json").exists():
        print(f"[demo] simulating SimFeat: {cfg.num_posts} posts, D={cfg.dim} -> {store}", flush=True)
        write_simfeat(store, cfg)
    fs = FeatureStore.open(store)
    oracle = fs.meta["extra"]["simfeat"]["oracle"]
    print(f"[demo] oracle (Bayes-optimal) test accuracy: {oracle['test_accuracy']:.4f}", flush=True)
    extra = ["epochs=3"] if quick else None

    def report(row, seed, m):
        print(f"[demo] {row.label:24s} seed {seed}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}"
              f"  ({m.get('train_seconds', 0):.0f} s)", flush=True)

    table, results = run_rows(ROWS, fs, out, seeds=range(seeds), extra_train=extra, progress=progress,
                              tsne_max_points=600 if quick else 1500, on_result=report)
    labels = {r.name: r.label for r in ROWS}
    md = format_table(table, labels)
    print("\n" + md + f"\n\noracle accuracy {100 * oracle['test_accuracy']:.2f} %", flush=True)

    panels = []
    for r in ROWS:
        z = np.load(out / "runs" / r.name / "seed0" / "eval-test" / "tsne_coords.npz")
        panels.append((labels[r.name], z["coords"], z["labels"]))
    plot_tsne_panels(panels, fs.label_names, out / "tsne_panels.png", ncols=2)

    summary = {"store": str(store), "simfeat": fs.meta["extra"]["simfeat"], "quick": quick,
               "seeds": seeds, "table": table, "seconds": round(time.time() - t0, 1)}
    write_text(out / "results.json", json.dumps(summary, indent=2))
    buf = io.StringIO()
    keys = sorted({k for r in table for k in r})
    w = csv.DictWriter(buf, fieldnames=["row"] + [k for k in keys if k != "row"])
    w.writeheader()
    w.writerows(table)
    write_text(out / "results.csv", buf.getvalue())
    write_text(out / "report.md", "\n".join([
        "# sgmft demo report", "",
        f"SimFeat: {cfg.num_posts} posts, D = {cfg.dim}, {len(fs.label_names)} classes, "
        f"oracle test accuracy {100 * oracle['test_accuracy']:.2f} % "
        f"(text-only oracle {100 * oracle['text_only_test_accuracy']:.2f} %, "
        f"image-only oracle {100 * oracle['image_only_test_accuracy']:.2f} %).", "",
        md, "",
        "Per-model reports (metrics.json, confusion.png, tsne.png): `runs/<model>/seed<k>/eval-test/`.", "",
        "![t-SNE of M_fuse per model](tsne_panels.png)", "",
        f"Total time {time.time() - t0:.0f} s.", ""]))
    print(f"[demo] report: {out / 'report.md'}  ({time.time() - t0:.0f} s)", flush=True)
    return summary
