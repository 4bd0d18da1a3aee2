"""sgmft.checkpoint: the one FeatureContract (features.json) with its versioned load and
save, its one check against a backbone; the model card reads through it; model folders are
readable under the umask. (The contract tests used to sit in test_cli_raw.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from conftest import make_store
from sgmft.checkpoint import (SCHEMA_VERSION, CheckpointError, FeatureContract, feature_contract, load_checkpoint,
                              read_checkpoint, save_checkpoint)
from sgmft.errors import BackboneMismatchError, SgmftError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A tiny random Chinese-CLIP, 24 SimPosts extracted with it, and an (untrained) model
    folder inside a run folder whose run.json names that store."""
    import torch

    from sgmft.config import load_preset
    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.features import FeatureStore
    from sgmft.features.backbones.tiny import build_tiny_chinese_clip
    from sgmft.features.extract import extract_features
    from sgmft.models import build_model

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("ckpt")
    spec = f"chinese-clip:{build_tiny_chinese_clip(root / 'tinycc')}"
    man = generate_simposts(root / "posts", SimPostsConfig(num_posts=24, seed=3))
    store = extract_features(man, root / "store", backbone=spec, batch_size=12, progress=False).store_path
    fs = FeatureStore.open(store)
    cfg = dataclasses.replace(load_preset("trust").model, dim=fs.dim, num_classes=len(fs.label_names))
    torch.manual_seed(0)
    run = root / "run"
    save_checkpoint(run / "model", build_model(cfg), cfg, fs.label_names, fs.meta, preset="trust")
    (run / "run.json").write_text(json.dumps({"store": str(store)}), encoding="utf-8")
    yield {"root": root, "spec": spec, "store": store, "run": run, "meta": fs.meta}
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


def _edit_json(path, **changes):
    d = json.loads(path.read_text(encoding="utf-8"))
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d), encoding="utf-8")


# -- the contract ------------------------------------------------------------------------------
def test_contract_records_non_default_cleaning():
    from sgmft.ingest.text import CleanConfig, TextCleaner
    from sgmft.predict.posts import _clean_cfg_from

    cfg = CleanConfig(urls=False, stopwords=False)
    meta = {"backbone": "chinese-clip:x", "dim": 32, "normalization": "l2",
            "extra": {"clean_config": dataclasses.asdict(cfg), "clean_fingerprint": TextCleaner(cfg).fingerprint(),
                      "image_choice": "first", "backbone_fingerprint": "abc", "backbone_precision": "float32",
                      "manifest": "/somewhere/manifest.jsonl"}}
    c = json.loads(json.dumps(feature_contract(meta)))   # as read back from features.json
    assert c["backbone"] == "chinese-clip:x" and c["dim"] == 32 and "manifest" not in c["extraction"]
    assert _clean_cfg_from(c["extraction"]["clean_config"]) == cfg and c["extraction"]["image_choice"] == "first"
    # features not made by sgmft extract (SimFeat, the user's own): an explicit null
    assert feature_contract({"backbone": "simfeat", "dim": 8, "normalization": "l2", "extra": {}})["extraction"] is None


def test_contract_round_trip_keeps_fields_it_does_not_know():
    d = {"backbone": "b", "dim": 4, "normalization": "l2", "extraction": None, "long_text": {"policy": "chunk"}}
    c = FeatureContract.from_dict(d)
    assert c.to_dict() == d and c.other == {"long_text": {"policy": "chunk"}}
    legacy = FeatureContract.from_dict({"backbone": "b", "dim": 4})      # written before the contract
    assert not legacy.extraction_known and "extraction" not in legacy.to_dict()
    for bad, msg in (([1], "must be a JSON object"), ({"dim": "4"}, "'dim' must be a positive integer"),
                     ({"extraction": "x"}, "'extraction' must be an object or null")):
        with pytest.raises(CheckpointError, match=msg):
            FeatureContract.from_dict(bad, "features.json")


