"""Per-architecture model options (sgmft.models.options, sgmft.models.registry's resolution; issue 19):
each architecture declares what it reads, configs are checked against it, and --print-config,
run.json, the model card and the fingerprint show only that."""

from __future__ import annotations

import dataclasses
import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml

from sgmft.cli import main
from sgmft.config import ModelConfig, list_presets, load_preset, model_config_from_dict
from sgmft.models import build_model, list_models
from sgmft.models.options import SHARED_FIELDS
from sgmft.models.registry import (apply_model_overrides, arch_options, arch_reads, model_view, options_markdown,
                                   resolve_model)

from conftest import make_store

# the ``defaults`` dicts the models had before typed options: benchmark numbers depend on them
OLD_DEFAULTS = {
    "trust": {"hidden": 0, "generic": 8, "states": "three", "gate": True, "proj_dim": 64, "aux_weight": 0.5,
              "input_dropout": 0.1, "looks": 1, "conflict": "uniform",
              "table_scale": 1.0,       # added after typed options; 1.0 is the model as it was
              "init": "random",                         # added later (eq T6); these are the model as it was
              "start_shrinkage": "ledoit_wolf",         # added with eq T6''; the start as it was
              "theme_start": "all",                     # added later (EM's themes); the start as it was
              "start_inits": 1,                         # added later; one seeded k-means start as it was
              "evidence_lr": 1.0,
              "table_lr": 1.0,                         # added later; 1.0 is the step as it was
              "label_noise": 0.0},                      # added with eq T7; 0 is the cross-entropy as it was
    "qmf": {"hidden": 512, "temperature": 10.0, "uni_weight": 1.0, "rank_weight": 1.0},
    "pdf": {"hidden": 512, "uni_weight": 1.0, "tcp_weight": 1.0, "confid_weight_decay": 1.0,
            "relative_calibration": True},
    "unis_mmc": {"hidden": 512, "proj_dim": 128, "temperature": 0.1, "uni_weight": 1.0, "con_weight": 0.5},
    "balance_mla": {"hidden": 512, "weighting": "learned", "temperature": 1.0, "uni_weight": 1.0},
    "mplug": {"layers": 1}, "bridgetower": {"layers": 2}, "feature_fusion": {"hidden": 512},
    "mm_gate": {"hidden": 512}, "lda": {"shrinkage": "auto"}, "lda_product": {"shrinkage": "auto"}, "logreg": {"c_grid": [0.01, 0.1, 1.0], "max_iter": 300},
    "zeroshot": {"text_weight": 0.5, "logit_scale": 10.0},
    "ensemble": {"members": [], "names": [], "calibrations": [], "weights": [],
                 "pool": "mean"},    # filled in when auto assembles one
}
FLAT = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "extra"]
# the `trust` preset starts at random (init: random): the start's two options are unread, so not shown
TRUST_KEYS = ("dim", "num_classes", "input_scale", "input_norm") + tuple(
    k for k in OLD_DEFAULTS["trust"] if k not in ("start_shrinkage", "start_inits", "theme_start"))


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_declares_what_it_reads_with_todays_defaults(arch):
    reads, opts = arch_reads(arch), arch_options(arch)
    assert set(SHARED_FIELDS) <= set(reads) and opts is not None
    assert opts.defaults() == OLD_DEFAULTS.get(arch, {})


@pytest.mark.parametrize("name", [n for n in list_presets() if not load_preset(n).candidates])
def test_packaged_presets_resolve_and_write_only_fields_their_arch_reads(name):
    p = load_preset(name)
    resolved = resolve_model(p.model)                    # strict: nothing unread differs from the default
    raw = yaml.safe_load((resources.files("sgmft") / "configs" / "models" / f"{name}.yaml").read_text("utf-8"))
    unread = set(raw["model"]) - set(arch_reads(p.model.arch)) - {"extra"}
    assert not unread, f"{name}.yaml sets {sorted(unread)}, which {p.model.arch} does not read"
    assert set(resolved.extra) == set(arch_options(p.model.arch).model_fields)     # every option, resolved
    view = model_view(resolved)
    assert model_view(model_config_from_dict(json.loads(json.dumps(view)))) == view      # the view loads back


