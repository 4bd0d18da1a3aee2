"""Selecting presets (train/select.py): the default `auto` trains its candidates on one split, keeps the
one with the best validation accuracy, and says what it chose and why (run.json, the model card)."""

import json

import numpy as np
import pytest

from sgmft.cli import main
from sgmft.config import DEFAULT_PRESET, load_preset
from sgmft.eval.run import evaluate
from sgmft.features import FeatureStore
from sgmft.predict import Predictor
from sgmft.train import train

from conftest import load_benchmark, make_store


def run_init(run_dir):
    return json.loads((run_dir / "run.json").read_text())["init"]


def _fast_auto():
    p = load_preset("auto")
    p.train.progress = False
    return p


AUTO = ["trust", "trust_lda", "trust_mda", "lda", "lda_product", "trust_lda+lda", "trust_lda+lda_product", "trust+trust_mda"]


def test_auto_is_the_default_and_lists_plain_candidates_and_an_ensemble_of_two():
    p = load_preset(DEFAULT_PRESET)
    assert DEFAULT_PRESET == "auto" and p.candidates == AUTO
    assert all(not load_preset(c).candidates for c in p.candidates if "+" not in c)
    assert "model" not in p.to_dict() and p.to_dict()["candidates"] == AUTO


@pytest.mark.parametrize("bad", ["[trust, lda+trust]", "[trust, lda, lda+lda]", "[trust, lda, trust+]",
                                 "[trust, lda, trust+lda, trust+lda+trust]"])
def test_an_ensemble_candidate_joins_different_candidates_listed_before_it(tmp_path, bad):
    f = tmp_path / "sel.yaml"
    f.write_text(f"candidates: {bad}\n")
    with pytest.raises(ValueError, match="must join two or more different plain candidates listed before it"):
        load_preset(f)


