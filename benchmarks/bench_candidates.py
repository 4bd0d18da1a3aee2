"""The default with and without some of its candidates, on small stores scored on a large test split.

A small store's own test split (120-500 posts) has a binomial standard error of 2-4 points, larger than
most differences a change to the default makes. This benchmark draws ``--pooled`` training and validation
posts (what a store of pooled / 0.8 posts holds) and ``--test-posts`` test posts from the same world, trains
``auto`` without the candidates named by ``--without`` ("before") and as it is ("after") in one run folder
(the candidates and folds they share train once), and scores both on the large test split, with every
trained candidate's run on the split beside them. ``--peers`` also trains the named presets (textbook baselines
and peers: ``lda logreg concat qmf pdf``) on the same pooled posts, each carving its own validation split, and
scores them on the same test posts. Worlds: family C, D and E variants (``benchmarks/family_c.py``) and SimFeat
profiles (``sgmft simulate``). One JSON line per store:

    python benchmarks/bench_candidates.py --workdir W --without lda_product trust_lda+lda_product \\
        --family D0 D1 D2 D3 C0 C1 C2 C3 C4 C5 C6 C7 --simfeat wide768 hetero conflict default \\
        --out benchmarks/results-bench_candidates-lda_product.jsonl
    python benchmarks/bench_candidates.py --table benchmarks/results-bench_candidates-lda_product.jsonl

Family E (phenomena the default was not built on: a topic shown in both modalities, looks shared by every
place, a per-user offset), drawn once after the default's last change, against its baselines and peers:

    python benchmarks/bench_candidates.py --workdir W --family E0 E1 E2 E3 E4 E5 E6 E7 \\
        --peers lda logreg concat qmf pdf --out benchmarks/results-bench_candidates-family_e.jsonl
    python benchmarks/bench_candidates.py --workdir W2 --pooled 2000 --family E0 E1 E2 E3 E4 E5 E6 E7 \\
        --peers lda logreg concat qmf pdf --out benchmarks/results-bench_candidates-family_e-2500.jsonl
    python benchmarks/bench_candidates.py --table benchmarks/results-bench_candidates-family_e.jsonl

Every family C, D and E world at 500 and 8,000 posts (docs/design.md, item 25; at 8,000 the validation split
holds 512 posts, so the default chooses on it without cross-validation):

    python benchmarks/bench_candidates.py --workdir W3 --pooled 400 --family C0 C1 C2 C3 C4 C5 C6 C7 \\
        D0 D1 D2 D3 E0 E1 E2 E3 E4 E5 E6 E7 --peers lda logreg concat qmf pdf \\
        --out benchmarks/results-bench_candidates-500.jsonl
    python benchmarks/bench_candidates.py --workdir W4 --pooled 6400 --family C0 C1 C2 C3 C4 C5 C6 C7 \\
        D0 D1 D2 D3 E0 E1 E2 E3 E4 E5 E6 E7 --peers lda logreg concat qmf pdf \\
        --out benchmarks/results-bench_candidates-8000.jsonl

Re-running with the same workdir reuses every finished run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def _family_store(variant: str, pooled: int, test: int, path: Path) -> None:
    from family_c import VARIANTS, generate, write_store

    if path.exists():
        return
    d = generate(pooled + test, **VARIANTS[variant])
    d["split"] = np.array(["train"] * pooled + ["test"] * test)
    write_store(path, d)


def _simfeat_store(profile: str, pooled: int, test: int, path: Path) -> None:
    if not path.exists():
        subprocess.run([sys.executable, "-m", "sgmft", "simulate", str(path), "--profile", profile, "--num-posts",
                        str(pooled + test), "--set", f"test_size={test}"], check=True, capture_output=True)


def _auto(store: Path, out: Path, without: list[str]) -> dict:
    from family_c import _score
    from sgmft.config import load_preset
    from sgmft.train import train

    p = load_preset("auto")
    p.candidates = [c for c in p.candidates if c not in without]
    train(store, out, p)
    sel = json.loads((out / "run.json").read_text())["selection"]
    return {**_score(out, store), "chosen": sel["chosen"], "candidates": p.candidates,
            "cv": sel.get("cross_validation", {}).get("accuracy")}


def _peer(store: Path, out: Path, preset: str) -> dict:
    from family_c import _score
    from sgmft.train import train

    train(store, out, preset)          # a complete run is left as it is
    return _score(out, store)


def run(name: str, store: Path, without: list[str], peers: list[str] = ()) -> dict:
    from family_c import _score

    out = store.parent / "auto"
    before = _auto(store, out, without)
    row = {"store": name, "before": before, "after": _auto(store, out, []) if without else before}
    row["candidate_runs"] = {c.name: _score(c, store)["accuracy"] for c in sorted((out / "candidates").iterdir())
                             if (c / "model").is_dir()}
    sel = json.loads((out / "run.json").read_text())["selection"]["candidates"]
    row["candidate_val"] = {n: c["val_acc"] for n, c in sel.items() if c.get("val_acc") is not None}
    if peers:
        row["peers"] = {p: _peer(store, store.parent / "peers" / p, p) for p in peers}
    return row


def selection_summary(rows: list[dict]) -> str:
    """What the choice cost on the test split: how often the chosen candidate's run is the best candidate run,
    the mean and largest loss against it, and (rows with ``candidate_val``) the mean test accuracy had the
    candidate most accurate on validation been taken instead of the one-standard-error rule's."""
    runs = [(r, r["candidate_runs"]) for r in rows if r["after"]["chosen"] in r["candidate_runs"]]
    loss = {r["store"]: 100 * (max(c.values()) - c[r["after"]["chosen"]]) for r, c in runs}
    worst = max(loss, key=loss.get)
    lines = [f"the chosen candidate's run is the best candidate run on {sum(v == 0 for v in loss.values())} of "
             f"{len(loss)} stores; loss against the best: mean {np.mean(list(loss.values())):.2f} points, "
             f"largest {loss[worst]:.2f} ({worst})"]
    gain = [100 * (r["after"]["accuracy"] - c[r["after"]["chosen"]]) for r, c in runs]
    gap = [100 * (r["after"]["mean_confidence"] - r["after"]["accuracy"]) for r in rows]
    lines += [f"the default against its chosen candidate's run (a committee or refit: more posts): {min(gain):+.2f} to "
              f"{max(gain):+.2f} points, above on {sum(g > 0 for g in gain)} of {len(gain)}",
              f"the default's ECE {min(r['after']['ece'] for r in rows):.3f}-{max(r['after']['ece'] for r in rows):.3f}, "
              f"confidence − accuracy {min(gap):+.1f} to {max(gap):+.1f} points"]
    if all("lda" in r.get("peers", {}) for r in rows):
        ece = [r["peers"]["lda"]["ece"] for r in rows]
        lines.append(f"the lda preset's ECE {min(ece):.3f}-{max(ece):.3f}")
    if runs and all(r.get("candidate_val") for r, _ in runs):
        alt = [max(r["candidate_val"], key=r["candidate_val"].get) for r, _ in runs]
        lines.append(f"the most accurate on validation instead: {sum(a != r['after']['chosen'] for a, (r, _) in zip(alt, runs))}"
                     f" stores change, mean {100 * np.mean([c[r['after']['chosen']] for r, c in runs]):.2f} -> "
                     f"{100 * np.mean([c[a] for a, (_, c) in zip(alt, runs)]):.2f} %")
    return "\n".join(lines)


