"""The mutation check (tests/mutation/check_mutants.py) kills every wrong version of SG-MFT."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "mutation"))
import check_mutants  # noqa: E402


def test_mutation_table_matches_the_source():
    """Fast guard: every pattern occurs exactly once (a refactor must update the table),
    and the table holds at least 15 mutants including the 11 of issue 9."""
    assert check_mutants.check_table(check_mutants.MUTANTS) == []
    names = {m.name for m in check_mutants.MUTANTS}
    assert len(names) >= 15
    assert {"text_ca_roles_swapped", "text_eq12_weights_swapped", "text_eq13_residual_from_image",
            "text_sa_image_kv_projections", "eq16_residual_removed", "eq15_w3_term_removed",
            "eq15_relu_removed", "eq17_query_key_swapped", "eq17_ca2_dropped", "sfm_residual_forced_on",
            "classifier_without_relu"} <= names


@pytest.mark.slow
def test_equation_tests_kill_every_mutant(tmp_path):
    report_path = tmp_path / "mutants.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "mutation" / "check_mutants.py"),
                           "--json", str(report_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert report_path.exists(), proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["baseline"]["status"] == "passed", report["baseline"]
    survivors = [r["name"] for r in report["mutants"] if r["status"] != "killed"]
    assert not survivors, f"mutants not killed: {survivors}\n{proc.stderr[-3000:]}"
    assert report["killed"] == report["total"] == len(check_mutants.MUTANTS) and report["ok"]
    assert proc.returncode == 0, proc.stderr[-3000:]
