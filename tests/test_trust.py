"""TrustMix (arch/preset ``trust``): equations T1-T5, masks, checkpoints, learning on hetero,
and the default preset choice (docs/design.md, "TrustMix")."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from sgmft.config import DEFAULT_PRESET, ModelConfig, list_presets, load_preset
from sgmft.models import build_model
from sgmft.models.trust import TrustMix


def _cfg(**extra) -> ModelConfig:
    p = load_preset("trust")
    return dataclasses.replace(p.model, dim=32, num_classes=5, extra={**p.model.extra, **extra})


def _x(n=6, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_preset_builds_the_registered_model():
    assert "trust" in list_presets()
    m = build_model(_cfg())
    assert isinstance(m, TrustMix)
    out = m.eval()(_x(), _x(seed=1))
    assert out.logits.shape == (6, 5) and torch.isfinite(out.logits).all()
    assert out.fused.shape == (6, 2 * 5 + 2 + 9)
    post = out.extras["state_posterior"]
    torch.testing.assert_close(post.sum(-1), torch.ones(6))


def test_generative_starts_have_no_gate_and_the_random_start_keeps_it():
    """Item 19 (docs/design.md): trust_lda and trust_mda train a constant state prior (no gate, no
    similarity projections); trust keeps its per-post gate (eq T4)."""
    for name, gated in (("trust", True), ("trust_lda", False), ("trust_mda", False)):
        cfg = dataclasses.replace(load_preset(name).model, dim=32, num_classes=5)
        m = build_model(cfg)
        assert (m.gate is not None) == gated and hasattr(m, "proj_t") == gated, name


def test_unknown_options_are_errors():
    with pytest.raises(ValueError, match="does not know extra"):
        build_model(_cfg(bogus=1))
    with pytest.raises(ValueError, match="states"):
        build_model(_cfg(states="four"))


def test_mixture_equations_against_a_direct_computation():
    """eq T2 with the gate off equals the explicit sum over the 9 joint states of eq T1."""
    torch.manual_seed(0)
    m = build_model(_cfg(gate=False, input_dropout=0.0)).eval()
    with torch.no_grad():
        m.log_prior.copy_(torch.randn(9))
        m.bias.copy_(torch.randn(5))
    t, v = _x(), _x(seed=1)
    out = m(t, v)
    with torch.no_grad():
        lt, gt = m.ev_t(m.text_in(t, None))
        lv, gv = m.ev_v(m.image_in(v, None))
        log_pi = torch.log_softmax(m.table_scale * m.log_prior, 0).view(3, 3)   # eq T3, table_scale
        K = 5

        def a(l, g, s, y):
            if s == 0:
                return l[:, y]
            if s == 1:
                return g.logsumexp(-1)
            others = [c for c in range(K) if c != y]
            return l[:, others].logsumexp(-1) - math.log(K - 1)

        want = torch.stack([
            torch.stack([log_pi[st, sv] + a(lt, gt, st, y) + a(lv, gv, sv, y)
                         for st in range(3) for sv in range(3)], 0).logsumexp(0) + m.bias[y]
            for y in range(K)], -1)
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)


def test_a_certain_generic_state_removes_that_modality():
    """If pi puts all mass on (text generic, image informative), the text cannot move the logits."""
    m = build_model(_cfg(gate=False, states="two", input_dropout=0.0)).eval()
    with torch.no_grad():
        m.log_prior.copy_(torch.tensor([-1e4, -1e4, 0.0, -1e4]))   # (s_t, s_v) = (gen, inf)
    v = _x(seed=2)
    a, b = m(_x(seed=3), v).logits, m(_x(seed=4), v).logits
    torch.testing.assert_close(torch.log_softmax(a, -1), torch.log_softmax(b, -1))


def test_masked_modality_gives_no_evidence():
    m = build_model(_cfg()).eval()
    v = _x(seed=5)
    off = torch.zeros(6, dtype=torch.bool)
    a = m(_x(seed=6), v, text_mask=off).logits
    b = m(_x(seed=7), v, text_mask=off).logits
    torch.testing.assert_close(a, b)
    c = m(_x(seed=6), v, text_mask=~off).logits
    assert not torch.allclose(a, c)
    # both absent: logits are the prior-independent bias only (same for every post)
    both = m(_x(seed=6), v, text_mask=off, image_mask=off).logits
    torch.testing.assert_close(both, both[:1].expand_as(both))


def test_aux_loss_uses_the_unimodal_marginals():
    m = build_model(_cfg()).train()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out = m(_x(), _x(seed=1))
    loss = m.aux_loss_fn(out, y)
    want = 0.5 * (torch.nn.functional.cross_entropy(out.extras["logits_text"], y)
                  + torch.nn.functional.cross_entropy(out.extras["logits_image"], y))
    torch.testing.assert_close(loss, want)
    assert float(build_model(_cfg(aux_weight=0.0)).aux_loss_fn(out, y)) == 0.0


def test_eq_t7_the_likelihood_of_a_label_that_is_wrong_with_probability_epsilon():
    """eq T7: -log[(1 - eps) softmax(z)_y + eps / K] for the fused logits and both marginals (eq T5), the
    training loss uses it, and eps = 0 is the cross-entropy."""
    from sgmft.models.registry import training_loss

    y = torch.tensor([0, 1, 2, 3, 4, 0])
    plain, noisy = build_model(_cfg()).eval(), build_model(_cfg(label_noise=0.1)).eval()
    noisy.load_state_dict(plain.state_dict())
    out = noisy(_x(), _x(seed=1))

    def direct(z):
        p = torch.softmax(z.double(), -1)[torch.arange(6), y]
        return -torch.log(0.9 * p + 0.1 / 5).mean().float()

    torch.testing.assert_close(noisy.loss_fn(out, y), direct(out.logits))
    torch.testing.assert_close(noisy.aux_loss_fn(out, y),
                               0.5 * (direct(out.extras["logits_text"]) + direct(out.extras["logits_image"])))
    torch.testing.assert_close(training_loss(noisy, out, y),
                               direct(out.logits) + noisy.aux_loss_fn(out, y))
    torch.testing.assert_close(plain.loss_fn(out, y), torch.nn.functional.cross_entropy(out.logits, y))


def test_eq_t7_bounds_what_a_mislabelled_post_can_pull():
    """A post whose label the model finds impossible costs at most -log(eps / K) under eq T7, and its
    gradient vanishes, where the cross-entropy keeps pulling: a mislabelled post need not be explained as
    a contradiction (docs/design.md, item 17)."""
    z = torch.tensor([[12.0, 0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([3])
    noisy = build_model(_cfg(label_noise=0.05))
    loss = noisy.nll(z, y)
    assert float(loss) <= -math.log(0.05 / 5) + 1e-4
    (g,) = torch.autograd.grad(loss, z)
    (g_ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y), z)
    assert float(g.abs().max()) < 1e-3 < float(g_ce.abs().max())


def test_default_preset_is_a_known_preset_and_used_by_train_cli(monkeypatch, tmp_path):
    assert DEFAULT_PRESET in list_presets()
    import sgmft.cli as cli

    seen = {}

    def fake_train(store, out, p, **kw):
        seen["preset"] = p.name
        raise SystemExit(0)

    monkeypatch.setattr("sgmft.train.train", fake_train)
    with pytest.raises(SystemExit):
        cli.main(["train", str(tmp_path / "store"), "--out", str(tmp_path / "run")])
    assert seen["preset"] == DEFAULT_PRESET


@pytest.fixture(scope="module")
def hetero_store(tmp_path_factory):
    from sgmft.data.simfeat import generate_simfeat, profile_config, write_simfeat

    cfg = profile_config("hetero", num_posts=3000, test_size=600, dim=64, content_dim=16,
                         num_users=30, mc_samples=5000)
    path = write_simfeat(tmp_path_factory.mktemp("hetero") / "store", cfg)
    return path, generate_simfeat(cfg)


def test_trains_learns_and_round_trips_on_a_small_hetero_store(hetero_store, tmp_path):
    from sgmft.checkpoint import load_checkpoint
    from sgmft.predict import Predictor
    from sgmft.train import train

    path, data = hetero_store
    p = load_preset("trust")
    p.train = dataclasses.replace(p.train, epochs=6, progress=False)
    res = train(path, tmp_path / "run", p)
    pred = Predictor.load(res.checkpoint)
    test = np.flatnonzero(data.split == "test")
    probs = pred.predict_features(data.text[test], data.image[test]).probs
    acc = float(np.mean(probs.argmax(1) == data.labels[test]))
    oracle = data.oracle["test_accuracy"]
    assert acc > 0.9 * oracle, (acc, oracle)
    # it discounts a generic text: far above chance where only the image shows the place
    gen = data.regime[test] == "text_generic"
    assert np.mean(probs[gen].argmax(1) == data.labels[test][gen]) > 0.7
    # checkpoint round trip: same logits from the reloaded model
    model, info = load_checkpoint(res.checkpoint)
    assert info["model_cfg"].arch == "trust"
    x = torch.as_tensor(data.text[test[:50]]), torch.as_tensor(data.image[test[:50]])
    from sgmft.checkpoint import calibrated_probs      # predict applies the checkpoint's calibration (issue 18)

    cal = info["calibration"]
    with torch.no_grad():
        again = calibrated_probs(model(*x).logits, cal["temperature"], cal["uniform_weight"]).numpy()
    np.testing.assert_allclose(again, probs[:50], rtol=1e-5, atol=1e-6)


def test_looks_and_learnt_conflict_table_against_a_direct_computation():
    """eq T0 (a place's evidence is a logsumexp over its looks) and eq T1' (the other place follows
    Q_m(c | y)); with Q uniform, eq T1' is eq T1."""
    torch.manual_seed(1)
    m = build_model(_cfg(gate=False, input_dropout=0.0, looks=3, conflict="learnt")).eval()
    K, L = 5, 3
    x = m.text_in(_x(), None)
    with torch.no_grad():
        z = m.ev_t.linear(x)
        l, _ = m.ev_t(x)
        torch.testing.assert_close(l, z[:, :K * L].view(-1, K, L).logsumexp(-1))          # eq T0
        uniform = m.state_evidence(l, torch.zeros(6, 2), None)
        torch.testing.assert_close(m.state_evidence(l, torch.zeros(6, 2), m.conflict_t), uniform)
        m.conflict_t.copy_(torch.randn(K, K))
        got = m.state_evidence(l, torch.zeros(6, 2), m.conflict_t)[:, 2]
        for y in range(K):
            others = [c for c in range(K) if c != y]
            q = torch.log_softmax(m.table_scale * m.conflict_t[y, others], 0)         # Q's logits, scaled
            torch.testing.assert_close(got[:, y], (l[:, others] + q).logsumexp(-1))         # eq T1'
    with pytest.raises(ValueError, match="conflict"):
        build_model(_cfg(conflict="sometimes"))


def test_table_scale_is_a_faster_step_for_the_tables_only():
    """table_scale s multiplies the logits of the state prior and of Q_m: the same function with the
    parameters divided by s, and the tables' gradients (so Adam's relative step) s times larger."""
    torch.manual_seed(2)
    models = {s: build_model(_cfg(gate=False, input_dropout=0.0, looks=2, conflict="learnt", table_scale=s)).eval()
              for s in (1.0, 10.0)}
    one, ten = models[1.0], models[10.0]
    ten.load_state_dict(one.state_dict())
    with torch.no_grad():
        one.log_prior.copy_(torch.randn(9))
        one.conflict_t.copy_(torch.randn(5, 5))
        ten.log_prior.copy_(one.log_prior / 10)
        ten.conflict_t.copy_(one.conflict_t / 10)
    t, v = _x(), _x(seed=1)
    torch.testing.assert_close(ten(t, v).logits, one(t, v).logits)
    for m in (one, ten):
        m(t, v).logits.logsumexp(-1).sum().backward()
    torch.testing.assert_close(ten.log_prior.grad, 10 * one.log_prior.grad)
    torch.testing.assert_close(ten.ev_t.linear.weight.grad, one.ev_t.linear.weight.grad)


def _aniso_batch(n=600, d=32, k=5, seed=0):
    """Gaussian places whose shared noise is spread over correlated directions (a power-law spectrum
    in a random basis), the case the LDA start (eq T6) is for. The places are fixed; ``seed`` draws
    the posts."""
    world, g = np.random.default_rng(1234), np.random.default_rng(seed)
    basis, _ = np.linalg.qr(world.standard_normal((d, d)))
    sd = np.arange(1, d + 1) ** -0.8 * 2.0
    means = {m: world.standard_normal((k, d)) * 0.35 for m in ("text", "image")}
    y = g.integers(0, k, n)

    def modality(m):
        return means[m][y] + (g.standard_normal((n, d)) * sd) @ basis.T

    return {"text": torch.tensor(modality("text"), dtype=torch.float32),
            "image": torch.tensor(modality("image"), dtype=torch.float32),
            "label": torch.as_tensor(y)}


def _spiked_batch(n=1000, d=300, k=5, seed=0):
    """Places whose means differ a little in every direction, under isotropic noise plus five directions with
    30x its spread (the dominant directions of CLIP-like features), with 200 posts per place for 300
    dimensions. ``seed`` draws the posts; the places and directions are fixed."""
    world, g = np.random.default_rng(3), np.random.default_rng(seed)
    basis, _ = np.linalg.qr(world.standard_normal((d, d)))
    sd = np.where(np.arange(d) < 5, 30.0, 1.0)
    means = world.standard_normal((k, d)) * 0.1
    y = g.integers(0, k, n)
    x = {m: means[y] + (g.standard_normal((n, d)) * sd) @ basis.T for m in ("text", "image")}
    return {**{m: torch.tensor(v, dtype=torch.float32) for m, v in x.items()}, "label": torch.as_tensor(y)}


@pytest.mark.parametrize("shrinkage,data", [("ledoit_wolf", "aniso"), ("cv", "aniso"), ("cv", "spiked")])
def test_lda_start_is_eq_t6_against_a_direct_computation(shrinkage, data):
    """init: lda writes z(c) = mu_c^T P x - mu_c^T P mu_c / 2 (one look, log w = 0) with P the inverse
    shrinkage within-place covariance of the normalised inputs, and b_y = log p(y). The covariance is
    Ledoit-Wolf's, or with start_shrinkage cv (eq T6'') (1 - d) S + d (tr S / D) I where an intensity d of the grid
    classifies held-out training posts best and better than Ledoit-Wolf's (the spiked data), else Ledoit-Wolf's
    (the anisotropic data, where every intensity classifies them all)."""
    from sklearn.covariance import ledoit_wolf

    from sgmft.models.trust import SHRINK_GRID

    b = _aniso_batch() if data == "aniso" else _spiked_batch()
    n, dim = b["text"].shape
    m = build_model(dataclasses.replace(_cfg(init="lda", looks=1, gate=False, input_dropout=0.0,
                                             start_shrinkage=shrinkage), dim=dim))
    info = m.init_from_data(b, seed=0)
    assert info["text"]["looks"] == 1 and info["image"]["posts"] == n and 0 <= info["text"]["shrinkage"] <= 1
    m.eval()
    x = m.text_in(b["text"], None).double().numpy()
    y = b["label"].numpy()
    mu = np.stack([x[y == c].mean(0) for c in range(5)])
    cov, lw = ledoit_wolf(x - mu[y])
    d = info["text"]["shrinkage"]
    if shrinkage == "cv":
        cv = info["text"]["shrinkage_cv"]
        acc = {float(k): v for k, v in cv["held_out_accuracy"].items()}        # intensity -> held-out accuracy
        acc_lw = acc[min(acc, key=lambda k: abs(k - lw))]
        assert cv["ledoit_wolf"] == pytest.approx(lw, abs=1e-4) and set(SHRINK_GRID) < set(acc)
        if data == "spiked":
            assert d in SHRINK_GRID and acc[d] == max(acc.values()) > acc_lw, cv
            r = x - mu[y] - (x - mu[y]).mean(0)
            s = r.T @ r / len(r)
            cov = (1 - d) * s + d * np.trace(s) / len(s) * np.eye(len(s))
        else:
            assert max(acc.values()) == acc_lw and d == pytest.approx(lw, abs=1e-4), cv
    else:
        assert "shrinkage_cv" not in info["text"] and d == pytest.approx(lw, abs=1e-4)
    prec = np.linalg.inv(cov)
    want = x @ prec @ mu.T - 0.5 * np.einsum("cd,de,ce->c", mu, prec, mu)
    with torch.no_grad():
        got, _ = m.ev_t(m.text_in(b["text"], None))
    # tolerance: the start's deliberate jitter (1e-3 of the weights' spread) along the spiked directions
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-3, atol=5e-3 * np.abs(want).max())
    prior = (np.bincount(y, minlength=5) + 1) / (n + 5)
    np.testing.assert_allclose(m.bias.detach().numpy(), np.log(prior), rtol=1e-5)


