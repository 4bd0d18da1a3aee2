"""Typed, validated configuration (issue 8): parsing, errors that list allowed values, defaults
equal to the recommended preset, the paper preset's explicit values, and ``--print-config``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from sgmft.cli import main
from sgmft.config import (DEFAULT_PRESET, ModelConfig, TrainConfig, apply_overrides, list_presets, load_preset,
                          model_config_from_dict, parse_devices, progress_enabled, replace_checked,
                          train_config_from_dict)


def test_dataclass_defaults_are_the_recommended_preset():
    assert ModelConfig() == load_preset("sgmft").model
    assert TrainConfig() == load_preset("sgmft").train


def test_paper_preset_keeps_the_papers_values_explicitly():
    """The old TrainConfig defaults were the paper's optimiser; the paper preset now says them."""
    p = load_preset("paper")
    t = p.train
    assert (t.lr, t.betas, t.weight_decay, t.batch_size, t.epochs) == (1e-5, (0.9, 0.99), 0.0, 20, 30)
    m = p.model
    assert (m.n_tokens, m.input_scale, m.pe_scale, m.ffn_mode, m.norm_mode) == (1024, 1.0, "none", "vector", "vector")
    assert (m.sfm_residual, m.sfm_merge) == (False, "sum")          # eq 17 literal
    from importlib import resources

    raw = yaml.safe_load((resources.files("sgmft") / "configs" / "models" / "paper.yaml").read_text("utf-8"))
    # every value the paper fixes is written in the file, not inherited from a default
    for key in ("lr", "betas", "weight_decay", "batch_size", "epochs"):
        assert key in raw["train"], key
    for key in ("n_tokens", "pe_scale", "ffn_mode", "sfm_residual", "sfm_merge", "input_scale"):
        assert key in raw["model"], key


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_validates_and_round_trips(name):
    p = load_preset(name)
    d = p.to_dict()
    json.dumps(d)                                                   # plain types only
    if p.candidates:                                                # a selecting preset: no model of its own
        assert "model" not in d and d["candidates"] == p.candidates
    else:
        assert model_config_from_dict(d["model"]) == p.model
    assert train_config_from_dict(d["train"]) == p.train


def test_boolean_values_parse_and_maybe_is_an_error_listing_true_false():
    assert apply_overrides(ModelConfig(), ["use_sim=false"]).use_sim is False
    assert apply_overrides(ModelConfig(), ["use_sim=yes"]).use_sim is True
    with pytest.raises(ValueError) as e:
        apply_overrides(ModelConfig(), ["use_sim=maybe"], "model")
    msg = str(e.value)
    assert "model.use_sim=maybe" in msg and "'maybe'" in msg and "true or false" in msg


def test_choice_errors_list_the_allowed_values():
    with pytest.raises(ValueError) as e:
        apply_overrides(ModelConfig(), ["pm_norm=relu"], "model")
    assert "'softmax'" in str(e.value) and "'sigmoid'" in str(e.value) and "'relu'" in str(e.value)
    with pytest.raises(ValueError, match="'stratified'.*'user'"):
        apply_overrides(TrainConfig(), ["split=users"], "train")
    with pytest.raises(ValueError, match="ffn_side"):
        ModelConfig(ffn_side="both")                                # construction checks too


def test_a_scalar_for_a_list_field_is_a_one_element_list():
    assert apply_overrides(ModelConfig(), ["classifier_hidden=64"]).classifier_hidden == [64]
    assert apply_overrides(ModelConfig(), ["classifier_hidden=[64, 32]"]).classifier_hidden == [64, 32]
    with pytest.raises(ValueError, match=r"classifier_hidden\[1\]=-1.*> 0"):
        apply_overrides(ModelConfig(), ["classifier_hidden=[64, -1]"])
    with pytest.raises(ValueError, match="classifier_hidden"):
        apply_overrides(ModelConfig(), ["classifier_hidden=[]"])


def test_numbers_are_parsed_and_checked():
    t = apply_overrides(TrainConfig(), ["lr=1e-3", "epochs=3", "precision=16"])
    assert t.lr == 1e-3 and t.epochs == 3 and t.precision == "16"
    assert apply_overrides(ModelConfig(), ["input_scale=2"]).input_scale == 2.0
    for bad, field in [("epochs=0", "epochs"), ("n_tokens=1.5", "n_tokens"), ("dropout=2", "dropout"),
                       ("lr=fast", "lr")]:
        obj = TrainConfig() if field in ("epochs", "lr") else ModelConfig()
        with pytest.raises(ValueError, match=f"{field}="):
            apply_overrides(obj, [bad])
    with pytest.raises(ValueError, match=r"betas=\[0.9\].*2 numbers"):
        apply_overrides(TrainConfig(), ["betas=[0.9]"])
    with pytest.raises(ValueError, match="unknown field 'epoch'.*epochs"):
        apply_overrides(TrainConfig(), ["epoch=3"])


