"""`sgmft experiments`: suite configs, an end-to-end quick suite on tiny data, resume, checks."""

import csv
import json

import pytest
import yaml

from sgmft.experiments.tables import (collect_rows, format_paper_table, list_tables, load_suite, load_table,
                                      table_csv, table_rows)

TINY_SCALE = {
    "description": "tiny test scale",
    "simfeat": {"num_posts": 240, "test_size": 60, "dim": 32, "content_dim": 8, "num_users": 8,
                "mc_samples": 2000},
    "simfeat_small": {"num_posts": 160, "test_size": 40, "dim": 16, "content_dim": 8, "num_users": 8,
                      "mc_samples": 2000},
    "simposts": {"num_posts": 40, "num_users": 4, "image_size": 32},
    "train": ["epochs=1", "batch_size=32"],
    "seeds": 1,
    "tsne_points": 40,
}


def _write_suite(tmp_path, with_cnn=True):
    a = {"name": "tabA", "title": "Table A. tiny", "caption": "test", "seeds": {"quick": 2},
         "rows": [{"name": "concat", "preset": "concat", "label": "Concat", "paper": 84.91},
                  {"name": "gate", "preset": "mm_gate", "model": ["extra={hidden: 16}"], "label": "MM-Gate"},
                  {"name": "sg_coattn", "preset": "sgmft", "model": ["fusion=coattn", "n_tokens=8"],
                   "label": "Co-attention"},
                  {"name": "paper_small", "preset": "paper", "data": "simfeat-small",
                   "label": "paper-literal", "scales": {"quick": {"model": ["n_tokens=16"], "seeds": 1,
                                                                  "note": "tiny"}}}]}
    b = {"name": "tabB", "title": "Table B. tiny", "rows": [{"name": "concat", "preset": "concat", "label": "Concat"}]}
    if with_cnn:
        b["rows"].append({"name": "cnn", "preset": "baseline_cnn", "data": "simposts-cnn", "label": "CNN baseline"})
    (tmp_path / "tabA.yaml").write_text(yaml.safe_dump(a), encoding="utf-8")
    (tmp_path / "tabB.yaml").write_text(yaml.safe_dump(b), encoding="utf-8")
    suite = {"tables": ["tabA.yaml", "tabB.yaml"], "scales": {"quick": TINY_SCALE}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite), encoding="utf-8")
    return path


def test_packaged_suite_configs_load_and_share_the_full_model():
    assert {"table1", "table2", "table3", "table4"} <= set(list_tables())
    suite = load_suite()
    for scale in ("quick", "default", "full"):
        rows = collect_rows(suite.tables, scale)        # same name = same config, checked
        assert "sgmft" in rows and rows["sgmft"].preset == "sgmft"
    t3 = load_table("table3")
    fusions = {m.split("=")[1] for r in t3.rows for m in r.model if m.startswith("fusion=")}
    assert fusions == {"asym_coattn", "merge_attn", "coattn"}
    t2 = {r.name: r for r in load_table("table2").rows}
    assert t2["sgmft__no_sim"].model == ["use_sim=false", "fusion=sfm"]
    assert t2["sgmft__fusion_concat"].model == ["use_sim=true", "fusion=concat"]
    assert t2["baseline_cnn"].data == "simposts-cnn"
    assert load_table("table4").rows[0].model == ["ffn_side=image"]
    # every row resolves to a valid preset + overrides at every scale
    for scale in ("quick", "default", "full"):
        sc = suite.scale(scale)
        for r in collect_rows(suite.tables, scale).values():
            p = r.row(scale, sc["train"]).resolve(0)
            p.model.validate()
            assert p.train.epochs >= 1


def test_same_row_name_with_another_config_is_refused(tmp_path):
    a = load_table("table3")
    bad = {"name": "bad", "rows": [{"name": "sgmft", "preset": "sgmft", "model": ["fusion=sum"]}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad), encoding="utf-8")
    with pytest.raises(ValueError, match="defined differently"):
        collect_rows([a, load_table(tmp_path / "bad.yaml")], "default")