def test_post_predictor_settings_come_from_the_checkpoint(raw, tmp_path):
    from sgmft.ingest.text import CleanConfig
    from sgmft.predict import PostPredictor

    pp = PostPredictor.load(raw["run"])
    assert pp.backbone.spec == raw["spec"] and pp.image_choice == "similar" and pp.notes == []
    assert pp.cleaner.cfg == CleanConfig()
    # the feature contract travels in model/features.json, copied from the training store
    feats = json.loads((raw["run"] / "model" / "features.json").read_text())
    extra = raw["meta"]["extra"]
    assert feats["extraction"] == {k: extra[k] for k in ("backbone_fingerprint", "backbone_precision",
                                                         "clean_config", "clean_fingerprint", "image_choice")
                                   } | {k: v for k, v in feats["extraction"].items() if k not in (
                                       "backbone_fingerprint", "backbone_precision", "clean_config",
                                       "clean_fingerprint", "image_choice")}   # (and fields added later)
    assert feats["extraction"] == feature_contract(raw["meta"])["extraction"]
    # the training store is gone: the model folder alone still predicts, with the same settings
    gone = tmp_path / "run3"
    shutil.copytree(raw["run"] / "model", gone / "model")
    (gone / "run.json").write_text(json.dumps({"store": str(tmp_path / "no-store")}))
    p2 = PostPredictor.load(gone / "model")
    assert p2.notes == [] and p2.cleaner.cfg == pp.cleaner.cfg and p2.image_choice == pp.image_choice
    assert p2.predict_post("看电影", []) == pp.predict_post("看电影", [])
    # a version-1 checkpoint without the contract, its store gone: a clear note
    del feats["extraction"]
    (gone / "model" / "features.json").write_text(json.dumps(feats))
    _edit_json(gone / "model" / "config.json", version=1)
    p3 = PostPredictor.load(gone / "model")
    assert p3.notes and "predates the feature contract" in p3.notes[0] and "not readable" in p3.notes[0]
    assert p3.predict_post("看电影", [])["label"] in p3.label_names
    # ... the migration finds the settings while its training store exists
    shutil.copy(raw["run"] / "run.json", gone / "run.json")
    p4 = PostPredictor.load(gone / "model")
    assert p4.notes == [] and p4.cleaner.cfg == pp.cleaner.cfg


# -- versions ------------------------------------------------------------------------------------
def test_schema_version_written_old_migrated_newer_refused(raw, tmp_path):
    cfg = json.loads((raw["run"] / "model" / "config.json").read_text())
    assert cfg["version"] == SCHEMA_VERSION == 2
    info = read_checkpoint(raw["run"])
    assert info["version"] == 2 and info["run"].root == raw["run"] and isinstance(info["contract"], FeatureContract)
    # version 1 without "extraction": migrated from the training store's metadata (named in run.json)
    old = tmp_path / "old"
    shutil.copytree(raw["run"], old)
    _edit_json(old / "model" / "config.json", version=1)
    _edit_json(old / "model" / "features.json", extraction=None)
    assert "extraction" not in json.loads((old / "model" / "features.json").read_text())
    model, info = load_checkpoint(old)
    assert info["version"] == 1 and info["features"]["extraction"] == feature_contract(raw["meta"])["extraction"]
    # ... and written back at the current version by save_pretrained
    from sgmft.predict import Predictor

    out = Predictor.load(old).save_pretrained(tmp_path / "shared")
    assert json.loads((out / "config.json").read_text())["version"] == SCHEMA_VERSION
    # a newer version is refused with a clear message; a nonsense one too
    _edit_json(old / "model" / "config.json", version=SCHEMA_VERSION + 1)
    with pytest.raises(CheckpointError, match=r"schema version 3 was written by a newer sgmft; this one reads "
                                              r"versions up to 2\. Upgrade sgmft"):
        load_checkpoint(old)
    _edit_json(old / "model" / "config.json", version="2")
    with pytest.raises(CheckpointError, match="'version' must be a positive integer"):
        read_checkpoint(old)


