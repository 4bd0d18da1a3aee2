"""benchmarks/family_c.py: the oracle on the stored (unit-length) features, eq by eq."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def fc():
    return load_benchmark("family_c")


@pytest.mark.parametrize("D", [16, 128, 512])
def test_log_radial_is_the_integral(fc, D):
    """log of the integral over t > 0 of t^(D-1) exp(-(t - beta)^2 / 2), against scipy's quadrature."""
    from scipy.integrate import quad

    betas = np.array([-3.0, 0.0, 0.7, 5.0, 40.0])
    got = fc._log_radial(betas, D)
    for b, g in zip(betas, got):
        peak = (b + np.sqrt(b * b + 4 * (D - 1))) / 2
        logf = lambda t: (D - 1) * np.log(t) - 0.5 * (t - b) ** 2     # noqa: E731
        val, _ = quad(lambda t: np.exp(logf(t) - logf(peak)), 0, peak + 60, points=[peak], limit=200)
        assert g == pytest.approx(np.log(val) + logf(peak), abs=1e-6)


def test_the_stored_feature_oracle_reads_only_the_direction(fc):
    """Scaling a post's vector changes the latent oracle's evidence but not the stored-feature one
    (the store keeps x / |x|), and on the places' own posts the latter still points at the place."""
    rw = np.random.default_rng(0)
    W = fc._world(rw, 64, 1.0, 1.0, 1.0, np.zeros(64), rw.standard_normal(64), 1)
    r = np.random.default_rng(1)
    y = r.integers(0, fc.K, 400)
    x = fc._draw(r, W, y, np.ones(400, bool), 0.5)
    unit = [fc._evidence(W, x * c, 0.5, unit=True)[0] for c in (1.0, 3.0)]
    np.testing.assert_allclose(unit[0], unit[1], rtol=1e-9, atol=1e-6)
    latent = [fc._evidence(W, x * c, 0.5)[0] for c in (1.0, 3.0)]
    assert np.abs(latent[0] - latent[1]).max() > 1.0
    assert (unit[0].argmax(1) == y).mean() > 0.9 and (latent[0].argmax(1) == y).mean() > 0.9


def test_merge_takes_the_default_and_its_retrained_candidates_and_keeps_the_rest(fc):
    """A re-run of ``auto`` retrains its candidates: merge takes both from the new run, keeps the base's
    ``auto`` as ``auto_before`` and the presets the re-run did not train (peers) from the base; a store
    that differs (another oracle) is an error."""
    def row(oracle, **acc):
        return {"variant": "C0", "posts": 600, "oracle": oracle, "presets": {k: {"accuracy": v} for k, v in acc.items()}}

    base = {"rows": [row(0.8, auto=0.5, trust_lda=0.5, qmf=0.3), {**row(0.7, auto=0.1), "posts": 1000}]}
    new = {"rows": [row(0.8, auto=0.6, trust_lda=0.6, trust_mda=0.55)]}
    got = fc.merge([base], [new])["rows"]
    acc = {k: v["accuracy"] for k, v in got[0]["presets"].items()}
    assert acc == {"auto": 0.6, "auto_before": 0.5, "trust_lda": 0.6, "trust_mda": 0.55, "qmf": 0.3}
    assert got[1]["presets"] == {"auto": {"accuracy": 0.1}}
    with pytest.raises(SystemExit, match="stores differ"):
        fc.merge([base], [{"rows": [row(0.9, auto=0.6)]}])


def test_student_t_evidence_is_the_multivariate_t_density(fc):
    """Family D's heavy-tailed noise: the evidence of each one-look place equals scipy's multivariate t
    log density up to a term shared by every place (the row's constant)."""
    from scipy.stats import multivariate_t

    rw = np.random.default_rng(3)
    D = 12
    W = fc._world(rw, D, 1.0, 1.0, 1.0, np.zeros(D), rw.standard_normal(D), 1, K=4, tail_df=3)
    W["protos"] = [p[:1] for p in W["protos"]]
    W["w"] = [np.ones(1) for _ in W["protos"]]
    r = np.random.default_rng(4)
    x = fc._draw(r, W, r.integers(0, 4, 50), np.ones(50, bool), 0.5)
    got = fc._evidence(W, x, 0.5)[0]
    cov = (W["R"] * W["sd"] ** 2) @ W["R"].T
    ref = np.stack([multivariate_t(W["off"] + W["protos"][c][0], cov * W["scale"][c] ** 2, df=3).logpdf(x)
                    for c in range(4)], 1)
    np.testing.assert_allclose(got - got[:, :1], ref - ref[:, :1], atol=1e-8)


