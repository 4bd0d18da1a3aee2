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