def test_cv_shrinkage_regularises_the_start_where_ledoit_wolf_barely_shrinks():
    """Eq T6'': where a few dominant directions make the sample covariance far from a multiple of the identity,
    Ledoit-Wolf (which minimises the covariance's Frobenius error) barely shrinks, and the inverse of the
    other 295 sample eigenvalues, spread by estimation (Marchenko-Pastur), amplifies the noise. The intensity
    that cross-validation picks for the discriminant is larger, and the start classifies held-out posts better
    before any step."""
    fit, held = _spiked_batch(seed=0), _spiked_batch(n=3000, seed=1)
    accs, infos = {}, {}
    for how in ("ledoit_wolf", "cv"):
        m = build_model(dataclasses.replace(_cfg(init="lda", looks=1, input_dropout=0.0, gate=False,
                                                 start_shrinkage=how), dim=300))
        infos[how] = m.init_from_data(fit, seed=0)["text"]
        with torch.no_grad():
            z, _ = m.eval().ev_t(m.text_in(held["text"], None))
        accs[how] = float((z.argmax(1) == held["label"]).float().mean())
    assert infos["ledoit_wolf"]["shrinkage"] < 0.02 < infos["cv"]["shrinkage"], infos
    assert accs["cv"] > accs["ledoit_wolf"] + 0.02, accs


