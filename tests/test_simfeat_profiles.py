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
