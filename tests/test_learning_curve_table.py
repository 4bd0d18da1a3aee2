"""benchmarks/learning_curve_table.py: the learning curves' markdown tables and their command line."""

import csv

import pytest

from conftest import load_benchmark

FIELDS = ["size", "n_train_posts", "model", "seed", "accuracy", "oracle_accuracy", "accuracy_over_oracle"]


def _write(path, cells):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for size, model, seed, acc in cells:
            w.writerow({"size": size, "n_train_posts": int(size * 0.8), "model": model, "seed": seed,
                        "accuracy": acc, "oracle_accuracy": 0.9, "accuracy_over_oracle": acc / 0.9})
    return str(path)


def test_the_table_gives_mean_sd_and_the_default_margin_over_the_best_other(tmp_path):
    bench = load_benchmark("learning_curve_table")
    path = _write(tmp_path / "lc.csv", [(500, "lda", 0, 0.70), (500, "lda", 1, 0.72), (500, "auto", 0, 0.75),
                                        (500, "auto", 1, 0.77), (500, "pdf", 0, 0.74), (500, "pdf", 1, 0.74),
                                        (1000, "auto", 0, 0.80), (1000, "pdf", 0, 0.81)])
    lines = bench.table(path).splitlines()
    assert lines[0].startswith("| posts | **auto** | lda | pdf |")
    assert lines[2] == "| 500 | 76.00 ± 1.41 | 71.00 ± 1.41 | 74.00 ± 0.00 | +2.00 |"
    assert lines[3] == "| 1,000 | 80.00 | - | 81.00 | -1.00 |"


def test_the_command_line_refuses_a_missing_csv_in_one_line(tmp_path, capsys):
    bench = load_benchmark("learning_curve_table")
    with pytest.raises(SystemExit) as e:
        bench.main([str(tmp_path / "nope.csv")])
    assert e.value.code == 2 and "no such CSV" in capsys.readouterr().err


def test_the_command_line_prints_one_table_per_csv(tmp_path, capsys):
    bench = load_benchmark("learning_curve_table")
    a = _write(tmp_path / "a.csv", [(500, "auto", 0, 0.75), (500, "lda", 0, 0.70)])
    b = _write(tmp_path / "b.csv", [(500, "auto", 0, 0.60), (500, "lda", 0, 0.65)])
    bench.main([a, b])
    out = capsys.readouterr().out
    assert "| 500 | 75.00 | 70.00 | +5.00 |" in out and "| 500 | 60.00 | 65.00 | -5.00 |" in out


def test_default_names_the_model_whose_margin_the_table_gives(tmp_path, capsys):
    bench = load_benchmark("learning_curve_table")
    a = _write(tmp_path / "a.csv", [(500, "auto", 0, 0.75), (500, "lda", 0, 0.70)])
    bench.main([a, "--default", "lda"])
    out = capsys.readouterr().out
    assert "| posts | **lda** | auto |" in out and "| 500 | 70.00 | 75.00 | -5.00 |" in out
