"""Tests for the SimFeat synthetic benchmark (small configs, a few seconds in total)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest

from sgmft.data.simfeat import (REGIMES, SimFeatConfig, _draw_posts, _Model, generate_simfeat,
                                oracle_posteriors, write_simfeat)
from sgmft.labels import DEFAULT_LABELS

SMALL = SimFeatConfig(num_posts=2000, dim=64, test_size=400, num_users=20, mc_samples=20_000)


@pytest.fixture(scope="module")
def small():
    return generate_simfeat(SMALL)


def test_deterministic_by_seed(small):
    again = generate_simfeat(SMALL)
    for name in ("ids", "users", "text", "image", "labels", "split", "regime", "clean_labels"):
        np.testing.assert_array_equal(getattr(small, name), getattr(again, name))
    assert small.oracle == again.oracle
    other = generate_simfeat(replace(SMALL, seed=1))
    assert not np.array_equal(small.text, other.text)
    assert not np.array_equal(small.labels, other.labels)


def test_shapes_dtypes_and_normalisation(small):
    n, d = SMALL.num_posts, SMALL.dim
    assert small.text.shape == small.image.shape == (n, d)
    assert small.text.dtype == small.image.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(small.text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(small.image, axis=1), 1.0, atol=1e-5)
    assert small.labels.dtype == np.int64 and small.clean_labels.dtype == np.int64
    assert small.labels.min() >= 0 and small.labels.max() < SMALL.num_classes
    for arr in (small.ids, small.users, small.split, small.regime):
        assert arr.shape == (n,) and arr.dtype.kind == "U"
    assert len(set(small.ids)) == n
    assert len(set(small.users)) <= SMALL.num_users
    assert set(small.regime) <= set(REGIMES)
    assert small.label_names == list(DEFAULT_LABELS)
    assert small.oracle_posterior.shape == (n, SMALL.num_classes)
    np.testing.assert_allclose(small.oracle_posterior.sum(1), 1.0, atol=1e-5)
    json.dumps(small.oracle)  # plain JSON-serialisable numbers


def test_split_size_and_stratification(small):
    test = small.split == "test"
    assert set(small.split) == {"train", "test"} and test.sum() == SMALL.test_size
    counts = np.bincount(small.labels, minlength=SMALL.num_classes)
    in_test = np.bincount(small.labels[test], minlength=SMALL.num_classes)
    expected = counts * SMALL.test_size / SMALL.num_posts
    assert np.all(np.abs(in_test - expected) <= 1)


def test_regime_proportions(small):
    probs = dict(zip(REGIMES, (SMALL.p_both, SMALL.p_text_only, SMALL.p_image_only, SMALL.p_neither)))
    n = SMALL.num_posts
    for r, p in probs.items():
        assert abs(np.mean(small.regime == r) - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-9


def test_label_noise_rate():
    cfg = replace(SMALL, label_noise=0.2)
    d = generate_simfeat(cfg)
    flipped = np.mean(d.labels != d.clean_labels)
    expected = cfg.label_noise * (1 - 1 / cfg.num_classes)     # redraws may hit the true class
    assert abs(flipped - expected) < 4 * np.sqrt(expected * (1 - expected) / cfg.num_posts)
    clean = generate_simfeat(replace(SMALL, label_noise=0.0))
    np.testing.assert_array_equal(clean.labels, clean.clean_labels)


def test_oracle_dominates_single_modalities(small):
    o = small.oracle
    assert o["expected_accuracy"] > o["expected_text_only_accuracy"] + 0.05
    assert o["expected_accuracy"] > o["expected_image_only_accuracy"] + 0.05
    assert o["test_accuracy"] >= o["text_only_test_accuracy"]
    assert o["test_accuracy"] >= o["image_only_test_accuracy"]
    assert o["test_accuracy_by_regime"]["both"] > o["test_accuracy_by_regime"]["neither"]
    assert sum(o["test_regime_counts"].values()) == SMALL.test_size


def test_stored_features_reach_the_oracle(small):
    """The plug-in posterior from stored float32 features matches the latent oracle."""
    o = small.oracle
    assert abs(o["stored_feature_test_accuracy"] - o["test_accuracy"]) <= 0.01


def _brute_force_posterior(cfg, model, t, i):
    """Independent posterior: enumerate (y, regime, text component, image component) with
    full Gaussian log-densities, no shortcuts."""
    K, G = cfg.num_classes, cfg.num_generic
    comps = range(K + G)
    p_reg = dict(zip(REGIMES, (cfg.p_both, cfg.p_text_only, cfg.p_image_only, cfg.p_neither)))
    w_un = np.array([cfg.distractor_class_prob / K] * K + [(1 - cfg.distractor_class_prob) / G] * G)

    def logpdf(x, mean, sd):
        return -0.5 * np.sum((x - mean) ** 2) / sd ** 2 - x.size * np.log(sd * np.sqrt(2 * np.pi))

    out = np.zeros(K)
    for y in range(K):
        total = 0.0
        for r, pr in p_reg.items():
            t_inf, i_inf = r in ("both", "text"), r in ("both", "image")
            for ct, ci in itertools.product(comps, comps):
                wt = float(ct == y) if t_inf else w_un[ct]
                wi = float(ci == y) if i_inf else w_un[ci]
                if wt == 0 or wi == 0:
                    continue
                total += pr * wt * wi * np.exp(
                    logpdf(t, cfg.text_signal * model.text_comp[ct], cfg.text_noise)
                    + logpdf(i, cfg.image_signal * model.image_comp[ci], cfg.image_noise) + 60)
        out[y] = model.prior[y] * total
    return out / out.sum()


def test_oracle_matches_brute_force_enumeration():
    cfg = replace(SMALL, content_dim=6, text_noise=0.5, image_noise=0.5, num_generic=3)
    model = _Model(cfg, np.random.default_rng(3))
    _, _, _, t, i = _draw_posts(cfg, model, 25, np.random.default_rng(4))
    fast = oracle_posteriors(cfg, model, t, i)["joint"]
    slow = np.array([_brute_force_posterior(cfg, model, t[k], i[k]) for k in range(len(t))])
    np.testing.assert_allclose(fast, slow, rtol=1e-8, atol=1e-12)


def test_oracle_matches_monte_carlo():
    """Posteriors are calibrated: on fresh draws the hit rate of the argmax equals the mean
    max-posterior, and the reported expectation agrees with the empirical accuracy."""
    cfg = replace(SMALL, num_posts=20_000, test_size=4000, dim=40, label_noise=0.1,
                  text_noise=0.35, image_noise=0.35)
    d = generate_simfeat(cfg)
    hits = d.oracle_posterior.argmax(1) == d.clean_labels
    assert abs(hits.mean() - d.oracle_posterior.max(1).mean()) < 0.01
    noisy_all = np.mean(d.oracle_posterior.argmax(1) == d.labels)
    assert abs(noisy_all - d.oracle["expected_accuracy"]) < 0.012
    assert abs(d.oracle["test_accuracy"] - d.oracle["expected_accuracy"]) < 0.025


def test_uninformative_modality_is_plausible_not_empty(small):
    """Nearest-class-centroid on text works in 'both' posts but not in 'image' posts, whose
    text is still a unit vector carrying (unrelated) content."""
    both = small.regime == "both"
    cent = np.stack([small.text[both & (small.clean_labels == c)].mean(0)
                     for c in range(SMALL.num_classes)])
    pred = (small.text @ cent.T).argmax(1)
    assert np.mean(pred[both] == small.clean_labels[both]) > 0.9
    assert np.mean(pred[small.regime == "image"] == small.clean_labels[small.regime == "image"]) < 0.5


def test_modality_gap_and_pairing(small):
    gap = np.linalg.norm(small.text.mean(0) - small.image.mean(0))
    assert gap > 0.1
    both = np.flatnonzero(small.regime == "both")
    paired = np.sum(small.text[both] * small.image[both], 1).mean()
    shuffled = np.sum(small.text[both] * small.image[np.roll(both, 1)], 1).mean()
    assert paired > shuffled + 0.05


def test_config_validation():
    with pytest.raises(ValueError):
        SimFeatConfig(p_both=0.9)
    with pytest.raises(ValueError):
        SimFeatConfig(test_size=0)
    with pytest.raises(ValueError):
        SimFeatConfig(dim=16, content_dim=16)


def test_write_simfeat_produces_a_valid_store(tmp_path):
    features = pytest.importorskip("sgmft.features", reason="sgmft.features (the store) not available")
    path = write_simfeat(tmp_path / "simfeat", SMALL)
    store = features.FeatureStore.open(path)
    assert len(store) == SMALL.num_posts
    assert store.meta["backbone"] == "simfeat" and store.meta["normalization"] == "l2"
    extra = store.meta["extra"]["simfeat"]
    assert SimFeatConfig(**extra["config"]) == SMALL
    d = generate_simfeat(SMALL)
    assert extra["oracle"]["test_accuracy"] == d.oracle["test_accuracy"]
    assert len(store.indices("test")) == SMALL.test_size
    with pytest.raises(Exception):
        write_simfeat(path, SMALL)               # no silent overwrite
    write_simfeat(path, SMALL, overwrite=True)
