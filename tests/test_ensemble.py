"""The ensemble that `auto` assembles (models/ensemble.py, eqs E1, E1'): the mean, or the logarithmic
pool, of its members' calibrated probabilities, stored, loaded, predicted and exported like any checkpoint."""

import dataclasses

import numpy as np
import pytest
import torch

from sgmft.checkpoint import calibrated_probs, load_checkpoint, save_checkpoint
from sgmft.config import ConfigError, load_preset
from sgmft.models import build_model
from sgmft.models.ensemble import ensemble_config

D, K = 16, 4
CALS = [{"temperature": 1.7, "uniform_weight": 0.1}, {"temperature": 0.6, "uniform_weight": 0.0}]


def _members():
    torch.manual_seed(0)
    cfgs = [dataclasses.replace(load_preset(a).model, dim=D, num_classes=K) for a in ("trust_lda", "lda")]
    models = [build_model(c).eval() for c in cfgs]
    with torch.no_grad():                  # distinct, non-trivial weights (a fitted LDA is a linear layer)
        models[1].linear.weight.normal_(0, 2.0)
    return cfgs, models


def _ensemble(cfgs, models, pool="mean"):
    cfg = ensemble_config(D, K, ["trust_lda", "lda"], cfgs, CALS, pool=pool)
    ens = build_model(cfg)
    for dst, src in zip(ens.members, models):
        dst.load_state_dict(src.state_dict())
    return cfg, ens.eval()


def _inputs(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D, generator=g), torch.randn(n, D, generator=g),
            torch.tensor([True] * (n - 1) + [False]), torch.tensor([False] + [True] * (n - 1)))


def test_eq_e1_the_mean_of_the_members_calibrated_probabilities():
    cfgs, models = _members()
    _, ens = _ensemble(cfgs, models)
    x = _inputs()
    with torch.no_grad():
        want = sum(calibrated_probs(m(*x).logits, c["temperature"], c["uniform_weight"])
                   for m, c in zip(models, CALS)) / 2
        got = ens(*x).logits.softmax(-1)
        raw = sum(m(*x).logits.softmax(-1) for m in models) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, raw, atol=1e-3)          # the members' calibrations are applied


@pytest.mark.parametrize("weights", [None, [0.3, 0.7]])
def test_eq_e1_prime_the_normalised_weighted_geometric_mean(weights):
    cfgs, models = _members()
    cfg = ensemble_config(D, K, ["trust_lda", "lda"], cfgs, CALS, weights, pool="log_mean")
    ens = build_model(cfg).eval()
    for dst, src in zip(ens.members, models):
        dst.load_state_dict(src.state_dict())
    x = _inputs()
    w = weights or [0.5, 0.5]
    with torch.no_grad():
        p = [calibrated_probs(m(*x).logits, c["temperature"], c["uniform_weight"]) for m, c in zip(models, CALS)]
        geo = p[0] ** w[0] * p[1] ** w[1]                   # eq E1', written out
        got = ens(*x).logits
        mean = w[0] * p[0] + w[1] * p[1]                    # eq E1
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(9))          # log-probabilities: normalised
    torch.testing.assert_close(got.softmax(-1), geo / geo.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.softmax(-1), mean, atol=1e-3)


def test_a_config_without_pool_reads_the_mean_as_it_was_written():
    cfgs, models = _members()
    cfg, ens = _ensemble(cfgs, models)
    old = dataclasses.replace(cfg, extra={k: v for k, v in cfg.extra.items() if k != "pool"})
    assert cfg.extra["pool"] == "mean" and "pool" not in old.extra
    again = build_model(old).eval()
    again.load_state_dict(ens.state_dict())
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(*x).logits, ens(*x).logits)
    assert again.pool == "mean"


def test_an_ensemble_round_trips_through_a_checkpoint_and_predicts(tmp_path):
    from sgmft.predict import Predictor

    cfgs, models = _members()
    cfg, ens = _ensemble(cfgs, models)
    ck = save_checkpoint(tmp_path / "m", ens, cfg, ["a", "b", "c", "d"],
                         {"backbone": "test", "dim": D, "normalization": "l2"})
    loaded, info = load_checkpoint(ck)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x).logits, ens(*x).logits)
    assert info["model_cfg"].extra["names"] == ["trust_lda", "lda"]
    out = Predictor.load(ck).predict_features(x[0].numpy(), x[1].numpy(), x[2].numpy(), x[3].numpy(), explain=True)
    np.testing.assert_allclose(out.probs, ens(*x).logits.softmax(-1).detach().numpy(), atol=1e-5)
    assert len(out.explanations) == 9           # the account by masking, as for every non-TrustMix model


@pytest.mark.parametrize("extra, match", [({}, "needs two or more members"),
                                          ({"names": ["a"], "members": [{}], "calibrations": [{}]},
                                           "needs two or more members")])
def test_an_ensemble_without_members_is_a_clear_config_error(extra, match):
    from sgmft.config import ModelConfig

    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig(arch="ensemble", dim=D, num_classes=K, extra=extra))


def test_a_member_of_another_width_is_refused():
    cfgs, _ = _members()
    cfgs[1] = dataclasses.replace(cfgs[1], dim=D + 1)
    with pytest.raises(ConfigError, match="member 1 has dim 17"):
        build_model(ensemble_config(D, K, ["trust_lda", "lda"], cfgs, CALS))
