"""SimFeat profiles: the API, the ``default`` profile pinned to the pre-profile generator,
and the ``hetero`` profile's oracle properties (docs/simfeat.md, "Profiles")."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sgmft.data.simfeat import SimFeatConfig, generate_simfeat

SMALL = dict(num_posts=2000, dim=64, test_size=400, num_users=20, mc_samples=20_000)


def _int_digest(d) -> str:
    """sha256 of every integer/str array (exact on any platform: they come from the RNG only)."""
    m = hashlib.sha256()
    for a in (d.labels.astype("<i8"), d.clean_labels.astype("<i8"), np.char.encode(d.split.astype(str)),
              np.char.encode(d.regime.astype(str)), np.char.encode(d.users.astype(str))):
        m.update(np.ascontiguousarray(a).tobytes())
    return m.hexdigest()[:16]


# Values recorded from the generator *before* profiles existed (commit bd6a425).
PINNED = {
    "small": dict(
        cfg=SMALL, digest="e6c342e3cc0d7ffe",
        text=[[0.12974615395069122, 0.03434209153056145, -0.0937766432762146],
              [0.2204866111278534, 0.06314477324485779, -0.24520693719387054],
              [0.14810389280319214, 0.0322880744934082, 0.0528036467730999]],
        image5=[0.17112120985984802, -0.021019617095589638, 0.07043598592281342],
        post9=[4.7708341298857704e-05, 5.566518666455522e-05, 0.9996551275253296, 5.5250660807359964e-05,
               5.0495786126703024e-05, 3.470364026725292e-05, 6.049385410733521e-05, 4.054778037243523e-05],
        test_accuracy=0.87, regimes={"both": 221, "text": 87, "image": 72, "neither": 20},
        expected=0.8857318875636869),
    "paper_scale": dict(
        cfg=dict(mc_samples=20_000), digest="9d7d10c9f066dec2",
        text=[[-0.010013032704591751, 0.0011285468935966492, -0.005162863060832024],
              [0.0007180081447586417, -0.0032336402218788862, -0.00870515126734972],
              [-0.020873140543699265, 0.036978814750909805, 0.05450112745165825]],
        image5=[-0.06407734006643295, -0.03875294700264931, 0.004182295873761177],
        post9=[6.448086787713692e-05, 7.542824459960684e-05, 0.9995259642601013, 6.698416837025434e-05,
               7.805592758813873e-05, 6.59078941680491e-05, 6.391680653905496e-05, 5.9232028434053063e-05],
        test_accuracy=0.8802941176470588,
        regimes={"both": 1825, "text": 681, "image": 713, "neither": 181},
        expected=0.8855169288362745),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_default_generator_is_unchanged(name):
    pin = PINNED[name]
    d = generate_simfeat(SimFeatConfig(**pin["cfg"]))
    assert _int_digest(d) == pin["digest"]
    np.testing.assert_allclose(d.text[[0, 7, 123], :3], pin["text"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(d.image[5, :3], pin["image5"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(d.oracle_posterior[9], pin["post9"], rtol=1e-4, atol=1e-7)
    assert d.oracle["test_accuracy"] == pin["test_accuracy"]
    assert d.oracle["test_regime_counts"] == pin["regimes"]
    assert d.oracle["expected_accuracy"] == pytest.approx(pin["expected"], abs=1e-9)


# --------------------------------------------------------------------------- profile API
from dataclasses import asdict, replace  # noqa: E402
import itertools  # noqa: E402

from sgmft.data.simfeat import (FINE_REGIMES, PROFILES, REGIMES, _draw_posts, _Model,  # noqa: E402
                                oracle_posteriors, parse_overrides, profile_config, write_simfeat)

HETERO_SMALL = dict(num_posts=4000, dim=128, content_dim=48, test_size=1000, num_users=30, mc_samples=20_000)


@pytest.fixture(scope="module")
def hetero():
    return generate_simfeat(profile_config("hetero", **HETERO_SMALL))


# Recorded from the generator before the issue-17 phenomena existed (commit 0d7cf0b).
HETERO_PIN = dict(
    digest="d44d547cabf2d5cf",
    text=[[-0.02572500891983509, 0.051216721534729004, 0.000984091660939157],
          [0.10449312627315521, 0.07154766470193863, 0.24387051165103912],
          [-0.13316811621189117, -0.0886571928858757, 0.18686196208000183]],
    image5=[-0.08028057962656021, 0.0646325945854187, 0.02488376945257187],
    post9=[0.0008908078307285905, 0.0005546093452721834, 0.9953228831291199, 0.00042495669913478196,
           0.0010712468065321445, 0.0004886353272013366, 0.0007432737038470805, 0.0005035712383687496],
    test_accuracy=0.916, expected=0.90410434602339,
    regimes={"both": 444, "text_generic": 218, "text_other_place": 8, "image_generic": 130,
             "image_other_place": 165, "neither": 35})


def test_hetero_generator_is_unchanged(hetero):
    pin = HETERO_PIN
    assert _int_digest(hetero) == pin["digest"]
    np.testing.assert_allclose(hetero.text[[0, 7, 123], :3], pin["text"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(hetero.image[5, :3], pin["image5"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(hetero.oracle_posterior[9], pin["post9"], rtol=1e-4, atol=1e-7)
    assert hetero.oracle["test_accuracy"] == pin["test_accuracy"]
    assert hetero.oracle["test_regime_counts"] == pin["regimes"]
    assert hetero.oracle["expected_accuracy"] == pytest.approx(pin["expected"], abs=1e-9)


def test_default_profile_is_the_plain_config():
    assert PROFILES["default"] == {}
    assert profile_config() == SimFeatConfig()
    assert profile_config("default", seed=3) == SimFeatConfig(seed=3)
    cfg = profile_config("hetero", seed=2)
    assert cfg.profile == "hetero" and cfg.seed == 2 and cfg.fine_regimes
    assert all(getattr(cfg, k) == v for k, v in PROFILES["hetero"].items())


def test_unknown_profile_or_field_is_a_clear_error():
    with pytest.raises(ValueError, match="known profiles: aniso, conflict, default, hetero, looks, wide"):
        profile_config("nope")
    with pytest.raises(ValueError, match="no_such_field"):
        profile_config("hetero", no_such_field=1)
    with pytest.raises(ValueError, match="unknown field"):
        parse_overrides(["bogus=1"])
    with pytest.raises(ValueError, match="true or false"):
        parse_overrides(["fine_regimes=maybe"])
    assert parse_overrides(["fine_regimes=false", "seed=4", "image_noise=0.3"]) == \
        {"fine_regimes": False, "seed": 4, "image_noise": 0.3}
    with pytest.raises(ValueError, match="image_distractor_prob"):
        SimFeatConfig(image_distractor_prob=1.5)


def test_profile_lands_in_the_store_meta(tmp_path):
    from sgmft.features import FeatureStore

    cfg = profile_config("hetero", **{**HETERO_SMALL, "num_posts": 600, "test_size": 100, "mc_samples": 2000})
    fs = FeatureStore.open(write_simfeat(tmp_path / "s", cfg))
    meta = fs.meta["extra"]["simfeat"]
    assert meta["config"]["profile"] == "hetero"
    assert SimFeatConfig(**meta["config"]) == cfg
    assert set(meta["oracle"]["test_regime_counts"]) == set(FINE_REGIMES)


# --------------------------------------------------------------------------- hetero
def test_hetero_regimes_are_fine_and_match_the_components(hetero):
    cfg = hetero.config
    assert set(hetero.regime) <= set(FINE_REGIMES) and cfg.regimes == FINE_REGIMES
    n = len(hetero.regime)
    expect = {"both": cfg.p_both, "neither": cfg.p_neither,
              "image_other_place": cfg.p_text_only * cfg.image_distractor_prob,
              "image_generic": cfg.p_text_only * (1 - cfg.image_distractor_prob),
              "text_other_place": cfg.p_image_only * cfg.text_distractor_prob,
              "text_generic": cfg.p_image_only * (1 - cfg.text_distractor_prob)}
    for r, p in expect.items():
        assert abs(np.mean(hetero.regime == r) - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-9, r
    assert sum(hetero.oracle["test_regime_counts"].values()) == cfg.test_size


def test_other_place_is_never_the_posts_place():
    cfg = profile_config("hetero", **HETERO_SMALL)
    model = _Model(cfg, np.random.default_rng(0))
    _, y, regime, _, _, c_t, c_i = _draw_posts(cfg, model, 20_000, np.random.default_rng(1), components=True)
    K = cfg.num_classes
    image_place = (regime == 1) & (c_i < K)      # the image is uninformative but shows a place
    text_place = (regime == 2) & (c_t < K)
    assert image_place.sum() > 1000 and text_place.sum() > 10
    assert not np.any(c_i[image_place] == y[image_place])
    assert not np.any(c_t[text_place] == y[text_place])


def test_hetero_oracle_beats_each_modality_and_resolves_contradictions(hetero):
    o = hetero.oracle
    assert o["test_accuracy"] > max(o["text_only_test_accuracy"], o["image_only_test_accuracy"]) + 0.12
    by = o["test_accuracy_by_regime"]
    # the image shows another place than the text: the oracle trusts the text
    assert by["image_other_place"] > 0.8
    # a generic modality is discounted: the other one decides
    assert by["text_generic"] > 0.85 and by["image_generic"] > 0.85
    assert abs(o["stored_feature_test_accuracy"] - o["test_accuracy"]) <= 0.01
    # on contradicting posts the image-only posterior is mostly wrong, the joint one mostly right
    mask = hetero.regime == "image_other_place"
    post = hetero.oracle_posterior[mask].argmax(1)
    assert np.mean(post == hetero.clean_labels[mask]) > 0.8


def _brute_force(cfg, model, t, i):
    """p(y | t, i) by enumerating (y, regime, text component, image component), full Gaussians,
    with each modality's own distractor probability and 'another place' excluding y."""
    K, G = cfg.num_classes, cfg.num_generic
    comps = range(K + G)
    p_reg = dict(zip(REGIMES, (cfg.p_both, cfg.p_text_only, cfg.p_image_only, cfg.p_neither)))
    k_other = K - 1 if cfg.distractor_excludes_label else K

    def w_un(c, y, q):
        if c < K:
            return 0.0 if (cfg.distractor_excludes_label and c == y) else q / k_other
        return (1 - q) / G

    def logpdf(x, mean, sd):
        return -0.5 * np.sum((x - mean) ** 2) / sd ** 2 - x.size * np.log(sd * np.sqrt(2 * np.pi))

    out = np.zeros(K)
    for y in range(K):
        total = 0.0
        for r, pr in p_reg.items():
            t_inf, i_inf = r in ("both", "text"), r in ("both", "image")
            for ct, ci in itertools.product(comps, comps):
                wt = float(ct == y) if t_inf else w_un(ct, y, cfg.distractor_prob("text"))
                wi = float(ci == y) if i_inf else w_un(ci, y, cfg.distractor_prob("image"))
                if wt == 0 or wi == 0:
                    continue
                total += pr * wt * wi * np.exp(
                    logpdf(t, cfg.text_signal * model.text_comp[ct], cfg.text_noise)
                    + logpdf(i, cfg.image_signal * model.image_comp[ci], cfg.image_noise) + 40)
        out[y] = model.prior[y] * total
    return out / out.sum()


