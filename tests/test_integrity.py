"""No silent garbage and no mismatched files (issue 9): a NaN run fails naming where and
exports nothing; out-of-range features, empty or single-class stores and absent modalities
are refused or warned about; a corrupt model folder, a labels.json of the wrong length and a
store whose labels are in another order each end in one line naming the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sgmft.checkpoint import CheckpointError, load_checkpoint
from sgmft.cli import main as cli_main
from sgmft.errors import SgmftWarning
from sgmft.eval.run import evaluate
from sgmft.features import FeatureStore, FeatureStoreError, write_feature_store
from sgmft.predict import Predictor
from sgmft.train import train
from sgmft.train.resume import NonFiniteError

from resume_support import tiny_preset, tiny_store
from test_resume import preset_yaml


def one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("sgmft ") and ": error: " in err and "\n" not in err, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    store = tiny_store(root / "store", with_split=True)
    res = train(store, root / "run", tiny_preset(epochs=8, lr=1e-2))
    assert res.best_val_acc > 0.6
    return store, res.run_dir


def copy_model(trained, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(trained[1] / "model", dst)
    return dst


# -- non-finite training -------------------------------------------------------------------------
def test_exploding_lr_stops_with_epoch_and_step_and_exports_nothing(tmp_path, capsys):
    store = tiny_store(tmp_path / "store")
    y = preset_yaml(tmp_path / "tiny.yaml", epochs=3)
    out = tmp_path / "run"
    rc = cli_main(["train", str(store), "--out", str(out), "--preset", str(y), "--lr", "1e6"])
    err = one_line_error(capsys, rc)
    assert "non-finite training loss" in err and "at epoch 0, step " in err and "nothing was exported" in err
    assert "lr=1e+06" in err
    assert not out.exists()          # failed before its first checkpoint: nothing left behind
    # a NaN in a later epoch: the earlier epochs' checkpoint stays (resumable), nothing is exported
    from sgmft.train.module import LitClassifier

    orig = LitClassifier._loss

    def nan_in_epoch_1(self, out, y, index=None):
        loss = orig(self, out, y, index)
        return loss * float("nan") if self.current_epoch == 1 and self.global_step >= 8 else loss

    LitClassifier._loss = nan_in_epoch_1
    try:
        with pytest.raises(NonFiniteError, match=r"non-finite training loss \(nan\) at epoch 1, step 8 \(batch 2 "):
            train(store, tmp_path / "run2", tiny_preset(epochs=3))
    finally:
        LitClassifier._loss = orig
    assert not (tmp_path / "run2" / "model").exists()
    assert (tmp_path / "run2" / "lightning" / "checkpoints" / "last.ckpt").exists()


def _poke(store, name: str, row: int, value) -> None:
    """Change one stored value behind the writer's back (it validates what it writes)."""
    a = np.load(store / f"{name}.npy")
    a[row] = value
    np.save(store / f"{name}.npy", a)


def test_features_far_out_of_range_are_refused_at_load_with_the_row(tmp_path, capsys, trained):
    store = tiny_store(tmp_path / "store")
    _poke(store, "text", 7, 3e38)                            # finite, and would overflow training
    with pytest.raises(FeatureStoreError, match=r"text.npy: value 3e\+38 in row 7 \(id 'p7'\), column 0, "
                                                r"is outside \+-10000"):
        FeatureStore.open(store)
    out = tmp_path / "run"
    err = one_line_error(capsys, cli_main(["train", str(store), "--out", str(out), "--preset",
                                           str(preset_yaml(tmp_path / "tiny.yaml", epochs=1))]))
    assert "row 7" in err and "text.npy" in err and not (out / "model").exists()
    with pytest.raises(FeatureStoreError, match="row 7"):
        Predictor.load(trained[1]).predict_store(store)
    _poke(store, "text", 7, -2e4)
    with pytest.raises(FeatureStoreError, match=r"value -2e\+04 in row 7"):
        FeatureStore.open(store)
    _poke(store, "text", 7, 9e3)                             # inside the bound: accepted
    FeatureStore.open(store)