# -- the one backbone check ----------------------------------------------------------------------
def test_check_backbone(raw, tmp_path):
    from sgmft.features.backbones import load_backbone
    from sgmft.features.backbones.tiny import build_tiny_chinese_clip

    contract = read_checkpoint(raw["run"])["contract"]
    assert contract.check_backbone(load_backbone(raw["spec"], device="cpu")) == []
    other = load_backbone(f"chinese-clip:{build_tiny_chinese_clip(tmp_path / 'other', seed=1)}", device="cpu")
    with pytest.raises(BackboneMismatchError, match="fingerprint .* differs"):
        contract.check_backbone(other)
    notes = contract.check_backbone(other, check_fingerprint=False)
    assert len(notes) == 1 and "is not the one the model was trained on" in notes[0]
    wide = dataclasses.replace(contract, dim=contract.dim * 2)
    with pytest.raises(BackboneMismatchError, match=r"gives D=32 features, but the model was trained on D=64"):
        wide.check_backbone(other)
    assert issubclass(BackboneMismatchError, SgmftError)


# -- the model card reads through the contract --------------------------------------------------
def test_card_reads_through_the_checked_contract(raw, tmp_path):
    from sgmft.card import write_model_card

    run = tmp_path / "run"
    shutil.copytree(raw["run"], run)
    card = write_model_card(run / "model").read_text(encoding="utf-8")
    assert "## Feature contract" in card and f"backbone `{raw['spec']}`" in card
    _edit_json(run / "model" / "config.json", version=SCHEMA_VERSION + 1)
    with pytest.raises(CheckpointError, match="newer sgmft"):       # not a raw KeyError / JSON error
        write_model_card(run / "model")


# -- new-user item 1: files readable under the umask --------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_folder_files_follow_the_umask(raw, tmp_path, umask):
    from sgmft.features.backbones.tiny import build_tiny_chinese_clip
    from sgmft.predict import Predictor

    old = os.umask(umask)
    try:
        ck = tmp_path / "ck"
        cfg = read_checkpoint(raw["run"])["model_cfg"]
        model, _ = load_checkpoint(raw["run"])
        save_checkpoint(ck, model, cfg, read_checkpoint(raw["run"])["label_names"], raw["meta"])
        shared = Predictor.load(raw["run"]).save_pretrained(tmp_path / "shared")
        tiny = build_tiny_chinese_clip(tmp_path / "tiny")
    finally:
        os.umask(old)
    for folder in (ck, shared, tiny):
        assert (os.stat(folder).st_mode & 0o777) == 0o777 & ~umask, folder
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert any(p.name == "model.safetensors" for p in files)          # the one safetensors wrote 0600
        modes = {p.name: oct(os.stat(p).st_mode & 0o777) for p in files}
        assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# -- new-user item 4: a moved backbone folder -----------------------------------------------------