def test_family_d_knobs_draw_what_they_say(fc):
    """``places`` sets the number of places (names included), ``prior_zipf`` makes place frequencies fall
    with rank, and both oracles (latent, stored features under ``tail_df``) cover every place."""
    d = fc.generate(1500, seed=1, seed_world=2, D=32, places=13, prior_zipf=1.2, tail_df=4)
    freq = np.bincount(d["labels"], minlength=13) / 1500
    assert d["oracle"].shape == (1500, 13) and len(fc._names(13)) == 13 and fc._names(13)[-1] == "place12"
    assert freq[0] > 2 * freq[6] and d["oracle_stored"].shape == (1500, 13)
    assert (d["oracle"].argmax(1) == d["labels"]).mean() > 0.5
    # the true parameters in a Gaussian decision: another posterior, drawn only where the noise is Student-t
    gauss = d["oracle_stored_gaussian_form"]
    assert gauss.shape == (1500, 13) and np.abs(gauss - d["oracle_stored"]).max() > 0.05
    assert "oracle_stored_gaussian_form" not in fc.generate(200, seed=1, seed_world=2, D=32, places=13)


def test_seed_means_averages_each_variant_and_size_over_its_seeds(fc):
    """A variant's own seed and the seeds drawn beside it (``X@s``) form one group; the bar compares the
    default's mean with the best mean of the textbook baselines and peers; single rows print nothing."""
    def row(v, n, auto, lda, pdf):
        return {"variant": v, "posts": n, "oracle": 0.8,
                "presets": {"auto": {"accuracy": auto}, "lda": {"accuracy": lda}, "pdf": {"accuracy": pdf}}}

    res = {"rows": [row("D0", 1000, 0.50, 0.52, 0.40), row("D0@20", 1000, 0.56, 0.50, 0.46),
                    row("D0@30", 1000, 0.53, 0.51, 0.43), row("D1", 1000, 0.3, 0.2, 0.1)]}
    got = fc.seed_means(res)
    line = [ln for ln in got.splitlines() if ln.startswith("| D0 ")][0]
    assert "| 3 |" in line and "53.00 ± 3.00" in line and line.endswith("| +2.00 |")
    assert "| D1 " not in got and fc.seed_means({"rows": res["rows"][3:]}) == ""


@pytest.mark.parametrize("D,nu", [(16, 3.0), (128, 4.0), (512, 4.0), (1024, 3.0)])
def test_log_radial_t_is_the_integral(fc, D, nu):
    """The t-kernel radial integral (the stored-feature oracle of family D) against a brute-force sum over
    two million points of log t from e^-20 to e^25, narrow peaks (large beta) and wide ones included."""
    from scipy.special import logsumexp

    lt = np.linspace(-20, 25, 2_000_001)
    for b, k in [(-3.0, 5.0), (0.0, 0.0), (0.7, 40.0), (5.0, 300.0), (40.0, 10.0), (200.0, 3000.0)]:
        got = fc._log_radial_t(np.array([b]), np.array([k]), D, nu)[0]
        f = D * lt - 0.5 * (nu + D) * np.log1p(((np.exp(lt) - b) ** 2 + k) / nu)
        assert got == pytest.approx(logsumexp(f) + np.log(lt[1] - lt[0]), abs=1e-4)