# -- stores that cannot teach anything -----------------------------------------------------------
def _store(path, n, labels, k=3, **kw):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-9
    return write_feature_store(path, ids=[f"p{i}" for i in range(n)], text=x, image=x[::-1].copy(),
                               labels=labels, label_names=[f"c{i}" for i in range(k)], **kw)


def test_empty_and_unlabelled_stores_say_so(tmp_path):
    empty = _store(tmp_path / "empty", 0, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match=r"the feature store is empty \(0 posts\)"):
        train(empty, tmp_path / "r1", tiny_preset(epochs=1))
    unl = _store(tmp_path / "unl", 30, -np.ones(30, np.int64))
    with pytest.raises(ValueError, match=r"labels.npy: no post is labelled \(all 30 labels are -1"):
        train(unl, tmp_path / "r2", tiny_preset(epochs=1))
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_single_class_is_an_error_and_a_missing_class_a_warning(tmp_path, capsys):
    one = _store(tmp_path / "one", 60, np.zeros(60, np.int64))
    with pytest.raises(ValueError, match="every training post has the label 'c0'"):
        train(one, tmp_path / "r1", tiny_preset(epochs=1))
    err = one_line_error(capsys, cli_main(["train", str(one), "--out", str(tmp_path / "r1"), "--preset",
                                           str(preset_yaml(tmp_path / "tiny.yaml", epochs=1))]))
    assert "cannot learn anything from one class" in err
    two_of_three = _store(tmp_path / "two", 60, np.arange(60) % 2)
    with pytest.warns(SgmftWarning, match=r"1 of 3 classes have no training post \('c2'\)"):
        train(two_of_three, tmp_path / "r2", tiny_preset(epochs=1))


def test_absent_modalities_warn_or_refuse(tmp_path, capsys):
    n = 60
    y = np.arange(n) % 3
    no_text = _store(tmp_path / "nt", n, y, text_mask=np.zeros(n, bool), image_mask=np.ones(n, bool))
    with pytest.warns(SgmftWarning, match=r"text_mask.npy: text is missing .* for every training post: the "
                                          r"model learns from images alone"):
        train(no_text, tmp_path / "r1", tiny_preset(epochs=1))
    # the CLI prints it as a warning line
    assert cli_main(["train", str(no_text), "--out", str(tmp_path / "r1b"), "--preset",
                     str(preset_yaml(tmp_path / "tiny.yaml", epochs=1))]) == 0
    assert "sgmft train: warning: " in capsys.readouterr().err
    nothing = _store(tmp_path / "nn", n, y, text_mask=np.zeros(n, bool), image_mask=np.zeros(n, bool))
    with pytest.raises(ValueError, match="no training post has usable text or a usable image"):
        train(nothing, tmp_path / "r2", tiny_preset(epochs=1))


def test_a_constant_modality_warns_and_two_refuse(tmp_path):
    """One placeholder image on every post (or an empty caption everywhere) tells the places nothing."""
    n, y = 60, np.arange(60) % 3
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    same = np.repeat(x[:1], n, 0)
    ids, names = [f"p{i}" for i in range(n)], ["c0", "c1", "c2"]
    const_image = write_feature_store(tmp_path / "ci", ids=ids, text=x, image=same, labels=y, label_names=names)
    with pytest.warns(SgmftWarning, match=r"image.npy: the image features are the same on every training post"):
        train(const_image, tmp_path / "r1", tiny_preset(epochs=1))
    # a post without an image (mask False) does not count: the image differs there, and is still constant
    odd = same.copy()
    odd[5] = x[5]
    masked = write_feature_store(tmp_path / "cm", ids=ids, text=x, image=odd, labels=y, label_names=names,
                                 text_mask=np.ones(n, bool), image_mask=np.arange(n) != 5)
    with pytest.warns(SgmftWarning, match=r"the image features are the same on every training post"):
        train(masked, tmp_path / "r2", tiny_preset(epochs=1))
    both = write_feature_store(tmp_path / "cb", ids=ids, text=same, image=same, labels=y, label_names=names)
    with pytest.raises(ValueError, match=r"text.npy and image.npy each hold the same features on every training"):
        train(both, tmp_path / "r3", tiny_preset(epochs=1))
    assert not (tmp_path / "r3").exists()