def test_devices_take_ints_auto_and_index_lists():
    assert parse_devices("0,1") == [0, 1] and parse_devices("auto") == "auto" and parse_devices("-1") == -1
    assert apply_overrides(TrainConfig(), ["devices=0,1"]).devices == [0, 1]
    assert replace_checked(TrainConfig(), devices="2").devices == 2
    with pytest.raises(ValueError, match="device indices"):
        replace_checked(TrainConfig(), "train options", devices="gpu0")


def test_assignment_is_checked_too():
    t = TrainConfig()
    t.epochs = "4"
    assert t.epochs == 4
    with pytest.raises(ValueError):
        t.epochs = "many"


def test_progress_default_follows_the_terminal(monkeypatch):
    import io
    import sys

    assert TrainConfig().progress is None
    monkeypatch.setattr(sys, "stderr", io.StringIO())               # not a terminal
    assert progress_enabled(None) is False and progress_enabled(True) is True

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert progress_enabled(None) is True and progress_enabled(False) is False


def test_user_yaml_with_a_bad_value_names_the_file_section_and_field(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model:\n  arch: sgmft\n  sfm_merge: product\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_preset(f)
    assert "preset mine: model" in str(e.value) and "sfm_merge='product'" in str(e.value)
    assert "'sum'" in str(e.value) and "'concat'" in str(e.value)


# -- through the CLI ------------------------------------------------------------------------
def test_cli_set_maybe_is_a_user_error_listing_allowed_values(capsys):
    assert main(["train", "--print-config", "--preset", "sgmft", "--set", "model.use_sim=maybe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgmft train: error: ") and "true or false" in err and "Traceback" not in err


def test_cli_set_classifier_hidden_scalar_is_coerced(capsys):
    assert main(["train", "--print-config", "--preset", "sgmft", "--json", "--set", "model.classifier_hidden=64"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["classifier_hidden"] == [64]


def test_cli_unknown_fusion_lists_registered_ones(capsys):
    assert main(["train", "--print-config", "--preset", "sgmft", "--set", "model.fusion=bogus"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "sfm" in err and "concat" in err


def test_print_config_shows_the_resolved_config_and_exits_0(tmp_path, capsys):
    from sgmft.data.simfeat import SimFeatConfig, write_simfeat

    store = write_simfeat(tmp_path / "s", SimFeatConfig(num_posts=200, test_size=40, dim=32))
    assert main(["train", str(store), "--print-config", "--preset", "paper", "--epochs", "3",
                 "--devices", "0,1", "--set", "train.lr=1e-3", "--set", "model.n_tokens=32"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["preset"] == "paper" and doc["train"]["epochs"] == 3 and doc["train"]["lr"] == 1e-3
    assert doc["train"]["devices"] == [0, 1] and doc["train"]["batch_size"] == 20
    assert doc["model"]["dim"] == 32                                  # from the store
    assert not (tmp_path / "run").exists()
    assert main(["train", "--print-config", "--json"]) == 0           # no --preset: DEFAULT_PRESET
    doc = json.loads(capsys.readouterr().out)
    default = load_preset(DEFAULT_PRESET)
    if default.candidates:                                            # `auto`: what it chooses between
        assert doc["candidates"] == default.candidates and "model" not in doc
    else:
        assert doc["model"] == json.loads(json.dumps(dataclasses.asdict(default.model)))


def test_extra_overrides_merge_into_the_options_and_never_replace_them():
    base = load_preset("trust").model
    m = apply_overrides(base, ["extra.hidden=256", "extra={looks: 2}"], "model")
    assert m.extra == {**base.extra, "hidden": 256, "looks": 2}
    with pytest.raises(ValueError, match="extra takes a mapping"):
        apply_overrides(base, ["extra=5"], "model")
    with pytest.raises(ValueError, match=r"extra\.<option>=<value>"):
        apply_overrides(base, ["extra.=5"], "model")


def test_print_config_yaml_loads_back_as_a_preset(tmp_path, capsys):
    from sgmft.models.registry import model_view

    assert main(["train", "--print-config", "--preset", "trust", "--set", "model.looks=2"]) == 0
    f = tmp_path / "printed.yaml"
    f.write_text(capsys.readouterr().out, encoding="utf-8")
    p = load_preset(f)                                              # its "preset:" line is informational
    assert model_view(p.model)["extra"]["looks"] == 2 and p.train == load_preset("trust").train