def test_lda_start_learns_what_random_initialisation_does_not_yet_know():
    """Before any step, the LDA start classifies held-out posts about as well as scikit-learn's
    shrinkage LDA on each modality; a random start is at chance. init: random leaves the weights."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    fit, held = _aniso_batch(seed=0), _aniso_batch(seed=1)     # same places, new posts
    accs = {}
    for init in ("lda", "random"):
        torch.manual_seed(0)
        m = build_model(_cfg(init=init, looks=2, input_dropout=0.0))
        before = m.ev_t.linear.weight.detach().clone()
        assert (m.init_from_data(fit, seed=0) is None) == (init == "random")
        if init == "random":
            torch.testing.assert_close(m.ev_t.linear.weight, before)
        with torch.no_grad():
            out = m.eval()(held["text"], held["image"])
        accs[init] = float((out.extras["logits_text"].argmax(1) == held["label"]).float().mean())
    sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(fit["text"].numpy(), fit["label"].numpy())
    sk_acc = float((sk.predict(held["text"].numpy()) == held["label"].numpy()).mean())
    assert accs["lda"] > sk_acc - 0.05 and accs["lda"] > 0.6, (accs, sk_acc)
    assert accs["random"] < 0.4, accs


def _looks_batch(n=1200, d=32, k=5, seed=0):
    """Places with two looks on either side of a small mean (a place's mean says little), under noise
    that is large along a few directions of a random basis: in the raw space the noise is wider than
    the gap between two looks, in the whitened space it is not. ``seed`` draws the posts."""
    world, g = np.random.default_rng(99), np.random.default_rng(seed)
    basis, _ = np.linalg.qr(world.standard_normal((d, d)))
    sd = np.where(np.arange(d) < 3, 5.0, 0.5)
    centre = world.standard_normal((k, d)) * 0.1
    apart = world.standard_normal((k, d))
    apart *= 2.0 / np.linalg.norm(apart @ basis, axis=1, keepdims=True)     # 2 from the centre, ~8 sd apart
    y, side = g.integers(0, k, n), g.choice([-1.0, 1.0], n)
    x = {m: centre[y] + side[:, None] * apart[y] + (g.standard_normal((n, d)) * sd) @ basis.T for m in ("text", "image")}
    return {**{m: torch.tensor(v, dtype=torch.float32) for m, v in x.items()}, "label": torch.as_tensor(y)}


def test_mda_start_finds_looks_where_one_gaussian_per_place_blurs_them():
    """Eq T6 with looks > 1 (preset trust_mda): the looks are found in the whitened space and the
    covariance re-estimated around them, so before any step the start separates places whose looks lie
    on either side of a shared centre; one Gaussian per place cannot (its means nearly coincide).
    Found in the raw space, k-means splits the wide noise instead and the start is as blurred."""
    fit, held = _looks_batch(seed=0), _looks_batch(seed=1)
    accs, infos = {}, {}
    for looks in (1, 2):
        m = build_model(_cfg(init="lda", looks=looks, input_dropout=0.0, gate=False))
        infos[looks] = m.init_from_data(fit, seed=0)["text"]
        with torch.no_grad():
            z, _ = m.eval().ev_t(m.text_in(held["text"], None))
        accs[looks] = float((z.argmax(1) == held["label"]).float().mean())       # eq T0 applied
    assert infos[2]["mda_rounds"] >= 1 and "mda_rounds" not in infos[1]
    assert accs[2] > 0.85 and accs[2] > accs[1] + 0.3, accs


def test_evidence_lr_scales_only_the_evidence_networks():
    """param_groups: evidence_lr x lr for E_t and E_v, lr for the rest; 0 leaves the evidence as it
    was initialised while the mixture still learns."""
    torch.manual_seed(3)
    b = _aniso_batch(n=200)
    m = build_model(_cfg(init="lda", looks=1, evidence_lr=0.0))
    m.init_from_data(b)
    groups = m.param_groups(1e-2)
    assert len(groups) == 1 and not {id(p) for p in m.ev_t.parameters()} & {id(p) for p in groups[0]["params"]}
    ev0, prior0 = m.ev_v.linear.weight.detach().clone(), m.log_prior.detach().clone()
    opt = torch.optim.Adam(groups, lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(b["text"], b["image"]).logits, b["label"]).backward()
        opt.step()
    torch.testing.assert_close(m.ev_v.linear.weight, ev0)
    assert not torch.equal(m.log_prior, prior0)
    tenth = build_model(_cfg(evidence_lr=0.1)).param_groups(1e-2)
    assert [g.get("lr") for g in tenth] == [None, pytest.approx(1e-3)]


def test_table_lr_zero_keeps_the_em_state_prior_and_tables():
    """param_groups: table_lr 0 leaves the state prior (eq T3) and conflict tables (eq T1') at EM's counts while
    the evidence still learns; at 1 they are in the first group as before, at another value in their own."""
    torch.manual_seed(3)
    b, _ = _states_batch(n=600)
    m = build_model(dataclasses.replace(_cfg(init="em", looks=1, gate=False, table_lr=0.0), dim=128))
    m.init_from_data(b)
    fusion = (m.log_prior, m.conflict_t, m.conflict_v)
    starts = [p.detach().clone() for p in fusion]
    assert not np.allclose(starts[1].numpy(), 0)                    # EM's counts, not the zero start
    groups = m.param_groups(1e-2)
    ev0 = m.ev_t.linear.weight.detach().clone()
    opt = torch.optim.Adam(groups, lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(b["text"], b["image"]).logits, b["label"]).backward()
        opt.step()
    for p, p0 in zip(fusion, starts):
        torch.testing.assert_close(p, p0)
    assert not torch.equal(m.ev_t.linear.weight, ev0)
    plain = build_model(_cfg())
    default = plain.param_groups(1e-2)
    fusion_ids = {id(plain.log_prior), id(plain.conflict_t), id(plain.conflict_v)}
    assert len(default) == 2 and fusion_ids <= {id(p) for p in default[0]["params"]}
    half = build_model(_cfg(table_lr=0.5))
    groups = half.param_groups(1e-2)
    assert [g.get("lr") for g in groups] == [None, pytest.approx(1e-2), pytest.approx(5e-3)]
    assert {id(p) for p in groups[2]["params"]} == {id(half.log_prior), id(half.conflict_t), id(half.conflict_v)}


def test_start_inits_keeps_the_lowest_inertia_of_several_kmeans_starts():
    """start_inits (looks and themes of the generative start): k-means from several starts keeps the one with the
    lowest inertia, never a worse one, and escapes where one seeded start is stuck (seeds 2 and 3 here: two
    of five clusters merged); the option reaches the start and is recorded."""
    from sgmft.models.trust import _centres

    def inertia(x, c):
        return float((((x[:, None] - c[None]) ** 2).sum(-1)).min(1).sum())

    worse = 0
    for seed in range(6):
        g = np.random.default_rng(seed)
        x = np.concatenate([g.normal(m, 1.0, (n, 8)) for m, n in zip((0, 3, 6, 9, 12), (40, 300, 40, 300, 40))])
        one, several = inertia(x, _centres(x, 5, seed)[0]), inertia(x, _centres(x, 5, seed, 10)[0])
        assert several <= one + 1e-6
        worse += one > 1.2 * several
    assert worse >= 2
    b, _ = _states_batch(n=600)
    m = build_model(dataclasses.replace(_cfg(init="em", looks=2, gate=False, start_inits=4), dim=128))
    info = m.init_from_data(b)
    assert info["text"]["kmeans_starts"] == 4 and info["image"]["kmeans_starts"] == 4


def test_lda_start_skips_a_modality_too_few_posts_have():
    """A modality absent from (almost) every training post keeps its random start and says so."""
    b = _aniso_batch(n=200)
    b["image_mask"] = torch.zeros(200, dtype=torch.bool)
    b["image_mask"][:3] = True
    m = build_model(_cfg(init="lda", looks=1))
    before = m.ev_v.linear.weight.detach().clone()
    info = m.init_from_data(b)
    assert info["image"] == {"posts": 3, "fitted": False} and info["text"]["posts"] == 200
    torch.testing.assert_close(m.ev_v.linear.weight, before)


def _states_batch(n=2000, d=128, k=5, seed=0, themes=3, shares=(0.6, 0.25, 0.15)):
    """Posts whose modality shows its place (60 %), a generic theme (25 %, three themes) or another
    place (15 %), independently per modality, under noise spread over every direction of a random
    basis. The places and themes are fixed; ``seed`` draws the posts. Returns the batch and each
    post's true state per modality (0 place, 1 generic, 2 another place)."""
    world, g = np.random.default_rng(7), np.random.default_rng(seed)
    basis, _ = np.linalg.qr(world.standard_normal((d, d)))
    sd = np.arange(1, d + 1) ** -0.5
    sd *= np.sqrt(d / (sd ** 2).sum())
    y = g.integers(0, k, n)
    batch, kinds = {"label": torch.as_tensor(y)}, {}
    for m in ("text", "image"):
        means, th = world.standard_normal((k, d)) * 0.2, world.standard_normal((themes, d)) * 0.2
        kinds[m] = kind = g.choice(3, n, p=list(shares))
        other = (y + g.integers(1, k, n)) % k
        centre = np.where(kind[:, None] == 0, means[y],
                          np.where(kind[:, None] == 1, th[g.integers(0, themes, n)], means[other]))
        batch[m] = torch.tensor(centre + (g.standard_normal((n, d)) * sd) @ basis.T, dtype=torch.float32)
    return batch, kinds


def test_em_start_fits_the_states_that_blur_the_lda_start():
    """init: em (presets trust_lda, trust_mda) fits eq T1's states before training: generic and
    contradicting posts no longer widen the within-place covariance, and the themes sit where the
    generic posts are. Before any step, on held-out posts where one modality shows the place and the
    other is generic, the start is right far more often than the plain LDA start; the fitted generic
    share is near the true 25 %, and the state prior and conflict tables start from the fitted counts."""
    fit, _ = _states_batch(seed=0)
    held, kinds = _states_batch(seed=1)
    one = torch.as_tensor(((kinds["text"] == 0) & (kinds["image"] == 1)) | ((kinds["text"] == 1) & (kinds["image"] == 0)))
    accs = {}
    for init in ("lda", "em"):
        m = build_model(dataclasses.replace(_cfg(init=init, looks=1, input_dropout=0.0, gate=False), dim=128))
        info = m.init_from_data(fit, seed=0)
        with torch.no_grad():
            pred = m.eval()(held["text"], held["image"]).logits.argmax(1)
        accs[init] = float((pred == held["label"])[one].float().mean())
    assert accs["em"] > 0.92 and accs["em"] > accs["lda"] + 0.04, accs
    assert info["text"]["em_rounds"] >= 1 and abs(info["text"]["state_shares"][1] - 0.25) < 0.1, info
    joint = np.asarray(info["joint_states"]).reshape(3, 3)
    assert joint.sum() == pytest.approx(1, abs=1e-3) and joint[0, 0] == joint.max()
    torch.testing.assert_close(torch.log_softmax(m.table_scale * m.log_prior, 0).exp(),
                               torch.tensor(joint.ravel(), dtype=torch.float32), atol=2e-3, rtol=0)
    assert float(m.conflict_t.detach().std()) > 0          # Q_t from the contradicting posts' places


def _themes_batch(seed=0):
    """As :func:`_states_batch`, but 30 % of each modality's posts show one of eight generic themes
    (10 % another place), at width 64."""
    return _states_batch(d=64, seed=seed, themes=8, shares=(0.6, 0.3, 0.1))


def test_em_themes_started_on_the_unexplained_posts_find_the_generic_ones():
    """Eq T6' from two starts of the themes (``theme_start``). Started as k-means of all posts, the themes
    sit where most posts are, on the places, and classification EM stays there: it finds a generic share
    under 10 % where the truth is 30 %. Started on the posts whose nearest look is another place's, it
    finds more of them, and the start is right more often where one modality is generic. ``best`` runs
    both and keeps the one that classifies the validation posts better, here the second, and says so;
    without validation posts it runs EM once, from the first start."""
    fit, _ = _themes_batch(seed=0)
    held, kinds = _themes_batch(seed=1)
    val, _ = _themes_batch(seed=2)
    one = torch.as_tensor(((kinds["text"] == 0) & (kinds["image"] == 1)) | ((kinds["text"] == 1) & (kinds["image"] == 0)))
    res = {}
    for ts in ("all", "unexplained", "best"):
        m = build_model(dataclasses.replace(_cfg(init="em", looks=1, input_dropout=0.0, gate=False, theme_start=ts),
                                            dim=64))
        info = m.init_from_data(fit, seed=0, val_batch=val if ts == "best" else None)
        with torch.no_grad():
            pred = m.eval()(held["text"], held["image"]).logits.argmax(1)
        res[ts] = info, float((pred == held["label"])[one].float().mean()), m.ev_t.linear.weight.detach().clone()
    (all_info, all_acc, all_w), (un_info, un_acc, un_w) = res["all"], res["unexplained"]
    assert all_info["text"]["state_shares"][1] < 0.1 < un_info["text"]["state_shares"][1], (all_info, un_info)
    assert un_acc > all_acc + 0.03, (all_acc, un_acc)
    best_info, best_acc, best_w = res["best"]
    acc = best_info["theme_start"]["validation_accuracy"]
    assert best_info["theme_start"]["chosen"] == "unexplained" and acc["unexplained"] > acc["all"], best_info
    assert best_acc == un_acc
    torch.testing.assert_close(best_w, un_w)
    m = build_model(dataclasses.replace(_cfg(init="em", looks=1, input_dropout=0.0, gate=False, theme_start="best"),
                                        dim=64))
    rec = m.init_from_data(fit, seed=0)["theme_start"]                  # no validation posts: the first start
    assert rec["chosen"] == "all" and rec["rule"].startswith("too few validation posts"), rec
    torch.testing.assert_close(m.ev_t.linear.weight, all_w)


def test_best_theme_start_follows_the_validation_posts_over_the_training_fit():
    """With validation posts, ``best`` keeps the start that classifies them better, even where the other start
    fits the training posts better: here the validation labels are what the first start (``all``) predicts, so
    it scores 100 % there, while the second (``unexplained``) has the lower training cross-entropy. Its weights,
    state prior and conflict tables are then the first start's, not the last start fitted."""
    fit, _ = _themes_batch(seed=0)
    val, _ = _themes_batch(seed=2)
    first = build_model(dataclasses.replace(_cfg(init="em", looks=1, input_dropout=0.0, gate=False), dim=64))
    first.init_from_data(fit, seed=0)
    with torch.no_grad():
        val = {**val, "label": first.eval()(val["text"], val["image"]).logits.argmax(1)}
    m = build_model(dataclasses.replace(_cfg(init="em", looks=1, input_dropout=0.0, gate=False, theme_start="best"),
                                        dim=64))
    rec = m.init_from_data(fit, seed=0, val_batch=val)["theme_start"]
    assert rec["training_cross_entropy"]["unexplained"] < rec["training_cross_entropy"]["all"], rec
    assert rec["validation_accuracy"]["all"] == 100.0 > rec["validation_accuracy"]["unexplained"], rec
    assert rec["chosen"] == "all" and rec["rule"].startswith("higher validation accuracy"), rec
    for name, a in first.state_dict().items():
        torch.testing.assert_close(m.state_dict()[name], a, msg=name)


def test_second_theme_start_is_not_refitted_when_the_places_explain_almost_every_post(monkeypatch):
    """With fewer than 2J posts whose nearest look is another place's (a small, well separated store), the
    second start would start on all posts, as the first does: ``best`` reuses the first fit instead of running
    EM again, and keeps the first start."""
    import sgmft.models.trust as trust_mod

    fit, _ = _states_batch(n=300, seed=0, shares=(1.0, 0.0, 0.0))
    fits = []
    real = trust_mod._em_fit

    def counting(*a, **kw):
        out = real(*a, **kw)
        fits.append(out is not None)
        return out

    monkeypatch.setattr(trust_mod, "_em_fit", counting)
    models = {}
    for ts in ("all", "best"):
        models[ts] = m = build_model(dataclasses.replace(
            _cfg(init="em", looks=1, input_dropout=0.0, gate=False, generic=3, theme_start=ts), dim=128))
        info = m.init_from_data(fit, seed=0, val_batch=_states_batch(n=300, seed=1, shares=(1.0, 0.0, 0.0))[0])
    assert fits == [True, True, True, False, True, False], fits     # all: text, image; best: text x2, image x2
    assert info["theme_start"]["chosen"] == "all", info["theme_start"]
    for name, a in models["all"].state_dict().items():
        torch.testing.assert_close(models["best"].state_dict()[name], a, msg=name)


@pytest.mark.parametrize("threshold, chooses", [(10**6, False), (1, True)])
def test_training_hands_the_start_its_validation_posts_only_when_there_are_enough(hetero_store, tmp_path,
                                                                                  monkeypatch, threshold, chooses):
    """train/fit.py gives EM's start the validation split to choose its themes on (``theme_start: best``) only
    with at least ``CV_BELOW_VAL_POSTS`` of them (500: the size below which ``auto`` cross-validates instead);
    with fewer, ``best`` keeps the first start and runs EM once, and run.json says why."""
    import json

    import sgmft.train.fit as fit_mod
    from sgmft.train import train

    seen = []
    real = TrustMix.init_from_data

    def spy(self, batch, seed=0, val_batch=None):
        seen.append(None if val_batch is None else len(val_batch["label"]))
        return real(self, batch, seed=seed, val_batch=val_batch)

    monkeypatch.setattr(TrustMix, "init_from_data", spy)
    monkeypatch.setattr(fit_mod, "CV_BELOW_VAL_POSTS", threshold)
    p = load_preset("trust_lda")
    p.train = dataclasses.replace(p.train, epochs=1, min_steps=0, progress=False)
    res = train(hetero_store[0], tmp_path / "run", p)
    rec = json.loads((res.run_dir / "run.json").read_text())["init"]["theme_start"]
    assert len(seen) == 1 and (seen[0] is not None and seen[0] > 0) == chooses, seen
    assert rec["rule"].startswith("higher validation accuracy" if chooses else "too few validation posts"), rec


def test_a_constant_modality_is_not_fitted_and_training_stays_finite(tmp_path):
    """A modality with the same features on every post (one placeholder image) has a zero covariance: the start
    skips it (run.json says why) instead of whitening by 1/0, and the run's losses stay finite."""
    import json
    import warnings

    from conftest import make_store
    from sgmft.features import FeatureStore, write_feature_store
    from sgmft.train import train

    fs = FeatureStore.open(make_store(tmp_path / "s", n=240, dim=16, k=3))
    image = np.repeat(np.asarray(fs.image)[:1], len(fs), 0)
    store = write_feature_store(tmp_path / "c", ids=np.asarray(fs.ids), text=np.asarray(fs.text), image=image,
                                labels=np.asarray(fs.labels), label_names=fs.label_names)
    p = load_preset("trust_lda")
    p.train = dataclasses.replace(p.train, epochs=2, min_steps=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(store, tmp_path / "run", p)
    info = json.loads((res.run_dir / "run.json").read_text())
    assert info["init"]["image"] == {"posts": info["init"]["text"]["posts"], "fitted": False,
                                     "why": "the same features on every post"}, info["init"]["image"]
    assert info["init"]["text"]["em_rounds"] > 0
    assert info["best_val_acc"] > 0.6, info["best_val_acc"]          # the text alone tells the 3 places apart
