"""benchmarks/bench_candidates.py: the table lines each candidate's figure up under its own column, also when
stores trained different candidates (trust_mda only where a place has 150 training posts)."""

from conftest import load_benchmark


def _row(store, before, after, runs):
    res = lambda acc, chosen: {"accuracy": acc, "chosen": chosen, "ece": 0.05, "mean_confidence": acc}   # noqa: E731
    return {"store": store, "before": res(*before), "after": res(*after), "candidate_runs": runs}


def test_table_aligns_candidates_and_counts_changes():
    bench = load_benchmark("bench_candidates")
    rows = [_row("small", (0.50, "trust_lda"), (0.52, "lda_product"), {"lda": 0.40, "trust": 0.30}),
            _row("large", (0.70, "trust"), (0.70, "trust"), {"lda": 0.60, "trust": 0.65, "trust_mda": 0.66})]
    out = bench.table(rows).splitlines()
    assert out[0].endswith("| lda | trust | trust_mda |")
    assert out[2].endswith("| +2.00 | 0.050 / 0.050 | +0.0 / +0.0 | 40.00 | 30.00 | - |")
    assert out[3].endswith("| 60.00 | 65.00 | 66.00 |")
    assert out[-1] == "mean after − before over 2 stores: +1.00 points; 1 up, 0 down, 1 the same"


def test_peer_table_puts_the_default_against_the_best_peer():
    """``--peers``: each peer under its own column, '-' where a store did not train it, and the default's margin
    over the best peer of its row (a store without peers is left out)."""
    bench = load_benchmark("bench_candidates")
    peer = lambda acc: {"accuracy": acc}     # noqa: E731
    rows = [{**_row("E0", (0.5, "trust"), (0.55, "lda_product"), {}), "peers": {"lda": peer(0.50), "pdf": peer(0.57)}},
            {**_row("E1", (0.6, "trust"), (0.60, "trust"), {}), "peers": {"lda": peer(0.58)}},
            _row("C0", (0.6, "trust"), (0.60, "trust"), {})]
    out = bench.peer_table(rows).splitlines()
    assert out[0] == "| store | default (chose) | `lda` | `pdf` | default − best other |"
    assert out[2] == "| E0 | 55.00 (lda_product) | 50.00 | 57.00 | -2.00 |"
    assert out[3] == "| E1 | 60.00 (trust) | 58.00 | - | +2.00 |" and len(out) == 4


def test_selection_summary_counts_the_choice_against_the_best_run_and_the_validation_argmax():
    """The loss is the best candidate run minus the chosen candidate's run; the alternative takes each store's
    candidate most accurate on validation (a store where it is the chosen one does not change)."""
    bench = load_benchmark("bench_candidates")
    rows = [{**_row("A", (0.7, "trust_lda"), (0.7, "trust_lda"), {"trust_lda": 0.70, "trust_mda": 0.72}),
             "candidate_val": {"trust_lda": 0.69, "trust_mda": 0.71}},
            {**_row("B", (0.6, "trust_lda"), (0.6, "trust_lda"), {"trust_lda": 0.60, "trust_mda": 0.59}),
             "candidate_val": {"trust_lda": 0.65, "trust_mda": 0.60}}]
    out = bench.selection_summary(rows).splitlines()
    assert out[0] == ("the chosen candidate's run is the best candidate run on 1 of 2 stores; loss against the best: "
                      "mean 1.00 points, largest 2.00 (A)")
    assert out[1] == ("the default against its chosen candidate's run (a committee or refit: more posts): +0.00 to "
                      "+0.00 points, above on 0 of 2")
    assert out[-1] == "the most accurate on validation instead: 1 stores change, mean 65.00 -> 66.00 %"
    assert len(bench.selection_summary([{k: v for k, v in r.items() if k != "candidate_val"} for r in rows])
               .splitlines()) == len(out) - 1
