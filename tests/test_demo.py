"""The README's main job, at smoke scale: simulate both profiles, train the demo's models, report."""

import json

import pytest

from sgmft.cli import main
from sgmft.experiments.demo import demo_rows
from sgmft.experiments.runner import default_preset


@pytest.mark.slow
@pytest.mark.timeout(1800)    # the slow suite's longest test: 8-11 min on 2 busy cores
def test_quick_demo_writes_report(tmp_path, capsys):
    """`sgmft demo --quick` (in the README), with --json: stdout is the summary, the log is on stderr."""
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress", "--json"]) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out)
    assert "[demo]" in cap.err and "[demo]" not in cap.out
    assert summary["profiles"] == ["default", "hetero"]
    for profile in summary["profiles"]:
        rows = {r["row"]: r for r in summary["results"][profile]["table"]}
        assert set(rows) == {r.name for r in demo_rows()} >= {"sgmft", "concat", "text_only", "image_only"}
        for r in rows.values():
            assert 0.125 < r["accuracy_mean"] <= 1 and 0 < r["accuracy_over_oracle_mean"] < 1.2
        # multimodal models beat single-modality ones even at smoke scale
        assert rows["concat"]["accuracy_mean"] > rows["text_only"]["accuracy_mean"]
        assert (tmp_path / "demo" / profile / "tsne_panels.png").stat().st_size > 0
    for f in ("report.md", "results.json", "results.csv"):
        assert (tmp_path / "demo" / f).stat().st_size > 0
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["quick"] is True
    _check_regime_columns(tmp_path / "demo", summary)


def _check_regime_columns(out, summary):
    """Both profiles report accuracy per regime beside the oracle's (docs/simfeat.md), in report.md,
    the summary and results.csv. (One quick demo serves both checks: it is the slow suite's dearest run.)"""
    report = (out / "report.md").read_text()
    assert "## SimFeat profile `default`" in report and "## SimFeat profile `hetero`" in report
    assert "| image_other_place (n=" in report and "| both (n=" in report
    for p in ("default", "hetero"):
        regs = summary["results"][p]["regimes"]
        assert default_preset() in regs and "concat" in regs and "text_only" in regs
        oracle = summary["results"][p]["simfeat"]["oracle"]["test_accuracy_by_regime"]
        assert {k: v["oracle_accuracy"] for k, v in regs["concat"].items()} == {k: oracle.get(k) for k in regs["concat"]}
    head = (out / "results.csv").read_text().splitlines()[0]
    assert "profile" in head and "acc_image_generic" in head and "oracle_image_generic" in head