def test_the_view_shows_only_what_trust_reads():
    view = model_view(load_preset("trust").model)
    assert tuple(k for k in view if k != "arch" and k != "extra") + tuple(view["extra"]) == TRUST_KEYS
    for unread in ("fusion", "heads", "classifier_hidden", "dropout", "n_tokens"):
        assert unread not in view
    assert view["extra"]["looks"] == 3 and view["extra"]["input_dropout"] == 0.3      # the preset's values


@pytest.mark.parametrize("preset, hidden, shown", [
    ("trust", {"start_shrinkage", "start_inits", "theme_start"}, {"proj_dim", "gate", "conflict"}),
    ("trust_mda", {"proj_dim"}, {"start_shrinkage", "start_inits", "theme_start", "gate", "conflict"}),
])
def test_options_that_the_other_options_leave_unread_are_not_shown(preset, hidden, shown):
    view = model_view(load_preset(preset).model)
    assert not hidden & set(view["extra"]) and shown <= set(view["extra"])
    assert model_view(model_config_from_dict(json.loads(json.dumps(view)))) == view      # and it loads back


def test_an_option_an_override_makes_unread_goes_back_to_its_default():
    two = apply_model_overrides(load_preset("trust").model, ["states=two"])
    assert "conflict" not in model_view(two)["extra"] and "theme_start" not in model_view(two)["extra"]
    # the preset's conflict: learnt, now unread, goes back to its default, so a strict check accepts the result
    assert two.extra["conflict"] == "uniform" and resolve_model(two) == two
    rand = apply_model_overrides(load_preset("trust_mda").model, ["init=random"])
    assert rand.extra["start_shrinkage"] == "ledoit_wolf" and rand.extra["theme_start"] == "all"
    assert resolve_model(rand) == rand


@pytest.mark.parametrize("preset, items, says", [
    ("trust_mda", ["proj_dim=32"], r"proj_dim is read only when gate is true"),
    ("trust_mda", ["proj_dim=64"], r"proj_dim is read only when gate is true"),        # set explicitly, even at its default
    ("trust_mda", ["extra={proj_dim: 32}"], r"proj_dim is read only when gate is true"),  # in a dict override too
    ("trust", ["theme_start=best"], r"theme_start is read only when init is em and states is three"),
    ("trust", ["start_shrinkage=cv"], r"start_shrinkage is read only when init is lda or em"),
    ("trust", ["start_inits=4"], r"start_inits is read only when init is lda or em"),
    ("trust_mda", ["states=two", "conflict=uniform"], r"conflict is read only when states is three"),
])
def test_setting_an_option_the_other_options_leave_unread_is_refused(preset, items, says):
    with pytest.raises(ValueError, match=says):
        apply_model_overrides(load_preset(preset).model, items)


def test_an_unread_option_becomes_settable_with_what_it_depends_on():
    cfg = apply_model_overrides(load_preset("trust_mda").model, ["gate=true", "proj_dim=32"])
    assert model_view(cfg)["extra"]["proj_dim"] == 32
    with pytest.raises(ValueError, match="proj_dim is read only when gate is true"):       # a Python config too
        resolve_model(dataclasses.replace(load_preset("trust_mda").model,
                                          extra={**resolve_model(load_preset("trust_mda").model).extra, "proj_dim": 32}))


def test_overrides_set_options_by_name_or_alias_and_merge():
    base = load_preset("trust").model
    a = apply_model_overrides(base, ["hidden=256"])
    b = apply_model_overrides(base, ["extra.hidden=256"])
    c = apply_model_overrides(base, ["extra={hidden: 256}"])
    assert a == b == c and a.extra == {**resolve_model(base).extra, "hidden": 256}   # merged, not replaced
    assert apply_model_overrides(base, ["aux_weight=0.2"]).extra["aux_weight"] == 0.2
    assert apply_model_overrides(load_preset("sgmft").model, ["dropout=0.3"]).dropout == 0.3


