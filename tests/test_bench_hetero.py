"""benchmarks/bench_hetero.py: preset specs with model overrides (``name@key=value,...``)."""

import pytest

from conftest import load_benchmark


def _load():
    return load_benchmark("bench_hetero")


def test_a_spec_applies_its_model_overrides_and_leaves_the_rest_of_the_preset():
    from sgmft.config import load_preset
    from sgmft.models.registry import resolve_model

    bench = _load()
    plain, noisy = bench._load_spec("trust_mda"), bench._load_spec("trust_mda@label_noise=0.05,looks=2")
    assert plain.model == load_preset("trust_mda").model
    assert noisy.model.extra["label_noise"] == 0.05 and noisy.model.extra["looks"] == 2
    assert plain.model.extra.get("label_noise", 0.0) == 0.0 and plain.model.extra["looks"] == 3
    resolved = resolve_model(plain.model).extra                       # the overrides come back resolved
    assert {k: v for k, v in noisy.model.extra.items() if k not in ("label_noise", "looks")} == \
        {k: v for k, v in resolved.items() if k not in ("label_noise", "looks")}
    assert noisy.train == plain.train


def test_a_spec_with_an_option_the_model_does_not_have_is_refused():
    from sgmft.errors import ConfigError

    with pytest.raises(ConfigError, match="no_such_option"):
        _load()._load_spec("trust_mda@no_such_option=1")
