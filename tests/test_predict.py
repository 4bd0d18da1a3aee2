"""Abstention and the account of each prediction in every predict path (issue 18): min_confidence
(``uncertain``) and the explanation in Predictions, the prediction files (CSV / JSONL) and the
PostPredictor result dict the HTTP service returns."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from sgmft.cli import main
from sgmft.features import FeatureStore
from sgmft.predict import Predictor
from sgmft.predict.features import uncertain_mask
from sgmft.predict.output import EXPLANATION_COLUMNS, read_predictions, write_predictions

from conftest import make_store

NAMES = ["home", "work", "gym"]
EXPL_KEYS = {"decided_by", "text", "image", "sentence", "method", "scores"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from sgmft.config import load_preset
    from sgmft.train import train

    root = tmp_path_factory.mktemp("predict")
    store = make_store(root / "store", n=200, dim=16, k=4, with_split=True)
    p = load_preset("concat")
    p.train.epochs, p.train.batch_size, p.train.progress = 3, 32, False
    train(store, root / "run", p)
    return {"store": store, "run": root / "run"}


def test_uncertain_mask_and_its_checks():
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.6, 0.4, 0.0]])
    assert uncertain_mask(probs, None).tolist() == [False, False, False]
    assert uncertain_mask(probs, 0.6).tolist() == [True, False, False]      # below, not at, the threshold
    assert uncertain_mask(probs, 1.0).tolist() == [True, True, True]
    assert uncertain_mask(np.zeros((0, 3)), 0.5).shape == (0,)
    for bad in (-0.1, 1.5, float("nan"), "high"):
        with pytest.raises(ValueError, match="min_confidence"):
            uncertain_mask(probs, bad)


def test_min_confidence_marks_posts_and_keeps_their_probabilities(run):
    pred = Predictor.load(run["run"])
    fs = FeatureStore.open(run["store"])
    p0 = pred.predict_store(fs)
    assert not p0.uncertain.any() and p0.uncertain.dtype == bool
    thr = float(np.median(p0.probs.max(1)))
    p = pred.predict_store(fs, min_confidence=thr)
    np.testing.assert_array_equal(p.probs, p0.probs)
    np.testing.assert_array_equal(p.uncertain, p0.probs.max(1) < thr)
    assert 0 < p.uncertain.sum() < len(fs)
    with pytest.raises(ValueError, match="min_confidence"):
        pred.predict_store(fs, min_confidence=2)


def test_schema_appends_uncertain_and_explanation_after_the_old_columns(tmp_path):
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    expl = [{"decided_by": "image", "text": "generic", "image": "shows_place", "sentence": "Decided by the image; "
             "the text looks generic.", "method": "trust_states", "scores": {"text": 0.1, "image": 0.9}},
            {"decided_by": "both", "text": "supports", "image": "supports", "sentence": "s", "method": "masking",
             "scores": {"text": 0.2, "image": 0.3}}]
    kw = dict(extras={"text_mask": [True, False]}, uncertain=[False, True], explanations=expl)
    write_predictions(tmp_path / "p.csv", ["a", "b"], probs, NAMES, ["home", None], **kw)
    write_predictions(tmp_path / "p.jsonl", ["a", "b"], probs, NAMES, ["home", None], **kw)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == ("id,pred,prob_home,prob_work,prob_gym,true,text_mask,uncertain,"
                        + ",".join(EXPLANATION_COLUMNS))
    assert lines[2] == "b,gym,0.1,0.3,0.6,,0,1,both,supports,supports"
    j = read_predictions(tmp_path / "p.jsonl")
    assert list(j[0]) == ["id", "pred", "prob_home", "prob_work", "prob_gym", "true", "text_mask", "uncertain",
                          "explanation"]
    assert j[0]["explanation"] == expl[0] and j[1]["uncertain"] is True and j[0]["uncertain"] is False
    with pytest.raises(ValueError, match="explanations has 1 entries"):
        write_predictions(tmp_path / "x.csv", ["a", "b"], probs, NAMES, explanations=expl[:1])


def test_predict_store_cli_min_confidence_csv_and_jsonl(run, tmp_path, capsys):
    fs = FeatureStore.open(run["store"])
    want = Predictor.load(run["run"]).predict_store(fs, explain=True)
    thr = float(np.quantile(want.probs.max(1), 0.3))
    assert main(["predict", str(run["run"]), "--store", str(run["store"]), "--out", str(tmp_path / "p.csv"),
                 "--min-confidence", str(thr), "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    flagged = want.probs.max(1) < thr
    assert s["uncertain"] == int(flagged.sum()) > 0 and s["min_confidence"] == pytest.approx(thr)
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-4:] == ["uncertain", *EXPLANATION_COLUMNS]
    assert [r["uncertain"] == "1" for r in rows] == flagged.tolist()
    assert [r["explanation_decided_by"] for r in rows] == [e["decided_by"] for e in want.explanations]
    assert main(["predict", str(run["run"]), "--store", str(run["store"]), "--out", str(tmp_path / "p.jsonl"),
                 "--no-progress"]) == 0
    j = read_predictions(tmp_path / "p.jsonl")
    assert not any(r["uncertain"] for r in j)                                   # no threshold: never uncertain
    assert [r["explanation"] for r in j] == want.explanations
    assert set(j[0]["explanation"]) == EXPL_KEYS
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run["run"]), "--store", str(run["store"]), "--out", str(tmp_path / "q.csv"),
              "--min-confidence", "1.5"])
    assert e.value.code == 2 and "probability between 0 and 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    """A tiny random Chinese-CLIP, 40 SimPosts extracted and a 2-epoch concat run on them."""
    import torch

    from sgmft.data.simposts import SimPostsConfig, generate_simposts
    from sgmft.features.backbones.tiny import build_tiny_chinese_clip

    old_env, old_threads = os.environ.get("HF_HUB_OFFLINE"), torch.get_num_threads()
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rawpredict")
    spec = f"chinese-clip:{build_tiny_chinese_clip(root / 'tinycc')}"
    man = generate_simposts(root / "posts", SimPostsConfig(num_posts=40, seed=3))
    assert main(["extract", str(man), "--out", str(root / "store"), "--backbone", spec, "--batch-size", "16",
                 "--no-progress"]) == 0
    assert main(["train", str(root / "store"), "--out", str(root / "run"), "--preset", "concat", "--epochs", "2",
                 "--batch-size", "16", "--no-progress"]) == 0
    yield {"root": root, "manifest": man, "run": root / "run"}
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old_env


def test_post_predictor_result_has_uncertain_and_explanation(raw_run):
    from sgmft.predict import PostPredictor

    pp = PostPredictor.load(raw_run["run"])
    r = pp.predict_post("今天在电影院看电影", [])
    assert r["uncertain"] is False and set(r["explanation"]) == EXPL_KEYS
    assert r["explanation"]["image"] == "absent" and r["explanation"]["method"] == "masking"
    assert r["explanation"]["decided_by"] in ("text", "neither")
    r2 = pp.predict_post("今天在电影院看电影", [], min_confidence=1.0)
    assert r2["uncertain"] is True and r2["probs"] == r["probs"]
    empty = pp.predict_posts([("", [])], min_confidence=0.0)[0]
    assert empty["explanation"]["decided_by"] == "neither" and empty["uncertain"] is False
    with pytest.raises(ValueError, match="min_confidence"):
        pp.predict_posts([("x", [])], min_confidence=-1)


def test_predict_manifest_writes_uncertain_and_explanation(raw_run, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(raw_run["run"]), "--manifest", str(raw_run["manifest"]), "--out", str(out),
                 "--min-confidence", "0.99", "--no-progress"]) == 0
    assert "uncertain (top probability below 0.99)" in capsys.readouterr().out
    rows = read_predictions(out)
    assert len(rows) == 40
    names = [k[5:] for k in rows[0] if k.startswith("prob_")]
    for r in rows:
        assert r["uncertain"] == (max(r[f"prob_{n}"] for n in names) < 0.99)
        assert set(r["explanation"]) == EXPL_KEYS
        assert list(r)[-4:] == ["text_mask", "image_mask", "uncertain", "explanation"]
    assert main(["predict", str(raw_run["run"]), "--manifest", str(raw_run["manifest"]), "--out",
                 str(tmp_path / "p.csv"), "--no-progress"]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        recs = list(csv.DictReader(f))
    assert list(recs[0])[-6:] == ["text_mask", "image_mask", "uncertain", *EXPLANATION_COLUMNS]
    assert [r["explanation_decided_by"] for r in recs] == [r["explanation"]["decided_by"] for r in rows]
    assert all(r["uncertain"] == "0" for r in recs)


# -- the one batch prediction writer and the one result builder (issue 19) ----------------------
def test_batch_writer_writes_counts_and_summarises(tmp_path):
    from sgmft.predict.output import PredictionBatch, write_prediction_batches

    expl = {"decided_by": "both", "text": "supports", "image": "supports", "sentence": "s", "method": "masking",
            "scores": {"text": 0.1, "image": 0.2}}
    b1 = PredictionBatch(["a", "b"], np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]), [False, True], [expl] * 2,
                         ["home", None], {"text_mask": [True, False]})
    b2 = PredictionBatch(["c"], np.array([[0.2, 0.5, 0.3]]), [True], [expl], ["gym"], {"text_mask": [True]})
    t = write_prediction_batches(tmp_path / "p.csv", NAMES, iter([b1, b2]), total=3, with_true=True,
                                 extras=("text_mask",), min_confidence=0.6)
    s = t.summary(store="S", split="all")
    assert list(s) == ["posts", "out", "store", "split", "predicted", "labelled", "seconds", "min_confidence",
                       "uncertain", "accuracy"]
    assert s["posts"] == 3 and s["predicted"] == {"home": 1, "work": 1, "gym": 1} and s["uncertain"] == 2
    assert s["labelled"] == 2 and s["accuracy"] == 0.5 and s["out"] == str(tmp_path / "p.csv")
    rows = read_predictions(tmp_path / "p.csv")
    assert [(r["id"], r["pred"], r["true"], r["text_mask"], r["uncertain"]) for r in rows] == [
        ("a", "home", "home", "1", "0"), ("b", "gym", "", "0", "1"), ("c", "work", "gym", "1", "1")]
    # no labels, no threshold: neither a true column nor the threshold's keys
    t = write_prediction_batches(tmp_path / "q.jsonl", NAMES, [b2], total=1, with_true=False)
    s = t.summary()
    assert "accuracy" not in s and "uncertain" not in s and s["labelled"] == 0
    assert "true" not in read_predictions(tmp_path / "q.jsonl")[0]


def test_store_and_manifest_predictions_agree(raw_run, tmp_path):
    """The store extracted from a manifest and the manifest itself give the same rows and the same
    summary figures (both go through the one batch writer)."""
    from sgmft.predict import PostPredictor

    pp = PostPredictor.load(raw_run["run"])
    thr = 0.3
    sm = pp.predict_manifest(raw_run["manifest"], tmp_path / "m.jsonl", min_confidence=thr)
    ss = pp.predictor.predict_store_to_file(raw_run["root"] / "store", tmp_path / "s.jsonl", min_confidence=thr)
    for k in ("posts", "predicted", "labelled", "accuracy", "uncertain", "min_confidence"):
        assert sm[k] == ss[k], k
    fs = FeatureStore.open(raw_run["root"] / "store")
    assert sm["posts"] == 40 and sm["rejects"] == 0
    assert (sm["text_missing"], sm["image_missing"]) == (int((~np.asarray(fs.text_mask)).sum()),
                                                         int((~np.asarray(fs.image_mask)).sum()))
    m, s = read_predictions(tmp_path / "m.jsonl"), read_predictions(tmp_path / "s.jsonl")
    assert [r["id"] for r in m] == [r["id"] for r in s] and [r["true"] for r in m] == [r["true"] for r in s]
    for a, b in zip(m, s):
        assert a["pred"] == b["pred"] and a["uncertain"] == b["uncertain"]
        assert [a[f"prob_{n}"] for n in pp.label_names] == pytest.approx([b[f"prob_{n}"] for n in pp.label_names],
                                                                         abs=1e-6)


def test_post_result_is_the_one_result_builder(raw_run):
    from sgmft.predict import PostPredictor
    from sgmft.predict.posts import post_result

    r = post_result(NAMES, np.array([0.2, 0.5, 0.3]), uncertain=np.bool_(True), text_mask=True)
    assert r == {"label": "work", "prob": 0.5, "probs": {"home": 0.2, "work": 0.5, "gym": 0.3}, "uncertain": True,
                 "explanation": None, "text_mask": True}
    assert type(r["prob"]) is float and type(r["uncertain"]) is bool
    pp = PostPredictor.load(raw_run["run"])
    got = pp.predict_post("今天在电影院看电影", [])
    want = post_result(pp.label_names, np.array(list(got["probs"].values())), uncertain=got["uncertain"],
                       explanation=got["explanation"])
    assert {k: got[k] for k in want} == want
    assert list(got)[:5] == ["label", "prob", "probs", "uncertain", "explanation"]


# -- the streamed manifest (issue 22): bounded memory, the same files, a public encoder= -------------
@pytest.fixture(scope="module")
def dirty(raw_run):
    """A dirty SimPosts manifest (bad rows, broken images), and the same without its labels."""
    from sgmft.data.simposts import SimPostsConfig, generate_simposts

    man = generate_simposts(raw_run["root"] / "dirty", SimPostsConfig(num_posts=45, dirty=True, seed=4))
    lines = man.read_text(encoding="utf-8").splitlines(keepends=True)
    nolab = man.with_name("nolabel.jsonl")
    with open(nolab, "w", encoding="utf-8") as f:
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                f.write(line)                      # a malformed row stays malformed, on its line
                continue
            if isinstance(obj, dict):
                obj.pop("label", None)
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return {"labelled": man, "unlabelled": nolab}


def _whole_file_reference(pp, manifest, out, rejects_out):
    """The pre-streaming algorithm from public parts: the whole manifest read at once
    (read_manifest), the same batches encoded, one whole-file write, rejects sorted by line."""
    from sgmft.ingest.manifest import Reject, read_manifest, write_rejects
    from sgmft.predict.features import uncertain_mask

    posts, row_rej = read_manifest(manifest, label_names=pp.label_names, check_images=True, on_error="skip")
    batches = [posts[s:s + pp.batch_size] for s in range(0, len(posts), pp.batch_size)]
    probs, expl, tm, im, img_rej = [], [], [], [], []
    for batch, enc, p in pp.encode_batches(batches, manifest.resolve().parent):
        probs.append(p.probs)
        expl += p.explanations
        tm += [bool(m) for m in enc.text_mask[:len(batch)]]
        im += [bool(m) for m in enc.image_mask[:len(batch)]]
        img_rej += [Reject(q.line, q.id, "images", why, stage="extract")
                    for r, q in enumerate(batch) for _, why in enc.rejects[r]]
    probs = np.concatenate(probs)
    write_predictions(out, [q.id for q in posts], probs, pp.label_names, [q.label for q in posts],
                      extras={"text_mask": tm, "image_mask": im}, uncertain=uncertain_mask(probs, 0.4),
                      explanations=expl)
    write_rejects(rejects_out, sorted(list(row_rej) + img_rej, key=lambda r: r.line))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("which", ["labelled", "unlabelled"])
def test_streamed_predict_manifest_writes_the_whole_file_output(raw_run, dirty, tmp_path, fmt, which):
    """predict_manifest streams the manifest in chunks of batch_size (several chunks here) and
    writes the file the whole-file algorithm writes, byte for byte, rejects with their line
    numbers included; without labels a CSV has no ``true`` column (decided at the end)."""
    from sgmft.predict import PostPredictor

    pp = PostPredictor.load(raw_run["run"], batch_size=7)
    man = dirty[which]
    s = pp.predict_manifest(man, tmp_path / f"got.{fmt}", min_confidence=0.4)
    _whole_file_reference(pp, man, tmp_path / f"want.{fmt}", tmp_path / "want.rejects.jsonl")
    assert (tmp_path / f"got.{fmt}").read_bytes() == (tmp_path / f"want.{fmt}").read_bytes()
    assert (tmp_path / "got.rejects.jsonl").read_bytes() == (tmp_path / "want.rejects.jsonl").read_bytes()
    rows, rejects = read_predictions(tmp_path / f"got.{fmt}"), read_predictions(tmp_path / "got.rejects.jsonl")
    assert s["posts"] == len(rows) > 2 * pp.batch_size and s["rejects"] == len(rejects) > 0
    assert s["rows_rejected"] > 0 and s["images_rejected"] > 0
    assert ("true" in rows[0]) == (which == "labelled") and s["labelled"] == (len(rows) if which == "labelled" else 0)
    src = man.read_text(encoding="utf-8").splitlines()
    for r in rejects:                                          # each reject names its manifest line
        if r["id"] is not None:
            assert f'"{r["id"]}"' in src[r["line"] - 1]
    assert [r["line"] for r in rejects] == sorted(r["line"] for r in rejects)
    assert not list(tmp_path.glob(".*"))                       # no temporary body or file left behind


def test_predict_manifest_refuses_a_missing_manifest_before_writing(raw_run, tmp_path):
    from sgmft.predict import PostPredictor

    pp = PostPredictor.load(raw_run["run"])
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        pp.predict_manifest(tmp_path / "nope.jsonl", tmp_path / "out" / "p.jsonl")
    assert not (tmp_path / "out" / "p.jsonl").exists()


def test_ray_batch_encoder_driver_without_ray(raw_run, dirty, tmp_path, monkeypatch):
    """The Ray predict driver (RayBatchEncoder through the public encoder=) with the Ray pipeline
    replaced by its two stages run in process and results coming back in reverse order: the
    batches go through a spill file, come out in post order, and the files are the local
    engine's, byte for byte; a second run finds every batch's shard (resume) and encodes none."""
    import pickle

    from sgmft.features import ray_engine as R
    from sgmft.predict import PostPredictor
    from sgmft.predict.ray_predict import RayBatchEncoder, _cache_setup, _PredictReplica

    seen = {}

    def fake_run_spilled(ray, spill, ctx, replica_cls, replica_kwargs, plan):
        assert ray.data.DataContext.get_current().execution_options.preserve_order   # rows in post order
        R._CTX_CACHE.clear()
        seen["spill"] = spill.path
        ctx = dict(ctx, spill=str(spill.path), spill_offsets=spill.offsets)
        rep = replica_cls(**replica_kwargs)
        out = []
        for b in range(spill.n_batches):
            row = R._prepare_row({"id": b}, ctx)
            batch = {k: np.asarray([row[k]], dtype=object) for k in ("keys", "payload", "error")}
            res = rep(dict(batch, b=np.asarray([b])))
            out.append({k: v[0] for k, v in res.items()})
        yield from reversed(out)                            # the last batch first

    monkeypatch.setattr(R, "run_spilled", fake_run_spilled)
    pp = PostPredictor.load(raw_run["run"], batch_size=7)
    local = pp.predict_manifest(dirty["labelled"], tmp_path / "local.csv")
    root, prefix, salt = _cache_setup(pp, tmp_path / "ray.csv", None)
    kw = dict(run_dir=str(raw_run["run"]), load_kwargs={"batch_size": 7, "device": "cpu"}, threads=1,
              fingerprint=pp.backbone.fingerprint(), cache_root=str(root), cache_salt=salt)
    root.mkdir(parents=True)
    from types import SimpleNamespace

    opts = SimpleNamespace(preserve_order=False)       # Ray Data's DataContext, as far as the driver uses it
    fake_ray = SimpleNamespace(data=SimpleNamespace(DataContext=SimpleNamespace(
        get_current=lambda: SimpleNamespace(execution_options=opts))))
    for rerun in (False, True):
        enc = RayBatchEncoder(fake_ray, pp, {}, kw, root, prefix, salt)
        s = pp.predict_manifest(dirty["labelled"], tmp_path / "ray.csv", encoder=enc)
        assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
        assert (tmp_path / "ray.rejects.jsonl").read_bytes() == (tmp_path / "local.rejects.jsonl").read_bytes()
        assert {k: s[k] for k in ("posts", "rejects", "text_missing")} == {k: local[k] for k in
                                                                          ("posts", "rejects", "text_missing")}
        assert enc.info["cached" if rerun else "encoded"] == local["posts"]
        assert enc.info["encoded" if rerun else "cached"] == 0
        assert not seen["spill"].exists()                  # the spill file is removed after the run
        assert opts.preserve_order is False                # the caller's setting is back
    assert issubclass(_PredictReplica, R.BatchReplica) and pickle.dumps(kw)
