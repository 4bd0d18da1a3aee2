"""Typed, validated configuration (issue 8): parsing, errors that list allowed values, defaults
equal to the recommended preset, the paper preset's explicit values, and ``--print-config``."""

from __future__ import annotations

import dataclasses
import json
import re

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


# -- one configuration grammar (issue 19): model, train, SimFeat, serve and cleaning overrides --------
def _model_overrides(items):
    from sgmft.models.registry import apply_model_overrides

    return apply_model_overrides(load_preset("trust").model, items)


def _simfeat_overrides(items):
    from sgmft.data.simfeat import parse_overrides

    return parse_overrides(items)


def _serve_overrides(items):
    from sgmft.serve.config import ServeConfig

    return apply_overrides(ServeConfig(), items, "serve")


def _clean_overrides(items):
    from sgmft.ingest.text import clean_config

    return clean_config(overrides=items)


# section, how its overrides are applied, a misspelt key, the field it should have been
TYPOS = [
    ("model", _model_overrides, "hiddn", "hidden"),
    ("train", lambda items: apply_overrides(TrainConfig(), items, "train"), "epoch", "epochs"),
    ("simfeat", _simfeat_overrides, "num_post", "num_posts"),
    ("serve", _serve_overrides, "max_queu", "max_queue"),
    ("clean", _clean_overrides, "urlz", "urls"),
]


@pytest.mark.parametrize("section,apply,typo,right", TYPOS, ids=[t[0] for t in TYPOS])
def test_a_typo_is_the_same_config_error_in_every_section(section, apply, typo, right):
    from sgmft.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        apply([f"{typo}=1"])
    msg = str(e.value)
    # override <section>.<key>=<value>: unknown field|option '<key>' ...; the names it takes, the right one among them
    assert msg.startswith(f"override {section}.{typo}=1: unknown ")
    assert f" '{typo}'" in msg.split(":", 2)[1] and re.search(rf"\b{right}\b", msg.split(";", 1)[1])
    assert "\n" not in msg


BAD_VALUES = [
    ("model", lambda items: apply_overrides(ModelConfig(), items, "model"), "heads", "x", "an integer"),
    ("train", lambda items: apply_overrides(TrainConfig(), items, "train"), "split", "random",
     "one of: 'stratified', 'user'"),
    ("simfeat", _simfeat_overrides, "fine_regimes", "maybe", "true or false"),
    ("serve", _serve_overrides, "max_queue", "0", "a value > 0"),
    ("clean", _clean_overrides, "extra_stopwords", "电影", "a list"),
]


@pytest.mark.parametrize("section,apply,key,value,expected", BAD_VALUES, ids=[t[0] for t in BAD_VALUES])
def test_a_bad_value_is_the_same_config_error_in_every_section(section, apply, key, value, expected):
    from sgmft.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        apply([f"{key}={value}"])
    parsed = yaml.safe_load(value)
    shown = parsed if isinstance(parsed, (int, str)) and not isinstance(parsed, bool) else value
    assert str(e.value) == f"override {section}.{key}={value}: {key}={shown!r} is not allowed; expected {expected}"


def test_overrides_parse_yaml_and_keep_text_fields_as_written():
    from sgmft.data.simfeat import parse_overrides
    from sgmft.ingest.text import CleanConfig, clean_config
    from sgmft.serve.config import ServeConfig

    # the grammar SimFeat's --set had before stays (yes/no/1/0 booleans, typed numbers), plus YAML lists
    assert parse_overrides(["fine_regimes=yes", "distractor_excludes_label=0", "seed=4", "nuisance=1",
                            "simfeat.test_size=500", "profile=123"]) == \
        {"fine_regimes": True, "distractor_excludes_label": False, "seed": 4, "nuisance": 1.0, "test_size": 500,
         "profile": "123"}
    assert clean_config(overrides=["urls=false", "extra_stopwords=[电影, 看]", "join_with=|"]) == \
        CleanConfig(urls=False, extra_stopwords=("电影", "看"), join_with="|")
    cfg = apply_overrides(ServeConfig(), ["allowed_hosts=*.example.com", "max_wait_ms=0", "expose_paths=true"])
    assert (cfg.allowed_hosts, cfg.max_wait_ms, cfg.expose_paths) == ("*.example.com", 0.0, True)