@pytest.mark.parametrize("item, says", [
    ("heads=4", r"heads is not read by arch 'trust'.*takes: .*aux_weight \(extra\)"),
    ("dropout=0.5", r"dropout is not read by arch 'trust'"),
    ("aux_wieght=0.2", r"unknown option 'aux_wieght'.*aux_weight"),
    ("extra.aux_wieght=0.2", r"does not know extra option\(s\) \['aux_wieght'\]"),
    ("hidden=wide", r"hidden='wide' is not allowed; expected an integer"),
    ("states=four", r"states='four' is not allowed; expected one of: 'three', 'two'"),
])
def test_overrides_the_arch_does_not_take_are_refused(item, says):
    with pytest.raises(ValueError, match=says):
        apply_model_overrides(load_preset("trust").model, [item])


def test_a_python_config_with_a_field_the_arch_does_not_read_is_refused_until_loaded():
    cfg = ModelConfig(arch="trust", dropout=0.5)
    with pytest.raises(ValueError, match="dropout is not read by arch 'trust'"):
        resolve_model(cfg)
    assert resolve_model(cfg, strict=False).extra == OLD_DEFAULTS["trust"]   # loading a saved config: accepted
    assert model_view(cfg) == model_view(ModelConfig(arch="trust"))          # and the unread field is not shown


def test_an_old_flat_run_json_model_loads_to_the_same_view():
    """run.json and config.json written before issue 19 list every flat field and the options as given."""
    old = {**dataclasses.asdict(ModelConfig(arch="trust", dim=16, num_classes=4, input_norm="standardize")),
           "extra": {"looks": 3, "conflict": "learnt", "input_dropout": 0.3}, "rank1_chunk": 262144}
    cfg = model_config_from_dict(json.loads(json.dumps(old)))
    trust = load_preset("trust").model                # its table_scale came later; 1.0 is the old model
    new = dataclasses.replace(trust, dim=16, num_classes=4, extra={**trust.extra, "table_scale": 1.0})
    assert model_view(cfg) == model_view(new)
    torch.manual_seed(0)
    a = build_model(cfg).state_dict()
    torch.manual_seed(0)
    b = build_model(new).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_folder_from_before_issue_19_counts_as_the_same_run():
    from sgmft.runs import fingerprint, fingerprint_inputs
    from sgmft.train.fit import _legacy_fingerprint

    cfg = resolve_model(dataclasses.replace(load_preset("trust").model, dim=16, num_classes=4))
    train = dataclasses.asdict(load_preset("trust").train)
    old_inputs = fingerprint_inputs(dataclasses.asdict(cfg), train, None, digest="d")
    info = {"fingerprint": fingerprint(old_inputs), "fingerprint_inputs": old_inputs}
    new_inputs = fingerprint_inputs(model_view(cfg), train, None, digest="d")
    assert fingerprint(new_inputs) != info["fingerprint"]
    assert _legacy_fingerprint(info, new_inputs) == info["fingerprint"]
    other = fingerprint_inputs(model_view(apply_model_overrides(cfg, ["looks=2"])), train, None, digest="d")
    assert _legacy_fingerprint(info, other) is None
    assert _legacy_fingerprint({**info, "fingerprint": "0" * 16}, new_inputs) is None   # inputs not genuine


def test_a_refusal_names_what_differs_not_an_option_added_since():
    """A run recorded before an option existed, on another store: the refusal names the store, not the
    option (which the migration reads at its default)."""
    from sgmft.runs import fingerprint, fingerprint_inputs
    from sgmft.train.fit import _refusal_differences

    view = model_view(resolve_model(dataclasses.replace(load_preset("trust").model, dim=16, num_classes=4)))
    train = dataclasses.asdict(load_preset("trust").train)
    before = {**view, "extra": {k: v for k, v in view["extra"].items() if k != "label_noise"}}
    old_inputs = fingerprint_inputs(before, train, None, digest="d")
    info = {"fingerprint": fingerprint(old_inputs), "fingerprint_inputs": old_inputs}
    now = fingerprint_inputs(view, train, None, digest="e")
    diffs = _refusal_differences(info, now)
    assert len(diffs) == 1 and diffs[0].startswith("store contents"), diffs
    unchecked = {**info, "fingerprint": "0" * 16}           # a record whose inputs are not genuine: as written
    assert any("label_noise" in d for d in _refusal_differences(unchecked, now))