def test_the_stored_feature_oracle_under_student_t_reads_only_the_direction(fc):
    rw = np.random.default_rng(5)
    W = fc._world(rw, 48, 1.0, 1.0, 1.0, np.zeros(48), rw.standard_normal(48), 1, tail_df=4)
    r = np.random.default_rng(6)
    y = r.integers(0, fc.K, 300)
    x = fc._draw(r, W, y, np.ones(300, bool), 0.5)
    unit = [fc._evidence(W, x * c, 0.5, unit=True)[0] for c in (1.0, 2.5)]
    np.testing.assert_allclose(unit[0], unit[1], rtol=1e-9, atol=1e-6)
    assert (unit[0].argmax(1) == y).mean() > 0.8


def test_plain_table_shows_presets_without_the_default(fc):
    res = {"rows": [{"variant": "D0c", "posts": 17000, "oracle": 0.8, "oracle_stored": 0.8,
                     "presets": {"trust_lda": {"accuracy": 0.72}, "trust_mda": {"accuracy": 0.76}}},
                    {"variant": "D0", "posts": 17000, "oracle": 0.8, "presets": {"trust_lda": {"accuracy": 0.7}}}]}
    lines = fc.plain_table(res).splitlines()
    assert lines[2] == "| D0c | 17,000 | 80.00 | 80.00 | 72.00 | 76.00 | 0.950 |"
    assert lines[3] == "| D0 | 17,000 | 80.00 | - | 70.00 | - | - |"


def test_family_e_knobs_draw_what_they_say_and_leave_c_and_d_unchanged(fc):
    """``shared_nuisance`` makes text and image dependent given the place (their residuals from the place's
    mean correlate, which C0-D3 never do), ``shared_looks`` spreads a place over looks every place shares (its
    posts' spread grows), ``user_offset`` gives each user's posts a common mean; family E has no oracle, and
    C and D variants draw the same posts as before the knobs existed (digests of C0 and D2 at 60 posts, taken
    from the generator before family E)."""
    kw = dict(seed=3, seed_world=4, D=24, label_noise=0.0, p=(0.94, 0.02, 0.02, 0.02))

    def cross_corr(d):      # the largest |correlation| between a text and an image coordinate, within places
        rt, ri = (np.concatenate([d[m][d["labels"] == c] - d[m][d["labels"] == c].mean(0) for c in range(fc.K)])
                  for m in ("text", "image"))
        return np.abs(np.corrcoef(rt.T, ri.T)[:24, 24:]).max()

    plain, nuis = fc.generate(4000, **kw), fc.generate(4000, shared_nuisance=1.5, **kw)
    assert cross_corr(plain) < 0.1 < 0.3 < cross_corr(nuis)
    assert nuis["oracle"] is None and nuis["places"] == fc.K and plain["oracle"] is not None
    looks = fc.generate(4000, shared_looks=8, **kw)
    spread = lambda d: np.mean([d["text"][d["labels"] == c].std(0).sum() for c in range(fc.K)])   # noqa: E731
    assert spread(looks) > 1.05 * spread(plain)
    users = fc.generate(4000, user_offset=1.0, **kw)
    mean_norm = lambda d: np.mean([np.linalg.norm(d["text"][d["users"] == u].mean(0) - d["text"].mean(0))   # noqa: E731
                                   for u in range(100)])
    assert mean_norm(users) > 1.5 * mean_norm(plain)
    for variant, digest in (("C0", 703.966626), ("D2", -2336.330122)):
        d = fc.generate(60, **fc.VARIANTS[variant])
        assert float(d["text"].sum() + 2 * d["image"].sum()) == pytest.approx(digest, abs=1e-5)


def test_the_tables_show_a_store_without_an_oracle(fc):
    row = {"variant": "E0", "posts": 1000, "oracle": None,
           "presets": {"auto": {"accuracy": 0.6, "ece": 0.05, "chosen": "trust_lda"}, "lda": {"accuracy": 0.55},
                       "trust_lda": {"accuracy": 0.58}}}
    line = fc.table({"rows": [row]}).splitlines()[2]
    assert line.startswith("| E0 | 1,000 | - |") and line.endswith("| 0.050 | - | +5.00 | +2.00 |")