def test_moved_backbone_folder_says_pass_backbone_first(raw, tmp_path, capsys):
    from sgmft.cli import main
    from sgmft.errors import BackboneUnavailableError
    from sgmft.predict import PostPredictor

    run = tmp_path / "run"
    shutil.copytree(raw["run"], run)
    _edit_json(run / "model" / "features.json", backbone=f"chinese-clip:{tmp_path / 'moved-away'}")
    with pytest.raises(BackboneUnavailableError) as e:
        PostPredictor.load(run)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("pass --backbone SPEC") and len(lines) <= 3
    assert "ViT-H" not in str(e.value) and "huggingface-cli" not in str(e.value)
    # the CLI: one short error, the fix first
    assert main(["predict", str(run), "--text", "看电影"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgmft predict: error: pass --backbone") and err.count("\n") <= 3
    # ... and passing it works (same weights: the fingerprint matches)
    pp = PostPredictor.load(run, backbone=raw["spec"])
    assert pp.notes == [] and pp.predict_post("看电影", [])["label"] in pp.label_names


def test_check_store_against_the_contract(tmp_path):
    """Predictor.check_store goes through FeatureContract.check_store: D, backbone, precision."""
    from sgmft.errors import PrecisionMismatchError
    from sgmft.features import FeatureStore
    from sgmft.predict import Predictor

    c = FeatureContract("chinese-clip:x", 16, "l2", {"backbone_precision": "bf16"})
    s = FeatureStore.open(make_store(tmp_path / "s", n=20, dim=16, k=4))          # backbone "test"
    with pytest.raises(BackboneMismatchError, match=r"features come from backbone 'test', the model was "
                                                    r"trained on 'chinese-clip:x'"):
        c.check_store(s)
    same = dataclasses.replace(c, backbone="test")
    same.check_store(s)                                             # no precision recorded in the store
    s.meta.setdefault("extra", {})["backbone_precision"] = "fp32"
    with pytest.raises(PrecisionMismatchError, match="extracted at precision fp32, the model was trained on bf16"):
        same.check_store(s)
    same.check_store(s, allow_precision_mismatch=True)
    with pytest.raises(BackboneMismatchError, match="features have D=16, the model expects D=8"):
        dataclasses.replace(same, dim=8).check_store(s)
    # the predictor uses exactly this check
    from sgmft.config import load_preset
    from sgmft.models import build_model

    cfg = dataclasses.replace(load_preset("trust").model, dim=32, num_classes=4)
    pred = Predictor(build_model(cfg), ["c0", "c1", "c2", "c3"], {"backbone": "test", "dim": 32, "extraction": None})
    with pytest.raises(BackboneMismatchError, match="features have D=16, the model expects D=32"):
        pred.predict_store(s)


# -- what raw posts need, read from the contract (PostPredictor.load only wires these up) ----------
def test_contract_gives_the_raw_post_settings(tmp_path):
    from sgmft.errors import InputError, PrecisionMismatchError
    from sgmft.ingest.text import CleanConfig, TextCleaner

    cfg = CleanConfig(urls=False)
    ext = {"clean_config": dataclasses.asdict(cfg), "clean_fingerprint": TextCleaner(cfg).fingerprint(),
           "image_choice": "first", "backbone_precision": "bfloat16"}
    c = FeatureContract.from_dict(json.loads(json.dumps({"backbone": "chinese-clip:x", "dim": 8, "extraction": ext})))
    assert c.clean_config() == cfg and c.image_choice == "first" and c.precision == "bfloat16"
    assert c.check_cleaner(cfg) == [] and c.check_cleaner(None) == []
    assert len(c.check_cleaner(CleanConfig())) == 1 and "text cleaning differs" in c.check_cleaner(CleanConfig())[0]
    assert c.unknown_notes(tmp_path) == [] and c.raw_backbone_spec() == "chinese-clip:x"
    # precision: the recorded one passes, another is refused or (allowed) a note
    assert c.check_precision("bfloat16") == []
    with pytest.raises(PrecisionMismatchError, match="--precision bfloat16"):
        c.check_precision("float32", where="the model M")
    assert "allowed by --allow-precision-mismatch" in c.check_precision("float32", allow_precision_mismatch=True)[0]
    # a missing jieba user dictionary: named, not silently replaced by the default cleaning
    ud = FeatureContract(extraction={"clean_config": {"user_dict": str(tmp_path / "gone.txt")}})
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        ud.clean_config()
    # nothing recorded: the defaults, and a note that says why
    none = FeatureContract("simfeat", 8, "l2", None)
    assert none.clean_config() is None and none.image_choice == "similar" and none.check_precision("int8") == []
    assert "not made by `sgmft extract`" in none.unknown_notes(tmp_path / "m")[0]
    with pytest.raises(InputError, match="not a raw-post backbone"):
        none.raw_backbone_spec(tmp_path / "m")
    with pytest.raises(InputError, match="does not record the backbone"):
        FeatureContract(None, 8).raw_backbone_spec()
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"store": str(tmp_path / "gone-store")}), encoding="utf-8")
    old = FeatureContract.from_dict({"backbone": "chinese-clip:x", "dim": 8})       # before the contract
    note = old.unknown_notes(run / "model")
    assert len(note) == 1 and "predates the feature contract" in note[0] and "gone-store" in note[0]
    assert FeatureContract(extraction={"image_choice": "bogus"}).image_choice == "similar"