def test_auto_chooses_on_validation_and_says_so(tmp_path, monkeypatch):
    import sgmft.train.select as sel

    store = make_store(tmp_path / "s", n=240, dim=16, k=4)
    fast = {t: ["epochs=2", "min_steps=0", "batch_size=32"] for t in ("trust", "trust_lda", "trust_mda")}
    real = sel._candidate_preset

    def quick(name, shared, base=None):           # the same candidates, trained briefly
        from sgmft.config import apply_overrides

        p = real(name, shared, base)
        p.train = apply_overrides(p.train, fast.get(name, []))
        return p

    monkeypatch.setattr(sel, "_candidate_preset", quick)
    monkeypatch.setattr(sel, "CV_BELOW_VAL_POSTS", 0)    # the validation split chooses (19 posts here)
    res = train(store, tmp_path / "r", _fast_auto())
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    s = run["selection"]
    assert s["split"] == "validation" and "cross_validation" not in s and not (tmp_path / "r" / "cv").exists()
    vals = {n: c["val_acc"] for n, c in s["candidates"].items() if "skipped" not in c}
    best = max(vals.values())
    kept = "trust"                                 # the one-standard-error rule, in the candidates' order
    for duel in s["comparisons"]:
        assert duel["against"] == kept and duel["replaces"] == (duel["gain"] > duel["se"])
        kept = duel["candidate"] if duel["replaces"] else kept
    trained = [c for c in AUTO if "trust_mda" not in c]   # one look here (below): trust_mda would be trust_lda again
    assert s["candidates"]["trust_mda"]["skipped"] == "the same model as trust_lda here"
    assert s["candidates"]["trust+trust_mda"] == {"skipped": "an ensemble with trust_mda, which is not trained here"}
    assert s["candidates"]["trust_mda"]["sized"]["looks"] == 1 and not (tmp_path / "r" / "candidates" / "trust_mda").exists()
    assert [d["candidate"] for d in s["comparisons"]] == trained[1:] and s["chosen"] == kept
    assert run["chosen_preset"] == s["chosen"] and res.best_val_acc == pytest.approx(vals[kept])
    assert "standard error" in s["rule"]
    cands = {c["name"]: c.get("model") for c in run["fingerprint_inputs"]["model"]["candidates"]}
    assert {"name": "trust_lda+lda", "ensemble": ["trust_lda", "lda"], "pool": "log_mean"} in run["fingerprint_inputs"]["model"]["candidates"]
    assert "fusion" not in cands["trust"] and cands["trust"]["extra"]["looks"] == 1   # resolved views (issue 19)
    # ~43 training posts per place: the TrustMix candidate was given one look per place, and says so
    assert s["candidates"]["trust"]["sized"]["looks"] == 1 and "per place" in s["candidates"]["trust"]["sized"]["reason"]
    chosen_dir = tmp_path / "r" / "candidates" / s["chosen"] / "model"
    assert (tmp_path / "r" / "model" / "model.safetensors").read_bytes() == \
        (chosen_dir / "model.safetensors").read_bytes()
    assert run_init(tmp_path / "r" / "candidates" / "trust_lda")["text"]["looks"] == 1   # eq T6 start, recorded
    for c in trained:                             # one split for every candidate
        assert np.array_equal(np.load(tmp_path / "r" / "candidates" / c / "split.npy"),
                              np.load(tmp_path / "r" / "split.npy"))
    card = (tmp_path / "r" / "model" / "README.md").read_text()
    assert f"`{s['chosen']}`" in card and "validation split" in card
    assert "* not trained: `trust_mda`, the same model as trust_lda here (about" in card
    ens = tmp_path / "r" / "candidates" / "trust_lda+lda"          # eq E1, assembled from the two runs
    cfg = json.loads((ens / "model" / "config.json").read_text())
    assert cfg["model"]["arch"] == "ensemble" and cfg["model"]["extra"]["names"] == ["trust_lda", "lda"]
    assert s["candidates"]["trust_lda+lda"]["ensemble_of"] == ["trust_lda", "lda"]
    x = np.load(store / "text.npy"), np.load(store / "image.npy")
    probs = {c: Predictor.load(tmp_path / "r" / "candidates" / c).predict_features(*x).probs
             for c in ("trust_lda", "lda", "trust_lda+lda")}
    pooled = np.log(probs["trust_lda"]) + np.log(probs["lda"])      # eq E1' on the calibrated members; the
    top2 = np.sort(pooled, 1)[:, -2:]                               # ensemble's own calibration keeps the argmax
    clear = top2[:, 1] - top2[:, 0] > 1e-4                          # not a float tie
    assert clear.mean() > 0.9
    assert np.array_equal(probs["trust_lda+lda"].argmax(1)[clear], pooled.argmax(1)[clear])
    assert "members (the logarithmic pool of their calibrated probabilities, eq E1'" in \
        (ens / "model" / "README.md").read_text()
    m = evaluate(tmp_path / "r", store, tmp_path / "ev", tsne_max_points=20)
    assert m["num_samples"] == 48 and m["accuracy"] > 0.5
    assert Predictor.load(tmp_path / "r").label_names == ["c0", "c1", "c2", "c3"]
    again = train(store, tmp_path / "r", _fast_auto())
    assert again.status == "complete"


def _quick_candidates(monkeypatch):
    import sgmft.train.select as sel
    from sgmft.config import apply_overrides

    real = sel._candidate_preset

    def quick(name, shared, base=None):           # the same candidates, trained briefly
        p = real(name, shared, base)
        if name != "lda":
            p.train = apply_overrides(p.train, ["epochs=2", "min_steps=0", "batch_size=32"])
        return p

    monkeypatch.setattr(sel, "_candidate_preset", quick)