@pytest.mark.parametrize("excl", [True, False])
def test_hetero_oracle_matches_brute_force(excl):
    cfg = profile_config("hetero", **{**HETERO_SMALL, "content_dim": 6, "num_generic": 3,
                                      "text_noise": 0.5, "image_noise": 0.5,
                                      "distractor_excludes_label": excl})
    model = _Model(cfg, np.random.default_rng(3))
    _, _, _, t, i = _draw_posts(cfg, model, 20, np.random.default_rng(4))
    fast = oracle_posteriors(cfg, model, t, i)["joint"]
    slow = np.array([_brute_force(cfg, model, t[k], i[k]) for k in range(len(t))])
    np.testing.assert_allclose(fast, slow, rtol=1e-8, atol=1e-12)


def test_hetero_oracle_is_calibrated():
    cfg = profile_config("hetero", **{**HETERO_SMALL, "num_posts": 20_000, "test_size": 4000,
                                      "dim": 64, "content_dim": 24})
    d = generate_simfeat(cfg)
    hits = d.oracle_posterior.argmax(1) == d.clean_labels
    assert abs(hits.mean() - d.oracle_posterior.max(1).mean()) < 0.01
    assert abs(np.mean(d.oracle_posterior.argmax(1) == d.labels) - d.oracle["expected_accuracy"]) < 0.012


def test_asdict_round_trip_keeps_profile():
    cfg = profile_config("hetero")
    assert SimFeatConfig(**asdict(cfg)) == cfg and replace(cfg, seed=1).profile == "hetero"