def test_table_layout_and_csv():
    spec = load_table("table4")
    agg = {"sgmft": {"row": "sgmft", "seeds": 3, "accuracy_mean": 0.8, "accuracy_std": 0.01,
                     "macro_f1_mean": 0.79, "macro_f1_std": 0.02, "accuracy_over_oracle_mean": 0.9,
                     "accuracy_over_oracle_std": 0.01, "oracle_accuracy": 0.88, "train_seconds_mean": 12.0,
                     "train_seconds_std": 1.0}}
    recs = table_rows(spec, agg)
    md = format_paper_table(spec, recs)
    assert "| Text-wise (ours) | 87.29 | 80.00 ± 1.00 |" in md
    assert "| Image-wise | 86.88 | n/a |" in md
    rows = list(csv.DictReader(table_csv(recs).splitlines()))
    assert rows[1]["row"] == "sgmft" and float(rows[1]["accuracy_mean"]) == 0.8 and rows[0]["seeds"] == "0"


def test_quick_suite_end_to_end_resumes_and_refuses_other_scale(tmp_path, monkeypatch, capsys):
    from sgmft.cli import main
    from sgmft.features.backbones.cnn_wordemb import cnn_available

    with_cnn = cnn_available()[0]
    cfg = _write_suite(tmp_path, with_cnn=with_cnn)
    out = tmp_path / "report"
    assert main(["experiments", "--config", str(cfg), "--quick", "--out", str(out)]) == 0

    for f in ("README.md", "results.json", "tabA.md", "tabA.csv", "tabB.md", "tabB.csv", "tabA_tsne.png",
              "tabB_tsne.png", "data/simfeat/meta.json", "data/simfeat-small/meta.json"):
        assert (out / f).exists(), f
    recs = {r["row"]: r for r in csv.DictReader((out / "tabA.csv").read_text().splitlines())}
    assert recs["concat"]["seeds"] == "2" and recs["gate"]["seeds"] == "2"
    assert recs["paper_small"]["seeds"] == "1"                            # per-row seed cap
    assert 0 < float(recs["concat"]["accuracy_mean"]) <= 1 and float(recs["concat"]["accuracy_std"]) >= 0
    assert float(recs["concat"]["accuracy_over_oracle_mean"]) > 0          # SimFeat oracle carried through
    assert recs["concat"]["paper_accuracy"] == "84.91"
    assert sorted(p.name for p in (out / "runs" / "concat").iterdir()) == ["seed0", "seed1"]  # shared run
    readme = (out / "README.md").read_text()
    assert "Table A. tiny" in readme and "tabA_tsne.png" in readme and "paper-literal [tiny]" in readme
    assert "scale **quick**" in readme
    if with_cnn:
        b = {r["row"]: r for r in csv.DictReader((out / "tabB.csv").read_text().splitlines())}
        assert b["cnn"]["data"] == "simposts-cnn" and b["cnn"]["accuracy_mean"] != ""
        assert (out / "data" / "simposts-cnn" / "meta.json").exists()
    summary = json.loads((out / "results.json").read_text())
    assert summary["timing"]["runs_trained"] == (7 + (1 if with_cnn else 0))

    # resume: nothing is trained again, and the tables come out the same
    import sgmft.train

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sgmft.train, "train", no_training)
    before = (out / "tabA.csv").read_text()
    capsys.readouterr()
    assert main(["experiments", "--config", str(cfg), "--quick", "--out", str(out), "--json"]) == 0
    assert (out / "tabA.csv").read_text() == before
    assert json.loads(capsys.readouterr().out)["out"] == str(out)      # --json: one document on stdout

    # another scale into the same folder is refused
    assert main(["experiments", "--config", str(cfg), "--out", str(out)]) == 2


def test_changed_row_config_in_existing_folder_is_refused(tmp_path):
    from sgmft.experiments.suite import run_experiments

    cfg = _write_suite(tmp_path, with_cnn=False)
    out = tmp_path / "r"
    table = {"name": "one", "rows": [{"name": "concat", "preset": "concat"}]}
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(table), encoding="utf-8")
    suite = {"tables": ["one.yaml"], "scales": {"quick": TINY_SCALE}}
    cfg = tmp_path / "s1.yaml"
    cfg.write_text(yaml.safe_dump(suite), encoding="utf-8")
    run_experiments(out, config=cfg, scale="quick", log=lambda *_: None)
    table["rows"][0]["train"] = ["lr=0.1"]
    one.write_text(yaml.safe_dump(table), encoding="utf-8")
    with pytest.raises(ValueError, match="another configuration"):
        run_experiments(out, config=cfg, scale="quick", log=lambda *_: None)


def test_cli_registers_experiments_verb():
    from sgmft.cli import build_parser

    args = build_parser().parse_args(["experiments", "--suite", "table3", "--seeds", "2", "--quick"])
    assert args.suite == "table3" and args.seeds == 2 and args.quick and args.out == "reports/experiments"