def test_auto_assembles_trust_with_trust_mda_where_trust_mda_keeps_its_looks(tmp_path, monkeypatch):
    """Where a place has 150 training posts or more, trust_mda keeps its three looks and auto assembles its
    sixth candidate, the logarithmic pool of the calibrated probabilities of TrustMix from a random start and
    from the mixture-discriminant start (eq E1'); it is compared last, by the same rule, and recorded as an
    ensemble."""
    import sgmft.train.select as sel

    store = make_store(tmp_path / "s", n=1200, dim=16, k=4, with_split=True)     # 720 train, 180 per place
    _quick_candidates(monkeypatch)
    monkeypatch.setattr(sel, "CV_BELOW_VAL_POSTS", 0)    # the validation split chooses (240 posts here)
    train(store, tmp_path / "r", _fast_auto())
    s = json.loads((tmp_path / "r" / "run.json").read_text())["selection"]
    assert all("skipped" not in c for c in s["candidates"].values()) and set(s["candidates"]) == set(AUTO)
    assert [d["candidate"] for d in s["comparisons"]] == AUTO[1:]
    assert s["candidates"]["trust+trust_mda"]["ensemble_of"] == ["trust", "trust_mda"]
    cfg = json.loads((tmp_path / "r" / "candidates" / "trust+trust_mda" / "model" / "config.json").read_text())
    assert cfg["model"]["arch"] == "ensemble" and cfg["model"]["extra"]["names"] == ["trust", "trust_mda"]
    assert cfg["model"]["extra"]["pool"] == "log_mean"                               # eq E1', not the mean
    assert run_init(tmp_path / "r" / "candidates" / "trust_mda")["text"]["looks"] == 3