def peer_table(rows: list[dict]) -> str:
    """Markdown: the default (after) against every peer a row trained, and its margin over the best of them."""
    cols = sorted({p for r in rows for p in r.get("peers", {})})
    lines = ["| store | default (chose) | " + " | ".join(f"`{c}`" for c in cols) + " | default − best other |",
             "|---" * (3 + len(cols)) + "|"]
    for r in (r for r in rows if r.get("peers")):
        a, peers = r["after"], {c: 100 * v["accuracy"] for c, v in r["peers"].items()}
        lines.append(f"| {r['store']} | {100 * a['accuracy']:.2f} ({a['chosen']}) | "
                     + " | ".join(f"{peers[c]:.2f}" if c in peers else "-" for c in cols)
                     + f" | {100 * a['accuracy'] - max(peers.values()):+.2f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    cols = sorted({c for r in rows for c in r["candidate_runs"]})       # a candidate not trained on a store: -
    lines = ["| store | before (chose) | after (chose) | after − before | ECE before / after | confidence − accuracy "
             "before / after | " + " | ".join(cols) + " |", "|---" * (6 + len(cols)) + "|"]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['store']} | {100 * b['accuracy']:.2f} ({b['chosen']}) | {100 * a['accuracy']:.2f} "
                     f"({a['chosen']}) | {100 * (a['accuracy'] - b['accuracy']):+.2f} | {b['ece']:.3f} / {a['ece']:.3f} | "
                     f"{100 * (b['mean_confidence'] - b['accuracy']):+.1f} / {100 * (a['mean_confidence'] - a['accuracy']):+.1f} | "
                     + " | ".join("-" if r["candidate_runs"].get(c) is None else f"{100 * r['candidate_runs'][c]:.2f}"
                                  for c in cols) + " |")
    d = [r["after"]["accuracy"] - r["before"]["accuracy"] for r in rows]
    lines.append(f"\nmean after − before over {len(rows)} stores: {100 * np.mean(d):+.2f} points; "
                 f"{sum(x > 0 for x in d)} up, {sum(x < 0 for x in d)} down, {sum(x == 0 for x in d)} the same")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--without", nargs="+", default=[], help="candidates of auto left out for 'before'")
    ap.add_argument("--family", nargs="*", default=[], help="family C/D/E variants (benchmarks/family_c.py)")
    ap.add_argument("--simfeat", nargs="*", default=[], help="SimFeat profiles")
    ap.add_argument("--pooled", type=int, default=800, help="training and validation posts (a store of 1,000)")
    ap.add_argument("--test-posts", type=int, default=5200)
    ap.add_argument("--peers", nargs="*", default=[], help="presets trained beside it on the same posts "
                    "(lda logreg concat qmf pdf)")
    ap.add_argument("--out", type=Path, help="append one JSON line per store here")
    ap.add_argument("--table", type=Path, help="print the markdown table of a results file and exit")
    a = ap.parse_args(argv)
    if a.table:
        rows = [json.loads(line) for line in a.table.read_text().splitlines() if line.strip()]
        if any(r["before"]["candidates"] != r["after"]["candidates"] for r in rows):     # --without
            print(table(rows) + "\n")
        if any(r.get("peers") for r in rows):
            print(peer_table(rows))
        print("\n" + selection_summary(rows))
        return 0
    if a.workdir is None:
        ap.error("--workdir is required unless --table is given")
    warnings.filterwarnings("ignore")
    stores = ([(v, lambda v, p: _family_store(v, a.pooled, a.test_posts, p)) for v in a.family]
              + [(s, lambda s, p: _simfeat_store(s, a.pooled, a.test_posts, p)) for s in a.simfeat])
    for name, make in stores:
        store = a.workdir / name / "store"
        make(name, store)
        row = {**run(name, store, a.without, a.peers), "pooled": a.pooled, "test_posts": a.test_posts}
        print(json.dumps(row), flush=True)
        if a.out:
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