def test_cross_field_checks_apply_only_to_fields_the_arch_reads():
    resolve_model(dataclasses.replace(load_preset("trust").model, dim=30))          # n_tokens=16 is not read
    with pytest.raises(ValueError, match="n_tokens=16 must divide dim=30"):
        resolve_model(dataclasses.replace(load_preset("sgmft").model, dim=30))


def test_docs_options_table_is_the_generated_one():
    doc = (Path(__file__).parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- options:begin -->\n(.*)\n<!-- options:end -->", doc, re.S)
    assert block, "docs/training.md lost its options block"
    assert block.group(1) == options_markdown(), ("docs/training.md's options table is stale; regenerate it: "
                                                  "python -c 'from sgmft.models.registry import options_markdown; "
                                                  "print(options_markdown())'")


# -- the issue's acceptance, through the CLI --------------------------------------------------------
FAST = ["--epochs", "1", "--set", "train.min_steps=0", "--set", "train.batch_size=64", "--no-progress"]


def test_cli_refuses_a_field_trust_does_not_read_listing_its_options(tmp_path, capsys):
    store = make_store(tmp_path / "s", n=80, dim=16, k=4)
    assert main(["train", str(store), "--preset", "trust", "--set", "model.heads=4", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgmft train: error: ") and "Traceback" not in err
    for name in OLD_DEFAULTS["trust"]:
        assert name in err
    assert not (tmp_path / "r").exists()
    assert main(["train", "--print-config", "--preset", "trust", "--set", "model.aux_wieght=0.2"]) == 2
    assert "aux_wieght" in capsys.readouterr().err


def test_cli_hidden_changes_the_model_records_full_options_and_matches_python(tmp_path, capsys):
    from safetensors.torch import load_file

    from sgmft.train import train

    store = make_store(tmp_path / "s", n=120, dim=16, k=4)
    assert main(["train", str(store), "--preset", "trust", "--out", str(tmp_path / "a"), *FAST]) == 0
    assert main(["train", str(store), "--preset", "trust", "--out", str(tmp_path / "b"), *FAST,
                 "--set", "model.hidden=24"]) == 0
    capsys.readouterr()
    run_a, run_b = (json.loads((tmp_path / r / "run.json").read_text()) for r in ("a", "b"))
    assert run_b["model"]["extra"] == {**run_a["model"]["extra"], "hidden": 24}         # every option recorded
    assert tuple(k for k in run_b["model"] if k not in ("arch", "extra")) + tuple(run_b["model"]["extra"]) == TRUST_KEYS
    shapes = [{k: tuple(v.shape) for k, v in load_file(tmp_path / r / "model" / "model.safetensors").items()}
              for r in ("a", "b")]
    assert shapes[0] != shapes[1] and shapes[1]["ev_t.mlp.0.weight"] == (24, 16)
    card = (tmp_path / "b" / "model" / "README.md").read_text()
    line = next(ln for ln in card.splitlines() if ln.startswith("* model"))
    assert "hidden = 24" in line and "fusion" not in line and "classifier_hidden" not in line

    # the same run from Python, with the full options dict written out: the same fingerprint
    p = load_preset("trust")
    p.model = dataclasses.replace(p.model, extra={**run_b["model"]["extra"]})
    p.train = dataclasses.replace(p.train, epochs=1, min_steps=0, batch_size=64, progress=False)
    res = train(store, tmp_path / "b", p)
    assert res.status == "complete"                 # recognised as the CLI's run, not refused or retrained

    # --print-config's YAML, fed back as a preset file, is the same run too
    assert main(["train", str(store), "--preset", "trust", "--print-config", *FAST, "--set", "model.hidden=24"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out, encoding="utf-8")
    assert main(["train", str(store), "--preset", str(printed), "--out", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "complete"
