"""The README's main job, at smoke scale: simulate, train four models, report."""

import json

import pytest

from sgmft.experiments.demo import run_demo


@pytest.mark.slow
def test_quick_demo_writes_report(tmp_path):
    summary = run_demo(tmp_path / "demo", quick=True, progress=False)
    rows = {r["row"]: r for r in summary["table"]}
    assert set(rows) == {"sgmft", "concat", "text_only", "image_only"}
    for r in rows.values():
        assert 0.125 < r["accuracy_mean"] <= 1 and 0 < r["accuracy_over_oracle_mean"] < 1.2
    # multimodal models beat single-modality ones even at smoke scale
    assert rows["concat"]["accuracy_mean"] > rows["text_only"]["accuracy_mean"]
    for f in ("report.md", "results.json", "results.csv", "tsne_panels.png"):
        assert (tmp_path / "demo" / f).stat().st_size > 0
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["quick"] is True