@pytest.mark.parametrize("mode", ["stratified", "user"])
def test_cv_folds_cut_training_and_validation_posts_never_test_posts(mode):
    from sgmft.train.select import cv_folds

    n = 300
    labels = np.arange(n) % 3
    labels[::50] = -1                                     # unlabelled: in no fold
    users = np.array([f"u{i % 30}" for i in range(n)])
    split = np.array(["train", "train", "val", "test", "train"] * (n // 5))
    folds = cv_folds(split, labels, users, mode, seed=0, k=5)
    pool = np.flatnonzero(np.isin(split, ["train", "val"]) & (labels >= 0))
    assert len(folds) == 5 and np.array_equal(np.sort(np.concatenate(folds)), pool)   # disjoint, all of them
    for f in folds:
        assert np.bincount(labels[f], minlength=3).min() > 0                        # every place in every fold
    if mode == "user":
        assert all(set(users[a]).isdisjoint(users[b]) for i, a in enumerate(folds) for b in folds[i + 1:])


@pytest.mark.parametrize("forced", [None, "trust_lda+lda", "lda"])
def test_a_small_validation_split_chooses_by_cross_validation(tmp_path, monkeypatch, forced):
    import sgmft.train.select as sel

    _quick_candidates(monkeypatch)
    if forced:                                             # the ensemble's committee: fold models + an LDA refit
        monkeypatch.setattr(sel, "one_se_choice", lambda correct, order: (forced, []))
    store = make_store(tmp_path / "s", n=240, dim=16, k=4)
    train(store, tmp_path / "r", _fast_auto())
    r = tmp_path / "r"
    s = json.loads((r / "run.json").read_text())["selection"]
    cv = s["cross_validation"]
    assert s["split"] == "cross-validation" and cv["folds"] == sel.CV_FOLDS == 5
    main_split = np.load(r / "split.npy")
    pooled = np.flatnonzero(main_split == "train")          # validation posts trained the committee: none left
    assert set(main_split) <= {"train", "test"} and cv["posts"] == len(pooled) == 192          # not 19
    assert set(cv["accuracy"]) == set(AUTO) - {"trust_mda", "trust+trust_mda"}   # one look here: trust_lda again
    if not forced:
        kept = "trust"                                     # the rule, replayed on the recorded comparisons
        for duel in s["comparisons"]:
            assert duel["against"] == kept and duel["replaces"] == (duel["gain"] > duel["se"])
            kept = duel["candidate"] if duel["replaces"] else kept
        assert s["chosen"] == kept
        assert duel["se"] < 0.1                            # ~190 paired posts, not 19
    held = []
    for i in range(5):                                     # each fold: trained without its own posts, never
        for c in ("trust", "trust_lda", "lda"):            # on the test split
            fold = np.load(r / "cv" / f"fold-{i}" / c / "split.npy")
            assert not np.isin(fold[main_split == "test"], ["train", "val"]).any()
            assert (r / "cv" / f"fold-{i}" / c / "model" / "model.safetensors").is_file()
        held.append(np.flatnonzero(fold == "test"))
    assert np.array_equal(np.sort(np.concatenate(held)), pooled)
    # the chosen candidate again on a second partition (CV_REPEATS): only it, every pooled post held out once,
    # other folds than the first partition's; an LDA alone keeps no fold models and needs none
    second = r / "cv" / "repeat-1"
    assert second.is_dir() == (s["chosen"] != "lda") and s["final"].get("partitions") == (1 if forced == "lda" else 2)
    if s["chosen"] != "lda":
        assert {d.name for d in (second / "fold-0").iterdir()} == set(s["chosen"].split("+"))
        again = [np.flatnonzero(np.load(second / f"fold-{i}" / s["chosen"].split("+")[0] / "split.npy") == "test")
                 for i in range(5)]
        assert np.array_equal(np.sort(np.concatenate(again)), pooled)
        assert not any(np.array_equal(a, h) for a in again for h in held)
    card = (r / "model" / "README.md").read_text()
    assert "cross-validated accuracy on 192" in card and ("fold committee" in card) == (forced != "lda")
    assert ("2 partitions of them into folds" in card and "fitted to committees of 1 and 2 fold models" in card
            and "extrapolated to 10 (eq E2)" in card) == (forced != "lda")
    # the kept model is the chosen candidate's committee (eq E1): its ten fold models, or one LDA refitted
    # on all 192 pooled posts; each calibrated on its candidate's 192 out-of-fold predictions, not on 19
    # validation posts; the two halves of an ensemble weigh one half each
    cfg = json.loads((r / "model" / "config.json").read_text())
    assert cfg["model"]["arch"] == ("lda" if forced == "lda" else "ensemble") and s["final"]["of"] == s["chosen"]
    fs = FeatureStore.open(store)
    test = np.flatnonzero(main_split == "test")
    parts = []
    for m in s["chosen"].split("+"):                       # each map: on the out-of-fold logits of both partitions
        assert s["final"]["member_calibration"][m]["num_posts"] == (192 if forced == "lda" else 384)
        dirs = ([r / "cv" / "all" / m] if m == "lda" else
                [r / "cv" / f"fold-{i}" / m for i in range(5)] + [second / f"fold-{i}" / m for i in range(5)])
        own = cfg["calibration"] if forced == "lda" else s["final"]["member_calibration"][m]      # eq E3 / the map
        parts.append([_probs_with(Predictor.from_pretrained(d / "model"), own, fs, test) for d in dirs])
    if "lda" in s["chosen"].split("+"):
        refit = np.load(r / "cv" / "all" / "lda" / "split.npy")
        assert np.array_equal(np.flatnonzero(refit == "train"), pooled) and "val" not in set(refit)
    want = np.mean([np.mean(part, 0) for part in parts], 0)
    assert s["final"]["calibration"]["temperature"] == cfg["calibration"]["temperature"]   # run.json says it
    if forced != "lda":                                    # the committee's own temperature, from the 192 posts:
        outer = cfg["calibration"]                         # eq E2 from committees of 1 and 2 fold models
        assert outer["method"] == "temperature" and outer["num_posts"] == 192 and "cross-fitted" in outer["fitted_on"]
        by = s["final"]["calibration"]["temperature_by_members"]
        assert set(by) == {"1", "2", "10"} and by["10"] == outer["temperature"]
        assert outer["temperature"] == pytest.approx(sel.extrapolated_temperature(by["1"], by["2"], 2, 10))
        want = _softmax(np.log(want) / outer["temperature"])
    if forced == "lda":                                    # LDA alone: its refit on all 192, calibrated out of fold
        assert s["final"]["members"] == ["lda@all"] and cfg["calibration"]["num_posts"] == 192
        assert "`lda` refitted on all 192 training and validation posts" in card
        # eq E3: the out-of-fold map's temperature scaled to the refit's size, from fits on halves and fifths
        by = {int(k): v for k, v in s["final"]["calibration"]["temperature_by_training_posts"].items()}
        n2, n5, n = sorted(by)
        assert n == 192 and 80 <= n2 < n5 < n and (r / "cv" / "halves" / "fold-1" / "lda" / "model").is_dir()
        b5, b2 = 1 / by[n5], 1 / by[n2]
        assert 1 / by[n] == pytest.approx(b5 + (b5 - b2) * (1 / n - 1 / n5) / (1 / n5 - 1 / n2), rel=0.02)
        oof = s["final"]["member_calibration"]["lda"]["temperature"]
        assert cfg["calibration"]["temperature"] == pytest.approx(oof * by[n] / by[n5], rel=1e-6)
        assert "scaled to the refit's size (eq E3)" in card
        assert "one model refitted after cross-validation" in card and "committee of 1" not in card
    if forced == "trust_lda+lda":                          # 10 fold models of trust_lda and one LDA, half and half
        assert cfg["model"]["extra"]["weights"] == [0.05] * 10 + [0.5] and cfg["model"]["extra"]["pool"] == "mean"
        assert cfg["model"]["extra"]["names"] == ([f"trust_lda@fold-{i}" for i in range(5)]
                                                  + [f"trust_lda@repeat-1-fold-{i}" for i in range(5)] + ["lda@all"])
    got = Predictor.from_pretrained(r / "model").predict_features(fs.text[test], fs.image[test]).probs
    np.testing.assert_allclose(got, want, atol=1e-5)
    if forced != "lda":                                    # bench_committee_temperature.py rebuilds this model
        bench = load_benchmark("bench_committee_temperature")
        row = bench.measure(r, str(store))                 # (it asserts the rebuild equals the saved model)
        assert row["two partitions, eq E2"]["temperature"] == pytest.approx(outer["temperature"], abs=1e-4)
        assert row["two partitions, eq E2"]["accuracy"] == pytest.approx(float(np.mean(got.argmax(1) == np.asarray(fs.labels)[test])))
        assert row["one partition, T(1)"]["temperature"] == pytest.approx(by["1"], abs=1e-4)
        assert bench.ece_floor(np.eye(4)[fs.labels[test]]) == 0.0            # sure and right: no sampling noise
    assert train(store, r, _fast_auto()).status == "complete"          # nothing re-runs


def test_eq_e2_the_inverse_temperature_is_linear_in_one_over_the_committee_size():
    from sgmft.train.select import extrapolated_temperature as e2

    b_inf, c = 1.3, -0.45                                   # beta(m) = b_inf + c / m, beta = 1 / T
    t = {m: 1.0 / (b_inf + c / m) for m in (1, 2, 3, 10)}
    assert e2(t[1], t[2], 2, 10) == pytest.approx(t[10])
    assert e2(t[1], t[3], 3, 10) == pytest.approx(t[10])
    assert e2(t[1], t[2], 2, 1) == pytest.approx(t[1]) and e2(t[1], t[2], 2, 2) == pytest.approx(t[2])
    assert e2(0.9, 0.9, 2, 10) == pytest.approx(0.9)        # size changes nothing: nothing to extrapolate
    assert e2(0.5, 5.0, 2, 10) == 5.0                        # beta(10) would be negative: keep the fitted one


def test_cross_fitted_calibration_never_reads_the_label_of_the_post_it_calibrates():
    from sgmft.train.select import cross_fitted_probs

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    z = rng.normal(size=(300, 4)) + 3.0 * np.eye(4)[y]          # informative, over-confident logits
    fold_of = np.arange(300) % 5
    p = cross_fitted_probs(z, y, fold_of, "temperature_uniform").numpy()
    y2 = y.copy()
    y2[fold_of == 0] = rng.integers(0, 4, np.count_nonzero(fold_of == 0))    # fold 0's labels scrambled
    p2 = cross_fitted_probs(z, y2, fold_of, "temperature_uniform").numpy()
    np.testing.assert_array_equal(p[fold_of == 0], p2[fold_of == 0])        # fold 0: fitted on the others
    assert not np.allclose(p[fold_of == 1], p2[fold_of == 1])               # the others read fold 0's labels
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert np.array_equal(p.argmax(1), z.argmax(1))                         # a calibration keeps the argmax


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _probs_with(pred, cal, fs, rows):
    """A fold model's probabilities on ``rows`` under calibration ``cal`` (eq E1's members)."""
    import torch

    from sgmft.models.output import calibrated_probs
    from sgmft.train.calibrate import collect_logits

    z = torch.from_numpy(collect_logits(pred.model, fs, rows)[0])
    return calibrated_probs(z, cal["temperature"], cal["uniform_weight"]).numpy()


def test_one_se_rule_keeps_the_earlier_candidate_unless_a_later_one_clearly_wins():
    from sgmft.train.select import one_se_choice

    g = np.random.default_rng(0)
    a = g.random(400) < 0.80
    slightly = a.copy()                              # 20 posts gained, 16 lost: +1 point, inside one paired
    slightly[np.flatnonzero(~a)[:20]] = True         # standard error (about 1.5 points here)
    slightly[np.flatnonzero(a)[:16]] = False
    clearly = a.copy()
    clearly[np.flatnonzero(~a)[:40]] = True          # +10 points
    chosen, duels = one_se_choice({"a": a, "b": slightly}, ["a", "b"])
    assert chosen == "a" and duels[0]["gain"] == pytest.approx(0.01) and duels[0]["gain"] < duels[0]["se"]
    assert one_se_choice({"a": a, "b": clearly}, ["a", "b"])[0] == "b"
    assert one_se_choice({"b": slightly, "a": a}, ["b", "a"])[0] == "b"          # the order is the preference
    c = clearly.copy()                               # +1 point on b, +11 on a
    c[np.flatnonzero(~clearly)[:20]] = True
    c[np.flatnonzero(clearly)[:16]] = False
    chosen, duels = one_se_choice({"a": a, "b": clearly, "c": c}, ["a", "b", "c"])
    assert chosen == "b" and [d["against"] for d in duels] == ["a", "b"]      # c is compared with b, not a
    assert one_se_choice({"a": a, "b": a.copy()}, ["a", "b"])[0] == "a"      # a tie keeps the first


@pytest.mark.parametrize("per_class, looks", [(100, 1), (400, 3)])
def test_trust_candidates_get_one_look_per_place_on_small_stores(per_class, looks):
    import types

    import sgmft.train.select as sel

    labels = np.repeat(np.arange(5), per_class)
    fs = types.SimpleNamespace(labels=labels, split=np.where(np.arange(labels.size) % 5 == 0, "test", "train"))
    p = sel._candidate_preset("trust", load_preset("auto").train)
    change = sel._fit_to_size(p, fs)
    # per_class 100: 80 non-test posts a place, 72 after validation (< 150); 400: 288 (>= 150)
    assert p.model.extra["looks"] == looks and (change is not None) == (looks == 1)
    lda = sel._candidate_preset("lda", load_preset("auto").train)
    assert sel._fit_to_size(lda, fs) is None


@pytest.mark.parametrize("per_class, trained", [(100, False), (400, True)])
def test_trust_mda_is_trained_only_where_it_keeps_its_looks(per_class, trained):
    """With one look per place (a small store) trust_mda is trust_lda: it is dropped, and why is said."""
    import types

    import sgmft.train.select as sel
    from sgmft.models.registry import resolve_model

    labels = np.repeat(np.arange(5), per_class)
    fs = types.SimpleNamespace(labels=labels, split=np.where(np.arange(labels.size) % 5 == 0, "test", "train"))
    order = list(load_preset("auto").candidates)
    presets, sized = [sel._candidate_preset(c, load_preset("auto").train) for c in order if "+" not in c], {}
    for p in presets:
        if (change := sel._fit_to_size(p, fs)):
            sized[p.name] = change
        p.model = resolve_model(p.model, where=p.name)
    kept, names, skipped = sel._drop_repeats(presets, order, sized)
    assert ("trust_mda" in names) == trained and [p.name for p in kept] == [n for n in names if "+" not in n]
    assert "trust_lda" in names and "trust_lda+lda" in names and ("trust+trust_mda" in names) == trained
    if not trained:                              # and its ensemble with trust cannot be assembled
        assert skipped == {"trust_mda": {"skipped": "the same model as trust_lda here", "sized": sized["trust_mda"]},
                           "trust+trust_mda": {"skipped": "an ensemble with trust_mda, which is not trained here"}}


def test_a_candidate_that_selects_is_refused(tmp_path):
    bad = tmp_path / "sel.yaml"
    bad.write_text("candidates: [auto]\n")
    with pytest.raises(ValueError, match="selects itself"):
        load_preset(bad)


def test_train_flags_reach_the_candidates_and_model_options_are_refused(tmp_path, capsys):
    import sgmft.train.select as sel
    from sgmft.config import TrainConfig

    base = load_preset("auto").train
    shared = TrainConfig(**{**__import__("dataclasses").asdict(base), "epochs": 3, "seed": 7})
    p = sel._candidate_preset("trust", shared, base)
    assert p.train.epochs == 3 and p.train.seed == 7 and p.train.lr == load_preset("trust").train.lr
    store = make_store(tmp_path / "s", n=80, dim=16, k=4)
    assert main(["train", str(store), "--out", str(tmp_path / "r"), "--set", "model.hidden=3"]) == 2
    err = capsys.readouterr().err
    assert "chooses between the presets trust, trust_lda, trust_mda, lda" in err and "--preset trust" in err


def test_fold_models_do_not_repeat_data_warnings_about_their_subset(tmp_path, monkeypatch):
    """A fold's data warnings (a place whose only post is held out, 'did not learn' on a dozen validation posts)
    describe a subset of the store; only the candidates' own runs on the store's split warn, and notes still pass."""
    import warnings

    import sgmft.train.fit as fit_mod
    from sgmft.errors import SgmftWarning, note

    real = fit_mod._check_training_rows

    def spy(fs, tr):
        warnings.warn(f"training rows: {len(tr)}", SgmftWarning)
        note(f"note rows: {len(tr)}")
        return real(fs, tr)

    monkeypatch.setattr(fit_mod, "_check_training_rows", spy)
    _quick_candidates(monkeypatch)
    store = make_store(tmp_path / "s", n=240, dim=16, k=4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(store, tmp_path / "r", _fast_auto())
    rows = {str(w.message) for w in seen if not issubclass(w.category, fit_mod.SgmftNote)
            and str(w.message).startswith("training rows")}
    notes = {str(w.message) for w in seen if str(w.message).startswith("note rows")}
    assert rows == {"training rows: 172"}, rows                     # the store's training split only
    assert len(notes) > 1, notes                                    # the folds' notes still reach the user


def test_eq_e3_scales_a_lone_refits_temperature_to_its_training_size(tmp_path):
    """On overlapping places (the separable test stores fit T = 1 at every size, where any law passes), the
    temperatures fitted on halves and fifths differ and the refit's follows eq E3 from them."""
    from sgmft.features import write_feature_store

    rng = np.random.default_rng(3)
    n, k, dim = 400, 4, 16
    y = np.arange(n) % k
    feats = {m: rng.normal(size=(k, dim))[y] * 0.35 + rng.normal(size=(n, dim)) for m in ("text", "image")}
    store = write_feature_store(tmp_path / "s", ids=[f"p{i}" for i in range(n)], labels=y,
                                label_names=[f"c{i}" for i in range(k)], backbone="test",
                                **{m: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
                                   for m, x in feats.items()})
    sel = tmp_path / "sel.yaml"
    sel.write_text("candidates: [lda, lda_product]\ntrain:\n  progress: false\n")
    train(store, tmp_path / "r", load_preset(sel))
    s = json.loads((tmp_path / "r" / "run.json").read_text())["selection"]
    assert s["split"] == "cross-validation" and s["final"]["members"] == [f"{s['chosen']}@all"]
    by = {int(k): v for k, v in s["final"]["calibration"]["temperature_by_training_posts"].items()}
    n2, n5, n_all = sorted(by)
    assert n_all == 320 and abs(by[n2] - by[n5]) > 0.05                    # the law has something to act on
    b5, b2 = 1 / by[n5], 1 / by[n2]
    assert 1 / by[n_all] == pytest.approx(b5 + (b5 - b2) * (1 / n_all - 1 / n5) / (1 / n5 - 1 / n2), rel=1e-3)
    oof = s["final"]["member_calibration"][s["chosen"]]["temperature"]
    cfg = json.loads((tmp_path / "r" / "model" / "config.json").read_text())
    assert cfg["calibration"]["temperature"] == pytest.approx(oof * by[n_all] / by[n5], rel=1e-6)