def test_checks_across_fields_run_after_the_last_override():
    from sgmft.data.simfeat import SimFeatConfig
    from sgmft.errors import ConfigError

    # num_posts=600 alone breaks test_size < num_posts; with test_size=120 after it, it holds
    cfg = apply_overrides(SimFeatConfig(), ["num_posts=600", "test_size=120"], "simfeat")
    assert (cfg.num_posts, cfg.test_size) == (600, 120) and isinstance(cfg, SimFeatConfig)
    with pytest.raises(ConfigError, match=r"^simfeat overrides: SimFeat: need 0 < test_size < num_posts"):
        apply_overrides(SimFeatConfig(), ["num_posts=600"], "simfeat")


def test_build_config_names_the_place_and_the_field_for_every_config():
    from sgmft.config import build_config
    from sgmft.data.simfeat import SimFeatConfig, profile_config
    from sgmft.errors import ConfigError
    from sgmft.ingest.text import CleanConfig, clean_config
    from sgmft.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=r"^SimFeat profile 'hetero': unknown SimFeatConfig field\(s\) \['nope'\]"):
        profile_config("hetero", nope=1)
    with pytest.raises(ConfigError, match=r"^SimFeat profile 'default': dim='wide' is not allowed; expected an integer$"):
        profile_config("default", dim="wide")
    with pytest.raises(ConfigError, match=r"^clean options: long_text 'nope': choose truncate"):
        clean_config({"long_text": "nope"})
    with pytest.raises(ConfigError, match=r"^serve options: --max-queue=-3 is not allowed; expected a value > 0$"):
        build_config(ServeConfig, {"max_queue": -3}, "serve options", label=lambda f: "--" + f.replace("_", "-"))
    # the constructors the Python API uses are unchanged where SimFeat's data and the cleaners depend on them
    assert build_config(SimFeatConfig, {"seed": 3}) == SimFeatConfig(seed=3) == profile_config("default", seed=3)
    assert clean_config() == CleanConfig()
    with pytest.raises(TypeError):
        CleanConfig(extra_stopwords="电影")


def test_cli_simulate_set_typo_is_one_line_exit_2(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "s"), "--set", "num_post=300"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgmft simulate: error: override simfeat.num_post=300: unknown field 'num_post' of "
                          "SimFeatConfig (did you mean 'num_posts'?); known: ")
    assert "Traceback" not in err and not (tmp_path / "s").exists()


def test_experiment_tables_look_presets_up_like_load_preset(tmp_path):
    from sgmft.errors import ConfigError, UnknownNameError
    from sgmft.experiments.tables import load_table

    t = tmp_path / "t.yaml"
    t.write_text("rows:\n  - {name: a, preset: trust}\n  - {name: b, preset: trsut}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^experiment table t: rows\[1\]: unknown preset 'trsut'; known: .*trust"):
        load_table(t)
    with pytest.raises(UnknownNameError, match=r"^unknown experiment config 'tabel1'; known: table1, "):
        load_table("tabel1")


def test_every_simfeat_profile_through_the_checked_builder_is_the_plain_dataclass():
    # same values *and* types (an int where a float was would change nothing in ==, but could in numpy),
    # so the generated data are those of SimFeatConfig(**profile), bit for bit
    from sgmft.data.simfeat import PROFILES, SimFeatConfig, profile_config

    for name, fields_ in PROFILES.items():
        a, b = profile_config(name), SimFeatConfig(**{**fields_, "profile": name})
        assert [(type(v), v) for v in dataclasses.astuple(a)] == [(type(v), v) for v in dataclasses.astuple(b)]
