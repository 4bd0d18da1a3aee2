"""The README's main job, at smoke scale: simulate both profiles, train the demo's models, report."""

import json

import pytest

from sgmft.cli import main
from sgmft.experiments.demo import demo_rows


@pytest.mark.slow
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