# -- a model folder that does not hold together --------------------------------------------------
def test_truncated_or_corrupt_weights_name_the_file(trained, tmp_path, capsys):
    store, _ = trained
    m = copy_model(trained, tmp_path)
    w = m / "model.safetensors"
    data = w.read_bytes()
    for broken in (data[: len(data) // 2], data[:5], b"\x00" * 64):
        w.write_bytes(broken)
        with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable \(truncated or corrupt"):
            load_checkpoint(m)
        err = one_line_error(capsys, cli_main(["evaluate", str(m), str(store), "--out", str(tmp_path / "ev")]))
        assert str(w) in err
    # readable, but NaN weights: refused rather than predicting garbage
    from safetensors.torch import load_file, save_file

    w.write_bytes(data)
    state = load_file(str(w))
    k = next(iter(state))
    state[k][...] = float("nan")
    save_file(state, str(w))
    with pytest.raises(CheckpointError, match=f"weight '{k}' holds NaN or Inf"):
        load_checkpoint(m)
    (m / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: corrupt JSON"):
        load_checkpoint(m)


@pytest.mark.parametrize("names", [["c0", "c1"], ["c0", "c1", "c2", "x", "y"], ["c0", "c0", "c1"], "c0,c1,c2"])
def test_labels_json_must_match_the_model(trained, tmp_path, capsys, names):
    store, _ = trained
    m = copy_model(trained, tmp_path)
    (m / "labels.json").write_text(json.dumps(names))
    with pytest.raises(CheckpointError, match="labels.json: "):
        load_checkpoint(m)
    err = one_line_error(capsys, cli_main(["evaluate", str(m), str(store), "--out", str(tmp_path / "ev")]))
    assert str(m / "labels.json") in err


def test_evaluate_maps_store_labels_by_name_or_refuses(trained, tmp_path):
    store, run = trained
    fs = FeatureStore.open(store)
    ref = evaluate(run, store, tmp_path / "ev0", split="all", tsne_max_points=30)
    # the same posts with the label list in another order (labels re-indexed accordingly)
    order = ["c2", "c0", "c1"]
    new_index = np.array([order.index(n) for n in fs.label_names])
    perm = write_feature_store(tmp_path / "perm", ids=np.asarray(fs.ids), text=np.asarray(fs.text),
                               image=np.asarray(fs.image), labels=new_index[np.asarray(fs.labels)],
                               label_names=order, backbone=fs.backbone)
    got = evaluate(run, perm, tmp_path / "ev1", split="all", tsne_max_points=30)
    assert got["accuracy"] == ref["accuracy"] and got["confusion_matrix"] == ref["confusion_matrix"]
    # a positional reading would score differently on this store: the test can tell
    positional = float(np.mean(Predictor.load(run).predict_store(perm).top == new_index[np.asarray(fs.labels)]))
    assert positional != ref["accuracy"]
    # a label the model does not know: refused, naming both files
    other = write_feature_store(tmp_path / "other", ids=np.asarray(fs.ids), text=np.asarray(fs.text),
                                image=np.asarray(fs.image), labels=np.asarray(fs.labels),
                                label_names=["c0", "c1", "beach"], backbone=fs.backbone)
    with pytest.raises(ValueError, match=r"other/meta.json: label name\(s\) \['beach'\] are not among the "
                                         r"model's labels .*labels.json"):
        evaluate(run, other, tmp_path / "ev2", split="all")


def test_special_files_in_a_model_folder_are_refused(trained, tmp_path):
    import os

    m = copy_model(trained, tmp_path)
    (m / "labels.json").unlink()
    os.mkfifo(m / "labels.json")
    with pytest.raises(CheckpointError, match=r"labels.json: not a regular file"):
        load_checkpoint(m)
    (m / "labels.json").unlink()
    (m / "labels.json").write_text("[" * 100000 + "]" * 100000)      # deeply nested JSON
    with pytest.raises(CheckpointError, match=r"labels.json: corrupt JSON"):
        load_checkpoint(m)
