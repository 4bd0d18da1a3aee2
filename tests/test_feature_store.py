"""Tests for the on-disk feature store (sgmft.features.store, docs/feature-store.md)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sgmft.features import (
    FeatureStore,
    FeatureStoreError,
    FeatureStoreWriter,
    validate_feature_store,
    write_feature_store,
)
from sgmft.features import store as store_mod

NAMES = ["home", "work", "school"]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "write_features_numpy.py"


def make_data(n=20, d=6, seed=0):
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * (n - 6) + ["val"] * 2 + ["test"] * 4)
    return dict(
        ids=np.array([f"p{i}" for i in range(n)]),
        users=np.array([f"u{i % 4}" for i in range(n)]),
        text=rng.normal(size=(n, d)).astype(np.float32),
        image=rng.normal(size=(n, d)).astype(np.float32),
        labels=(np.arange(n) % len(NAMES)).astype(np.int64),
        split=split,
        text_mask=np.ones(n, bool),
        image_mask=np.arange(n) % 5 != 0,
    )


@pytest.fixture
def good(tmp_path):
    """A valid version-1 store (fixed-width ids.npy/users.npy, as written before version 2 and
    by numpy-only producers) with every optional array, plus its source data."""
    data = make_data()
    path = write_feature_store(tmp_path / "store", label_names=NAMES, backbone="test-bb", version=1, **data)
    return path, data


@pytest.fixture
def good2(tmp_path):
    """The same store written at version 2 (the default: ids/users as UTF-8 bytes + offsets)."""
    data = make_data()
    path = write_feature_store(tmp_path / "store2", label_names=NAMES, backbone="test-bb", **data)
    return path, data


# ---------------------------------------------------------------- round trip / writers

def test_round_trip(good):
    path, data = good
    s = FeatureStore.open(path)
    assert isinstance(s.text, np.memmap) and isinstance(s.image, np.memmap)
    for key, value in data.items():
        np.testing.assert_array_equal(np.asarray(getattr(s, key)), value, err_msg=key)
    assert len(s) == 20 and s.dim == 6 and s.backbone == "test-bb" and s.label_names == NAMES
    assert s.text.dtype == np.float32 and s.labels.dtype == np.int64
    np.testing.assert_array_equal(s.indices("test"), np.arange(16, 20))
    np.testing.assert_array_equal(s.indices("val"), [14, 15])
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "sgmft-features" and meta["version"] == 1 and meta["num_posts"] == 20
    assert (path / "ids.npy").is_file() and not (path / "ids.utf8.npy").exists()
    assert meta["dim"] == 6 and meta["dtype"] == "float32" and meta["normalization"] == "l2"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_minimal_store_and_float16(tmp_path):
    d = make_data()
    path = write_feature_store(tmp_path / "s", ids=d["ids"], text=d["text"], image=d["image"],
                               label_names=NAMES, dtype="float16")
    s = FeatureStore.open(path)
    assert s.labels is None and s.users is None and s.split is None and s.text_mask is None
    assert s.text.dtype == np.float16
    np.testing.assert_allclose(s.text, d["text"], rtol=1e-3, atol=1e-3)
    with pytest.raises(FeatureStoreError, match="split.npy.*no split.npy"):
        s.indices("train")


def test_streaming_writer_equals_one_shot(tmp_path, good):
    path, data = good
    n = len(data["ids"])
    with FeatureStoreWriter(tmp_path / "stream", num_posts=n, dim=6, label_names=NAMES, backbone="test-bb",
                            with_split=True, with_masks=True, id_width=8, version=1) as w:
        for start in (14, 0, 7):  # out of order on purpose
            sl = slice(start, min(n, start + 7))
            w.write(start, **{k: v[sl] for k, v in data.items()})
    a, b = FeatureStore.open(path), FeatureStore.open(tmp_path / "stream")
    for key in ("text", "image", "labels", "split", "text_mask", "image_mask", "users", "ids"):
        np.testing.assert_array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key)), err_msg=key)
    assert a.meta == b.meta


def test_streaming_writer_chunked_validation(tmp_path, good, monkeypatch):
    """Content checks must still find a NaN when they read one row per chunk."""
    path, data = good
    monkeypatch.setattr(store_mod, "_CHUNK_BYTES", 1)
    validate_feature_store(path)
    img = np.load(path / "image.npy", mmap_mode="r+")
    img[13, 2] = np.inf
    img.flush()
    del img
    with pytest.raises(FeatureStoreError, match=r"image\.npy: non-finite .* row 13 \(id 'p13'\)"):
        validate_feature_store(path)


def test_writer_discards_temp_dir_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with FeatureStoreWriter(tmp_path / "s", num_posts=4, dim=2, label_names=NAMES):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_incomplete_rows_rejected(tmp_path):
    d = make_data(n=4, d=2)
    w = FeatureStoreWriter(tmp_path / "s", num_posts=4, dim=2, label_names=NAMES, with_users=False)
    w.write(0, ids=d["ids"][:2], text=d["text"][:2], image=d["image"][:2], labels=d["labels"][:2])
    with pytest.raises(FeatureStoreError, match=r"2 rows never written \(first: row 2\)"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_chunks(tmp_path):
    d = make_data(n=4, d=2)
    w = FeatureStoreWriter(tmp_path / "s", num_posts=4, dim=2, label_names=NAMES, with_users=False, id_width=3,
                           version=1)
    base = dict(text=d["text"][:2], image=d["image"][:2], labels=[0, 1])
    with pytest.raises(FeatureStoreError, match=r"ids 'toolong' in row 1 is longer than id_width=3"):
        w.write(0, ids=["a", "toolong"], **base)
    with pytest.raises(FeatureStoreError, match=r"text\.npy: chunk shape \(2, 3\), expected \(2, 2\)"):
        w.write(0, ids=["a", "b"], **{**base, "text": np.zeros((2, 3))})
    with pytest.raises(FeatureStoreError, match="rows 3:5 outside 0:4"):
        w.write(3, ids=["a", "b"], **base)
    with pytest.raises(FeatureStoreError, match="users given but the writer was created without it"):
        w.write(0, ids=["a", "b"], users=["x", "y"], **base)
    with pytest.raises(FeatureStoreError, match="labels missing for rows 0:2"):
        w.write(0, ids=["a", "b"], text=base["text"], image=base["image"])
    w.abort()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- labels given as names

def test_string_labels_are_mapped(tmp_path):
    d = make_data(n=6, d=3)
    path = write_feature_store(tmp_path / "s", ids=d["ids"], text=d["text"], image=d["image"], label_names=NAMES,
                               labels=["school", "home", "work", "home", "school", "work"])
    np.testing.assert_array_equal(FeatureStore.open(path).labels, [2, 0, 1, 0, 2, 1])


def test_unknown_string_label_names_name_and_row(tmp_path):
    d = make_data(n=3, d=3)
    with pytest.raises(FeatureStoreError, match=r"labels\.npy: unknown label 'gym' in row 2"):
        write_feature_store(tmp_path / "s", ids=d["ids"], text=d["text"], image=d["image"], label_names=NAMES,
                            labels=["home", "work", "gym"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- atomic overwrite

def test_refuses_to_overwrite_without_flag(good):
    path, data = good
    before = (path / "text.npy").read_bytes()
    with pytest.raises(FeatureStoreError, match="already exists; pass overwrite=True"):
        write_feature_store(path, label_names=NAMES, **data)
    assert (path / "text.npy").read_bytes() == before


def test_overwrite_replaces_store(good):
    path, _ = good
    d = make_data(n=10, d=4, seed=1)
    write_feature_store(path, ids=d["ids"], text=d["text"], image=d["image"], label_names=["a", "b"],
                        overwrite=True)
    s = FeatureStore.open(path)
    assert len(s) == 10 and s.dim == 4 and s.label_names == ["a", "b"]
    assert not (path / "labels.npy").exists(), "files of the old store must not survive"
    assert sorted(p.name for p in path.parent.iterdir()) == ["store"]


def test_failed_overwrite_keeps_old_store(good):
    path, data = good
    bad = dict(data, text=np.full_like(data["text"], np.nan))
    with pytest.raises(FeatureStoreError, match="non-finite") as info:
        write_feature_store(path, label_names=NAMES, overwrite=True, **bad)
    assert str(info.value).startswith(str(path / "text.npy")), "error must name the final path, not the temp dir"
    np.testing.assert_array_equal(FeatureStore.open(path).text, data["text"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["store"]


def test_overwrite_refuses_non_store_directory(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.txt").write_text("do not delete")
    d = make_data(n=4, d=2)
    with pytest.raises(FeatureStoreError, match="not a feature store"):
        write_feature_store(target, ids=d["ids"], text=d["text"], image=d["image"], label_names=NAMES,
                            overwrite=True)
    assert (target / "thesis.txt").read_text() == "do not delete"


# ---------------------------------------------------------------- validation rejects bad stores

def _meta(path):
    return json.loads((path / "meta.json").read_text())


def _set_meta(path, **changes):
    meta = _meta(path)
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def _save(path, name, arr):
    np.save(path / f"{name}.npy", arr)


@pytest.mark.parametrize("corrupt, file, problem", [
    (lambda p, d: (p / "meta.json").unlink(), "meta.json", "missing meta.json"),
    (lambda p, d: (p / "meta.json").write_text("{not json"), "meta.json", "invalid JSON"),
    (lambda p, d: (p / "meta.json").write_text("[1, 2]"), "meta.json", "must be a JSON object"),
    (lambda p, d: _set_meta(p, format="other"), "meta.json", "format must be 'sgmft-features'"),
    (lambda p, d: _set_meta(p, version=3), "meta.json", "unsupported version 3"),
    (lambda p, d: _set_meta(p, dim="6"), "meta.json", "dim must be an integer"),
    (lambda p, d: _set_meta(p, dtype="float64"), "meta.json", "dtype must be one of"),
    (lambda p, d: _set_meta(p, label_names=["a", "b", "a"]), "meta.json", "label_names are not unique ('a'"),
    (lambda p, d: _set_meta(p, label_names=["a", 3]), "meta.json", "label_names must be a non-empty list"),
    (lambda p, d: (p / "text.npy").unlink(), "text.npy", "missing required array text.npy"),
    (lambda p, d: (p / "ids.npy").unlink(), "ids.npy", "missing required array ids.npy"),
    (lambda p, d: (p / "image.npy").write_bytes(b"garbage"), "image.npy", "cannot read"),
    (lambda p, d: _save(p, "users", d["users"].astype(object)), "users.npy", "cannot read"),
    (lambda p, d: _save(p, "image", d["image"][:, :5]), "image.npy", "width 5 != meta.dim 6"),
    (lambda p, d: _set_meta(p, dim=7), "text.npy", "width 6 != meta.dim 7"),
    (lambda p, d: _save(p, "text", d["text"][:-1]), "text.npy", "wrong row count"),
    (lambda p, d: _save(p, "labels", d["labels"][:-1]), "labels.npy", "wrong row count"),
    (lambda p, d: _set_meta(p, num_posts=21), "text.npy", "wrong row count"),
    (lambda p, d: _save(p, "text", d["text"].astype(np.float64)), "text.npy", "dtype <f8 != meta.dtype <f4"),
    (lambda p, d: _save(p, "ids", d["ids"].astype("S")), "ids.npy", "is not unicode"),
    (lambda p, d: _save(p, "labels", d["labels"].astype(float)), "labels.npy", "is not signed integer"),
    (lambda p, d: _save(p, "text", np.where(np.arange(20)[:, None] == 11, np.nan, d["text"]).astype(np.float32)),
     "text.npy", "non-finite value (NaN or Inf) in row 11 (id 'p11')"),
    (lambda p, d: _save(p, "image", np.where(np.arange(20)[:, None] == 3, -np.inf, d["image"]).astype(np.float32)),
     "image.npy", "non-finite value (NaN or Inf) in row 3 (id 'p3')"),
    (lambda p, d: _save(p, "labels", np.where(np.arange(20) == 5, 3, d["labels"])), "labels.npy",
     "unknown label 3 in row 5 (id 'p5')"),
    (lambda p, d: _save(p, "labels", np.where(np.arange(20) == 8, -2, d["labels"])), "labels.npy",
     "unknown label -2 in row 8"),
    (lambda p, d: _save(p, "ids", np.where(np.arange(20) == 9, "p4", d["ids"])), "ids.npy",
     "duplicate id 'p4' (rows 4 and 9)"),
    (lambda p, d: _save(p, "split", np.where(np.arange(20) == 2, "dev", d["split"])), "split.npy",
     "invalid split value 'dev' in row 2"),
    (lambda p, d: _save(p, "split", np.where(d["split"] == "test", "val", d["split"])), "split.npy",
     "empty split: no row is 'test'"),
    (lambda p, d: _save(p, "split", np.array(["test"] * 20)), "split.npy", "empty split: no row is 'train'"),
    (lambda p, d: _save(p, "image_mask", d["image_mask"].astype(np.uint8)), "image_mask.npy", "is not bool"),
    (lambda p, d: _save(p, "text_mask", np.ones((20, 2), bool)), "text_mask.npy", "shape (20, 2), expected (20,)"),
])
def test_validation_rejects(good, corrupt, file, problem):
    path, data = good
    corrupt(path, data)
    with pytest.raises(FeatureStoreError) as info:
        validate_feature_store(path)
    msg = str(info.value)
    assert str(path / file) in msg, msg
    assert problem in msg, msg
    assert isinstance(info.value, ValueError)


def test_empty_val_split_is_allowed(good):
    path, data = good
    _save(path, "split", np.where(data["split"] == "val", "train", data["split"]))
    s = validate_feature_store(path)
    assert s.indices("val").size == 0 and s.indices("train").size == 16


def test_open_without_validate_skips_content_scan_only(good):
    path, data = good
    _save(path, "text", np.full_like(data["text"], np.nan))
    assert np.isnan(FeatureStore.open(path, validate=False).text).all()
    _save(path, "text", data["text"][:, :2])
    with pytest.raises(FeatureStoreError, match="width 2 != meta.dim 6"):
        FeatureStore.open(path, validate=False)


# ---------------------------------------------------------------- numpy-only producer

def test_numpy_only_example_writes_valid_store(tmp_path):
    out = tmp_path / "toy"
    res = subprocess.run([sys.executable, str(EXAMPLE), str(out), "--n", "80", "--dim", "16"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    src = EXAMPLE.read_text()
    assert "sgmft" not in "".join(l for l in src.splitlines() if l.startswith(("import", "from")))
    s = validate_feature_store(out)
    assert len(s) == 80 and s.dim == 16 and s.label_names[0] == "home"
    assert s.indices("train").size and s.indices("test").size
    # masked-out image rows hold zeros, and features carry class signal (class means differ)
    assert not np.asarray(s.image)[~np.asarray(s.image_mask)].any()
    lab = np.asarray(s.labels)
    text = np.asarray(s.text)
    m0, m1 = text[lab == 0].mean(0), text[lab == 1].mean(0)
    assert np.linalg.norm(m0 - m1) > 0.3


def test_writer_rejects_bad_label_names_early(tmp_path):
    with pytest.raises(FeatureStoreError, match=r"meta\.json: label_names are not unique \('home'"):
        FeatureStoreWriter(tmp_path / "s", num_posts=2, dim=2, label_names=["home", "home"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- version 2 strings, upgrade

def test_v2_round_trip_strings_as_utf8_and_offsets(good2):
    path, data = good2
    s = FeatureStore.open(path)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["version"] == 2 and meta["string_chars"] == {"ids": 3, "users": 2}
    assert not (path / "ids.npy").exists() and not (path / "users.npy").exists()
    off = np.load(path / "ids.offsets.npy")
    assert off.dtype == np.int64 and off[0] == 0 and off[-1] == np.load(path / "ids.utf8.npy").size
    assert bytes(np.load(path / "ids.utf8.npy")).decode() == "".join(data["ids"])
    for key, value in data.items():
        np.testing.assert_array_equal(np.asarray(getattr(s, key)), value, err_msg=key)
    ids = s.ids
    assert len(ids) == 20 and ids.shape == (20,) and ids.ndim == 1 and ids.dtype == np.dtype("<U3")
    assert ids[3] == "p3" and ids[-1] == "p19" and isinstance(ids[0], np.str_)
    np.testing.assert_array_equal(ids[5:8], ["p5", "p6", "p7"])
    np.testing.assert_array_equal(ids[[12, 0]], ["p12", "p0"])
    np.testing.assert_array_equal(ids[np.arange(20) % 7 == 0], ["p0", "p7", "p14"])
    np.testing.assert_array_equal(ids[::9], ["p0", "p9", "p18"])
    assert list(ids) == list(data["ids"]) and ids[20:].size == 0
    with pytest.raises(IndexError):
        ids[20]


def test_v2_long_value_costs_only_its_row(tmp_path):
    """Version 1 pads every row to the longest id (<U width x 4 bytes); version 2 stores bytes."""
    n = 1000
    ids = np.array([f"p{i}" for i in range(n - 1)] + ["x" * 5000])
    users = np.array(["用户" + str(i % 7) for i in range(n)])   # multi-byte UTF-8
    kw = dict(ids=ids, users=users, text=np.zeros((n, 2), np.float32), image=np.zeros((n, 2), np.float32),
              label_names=NAMES)
    v1, v2 = write_feature_store(tmp_path / "v1", version=1, **kw), write_feature_store(tmp_path / "v2", **kw)
    assert (v1 / "ids.npy").stat().st_size > n * 5000 * 4
    assert (v2 / "ids.utf8.npy").stat().st_size < 10_000 and (v2 / "ids.offsets.npy").stat().st_size < 9_000
    a, b = FeatureStore.open(v1), FeatureStore.open(v2)
    np.testing.assert_array_equal(np.asarray(a.users), np.asarray(b.users))
    assert b.ids[n - 1] == "x" * 5000 and b.users[8] == "用户1" and b.users.dtype == np.dtype("<U3")


def test_v2_streaming_writer_out_of_order_and_overlap(tmp_path, good2):
    path, data = good2
    n = len(data["ids"])
    with FeatureStoreWriter(tmp_path / "stream", num_posts=n, dim=6, label_names=NAMES, backbone="test-bb",
                            with_split=True, with_masks=True) as w:
        for start in (14, 0, 7):  # out of order: the chunk at 14 waits until 7..13 arrive
            sl = slice(start, min(n, start + 7))
            w.write(start, **{k: v[sl] for k, v in data.items()})
    a, b = FeatureStore.open(path), FeatureStore.open(tmp_path / "stream")
    for key in ("text", "image", "labels", "split", "text_mask", "image_mask", "users", "ids"):
        np.testing.assert_array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key)), err_msg=key)
    assert a.meta == b.meta
    assert not [p for p in (tmp_path / "stream").iterdir() if p.name.startswith(".")]   # no raw temp file
    w = FeatureStoreWriter(tmp_path / "s", num_posts=4, dim=2, label_names=NAMES, with_users=False)
    w.write(0, ids=["a", "b"], text=np.zeros((2, 2)), image=np.zeros((2, 2)), labels=[0, 1])
    with pytest.raises(FeatureStoreError, match="rows from 1 were already written"):
        w.write(1, ids=["b", "c"], text=np.zeros((2, 2)), image=np.zeros((2, 2)), labels=[0, 1])
    w.abort()


@pytest.mark.parametrize("corrupt, file, problem", [
    (lambda p: (p / "ids.offsets.npy").unlink(), "ids.offsets.npy", "missing required array ids.offsets.npy"),
    (lambda p: _save(p, "ids.offsets", np.load(p / "ids.offsets.npy")[:-1]), "ids.offsets.npy",
     "expected (21,) (N + 1 offsets): wrong row count"),
    (lambda p: _save(p, "ids.offsets", np.load(p / "ids.offsets.npy").astype(np.int32)), "ids.offsets.npy",
     "1-D int64 array of row offsets"),
    (lambda p: _save(p, "users.utf8", np.load(p / "users.utf8.npy")[:-1]), "users.offsets.npy",
     "end at the byte count of users.utf8.npy"),
    (lambda p: _save(p, "ids.utf8", np.load(p / "ids.utf8.npy").astype(np.int16)), "ids.utf8.npy",
     "1-D uint8 array of UTF-8 bytes"),
    (lambda p: _save(p, "ids.offsets", np.load(p / "ids.offsets.npy")[[0, 2, 1, *range(3, 21)]]),
     "ids.offsets.npy", "offsets decrease at row 1"),
    (lambda p: _save(p, "ids.utf8", np.where(np.arange(np.load(p / "ids.utf8.npy").size) == 4, 0xFF,
                                              np.load(p / "ids.utf8.npy")).astype(np.uint8)),
     "ids.utf8.npy", "row 2 is not valid UTF-8"),
    (lambda p: _save(p, "ids.utf8", np.frombuffer(b"p0p1p2p3p4p5p6p7p8p9p11p11p12p13p14p15p16p17p18p19", np.uint8)),
     "ids.utf8.npy", "duplicate id 'p11' (rows 10 and 11)"),
])
def test_v2_validation_rejects(good2, corrupt, file, problem):
    path, _ = good2
    corrupt(path)
    with pytest.raises(FeatureStoreError) as info:
        validate_feature_store(path)
    msg = str(info.value)
    assert str(path / file) in msg and problem in msg, msg


def test_upgrade_v1_to_v2_keeps_features_byte_identical(good, tmp_path):
    from sgmft.features.store import upgrade_store

    path, data = good
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    meta1 = _meta(path)
    out = upgrade_store(path, tmp_path / "up")
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before   # the source is untouched
    for name in ("text.npy", "image.npy", "labels.npy", "split.npy", "text_mask.npy", "image_mask.npy"):
        assert (out / name).read_bytes() == before[name], name
    meta2 = _meta(out)
    assert meta2.pop("version") == 2 and meta2.pop("string_chars") == {"ids": 3, "users": 2}
    assert meta2 == {k: v for k, v in meta1.items() if k != "version"}
    a, b = FeatureStore.open(path), FeatureStore.open(out)
    for key in ("ids", "users"):
        np.testing.assert_array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key)))
    assert upgrade_store(out) == out and _meta(out)["version"] == 2      # already v2: left alone
    upgrade_store(path)                                                   # in place
    assert _meta(path)["version"] == 2 and not (path / "ids.npy").exists()
    assert (path / "text.npy").read_bytes() == before["text.npy"]


def test_cli_store_upgrade(good, tmp_path, capsys):
    from sgmft.cli import main

    path, _ = good
    assert main(["store", "upgrade", str(path), "--out", str(tmp_path / "up"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version_before"] == 1 and doc["version"] == 2 and doc["changed"] and doc["num_posts"] == 20
    assert main(["store", "upgrade", str(tmp_path / "up")]) == 0
    assert "already version 2; nothing to do" in capsys.readouterr().out
    assert main(["store", "upgrade", str(tmp_path / "missing")]) == 2
    assert "feature store directory does not exist" in capsys.readouterr().err
