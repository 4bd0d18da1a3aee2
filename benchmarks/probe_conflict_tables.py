"""Where a TrustMix run loses the posts whose two modalities show different places (issue 17's regime bar).

A diagnostic, not a model choice. SimFeat is deterministic given its configuration, so this probe draws
the generator again from the store's metadata and knows, for every post, which place or theme each
modality shows and the generator's own fusion parameters: the regime probabilities, the conflict
tables Q_m(c | y) and the label prior. It keeps the run's evidence networks (eq T0) and fuses their
evidence (eqs T1', T2) with fusion parameters from different sources, on the test posts:

* ``as_trained``: the run's own state prior and gate (eqs T3, T4), conflict tables and bias;
* ``generator_pi_true_tables``: the generator's regime probabilities as a constant state prior, its
  tables and its label prior (the fusion an oracle would use on this evidence);
* ``model_pi_true_tables``: the run's state prior and bias with the generator's tables;
* ``counted_tables_alpha_<a>``: tables counted on the *training* posts, told each post's regime and
  the place its contradicting modality shows (add-a smoothing), with the generator's state prior and
  label prior: the best a table estimated from this training split can do, with every advantage;
* ``model_tables_generator_pi``: the run's tables with the generator's state prior and label prior.

It also reports how often each modality's strongest place evidence is the place that modality shows
(the run against the exact likelihood on the stored features), how far the run's tables are from the
generator's (mean total variation over rows) and the run's mean state prior beside the generator's.
Prints one JSON document.

    python benchmarks/bench_hetero.py --profiles wide --seeds 0 --presets auto --workdir W
    python benchmarks/probe_conflict_tables.py W/run-wide-auto-0/candidates/trust_mda W/store-wide
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REGIMES = ("both", "text_generic", "image_generic", "image_other_place", "text_other_place")


def _world(store: Path):
    """The generator's config and model, and every post's shown components (c_t, c_i), drawn again."""
    from sgmft.data import simfeat as S

    cfg = S.SimFeatConfig(**json.loads((store / "meta.json").read_text())["extra"]["simfeat"]["config"])
    if cfg.conflict_concentration <= 0 or not cfg.fine_regimes:
        raise SystemExit(f"{store}: this probe needs a SimFeat profile with conflict tables and fine regimes "
                         "(conflict, wide, wide768, hetero)")
    r_model, r_posts = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5)[:2])
    model = S._Model(cfg, r_model)
    *_, comp_t, comp_i = S._draw_posts(cfg, model, cfg.num_posts, r_posts, components=True)
    return cfg, model, comp_t, comp_i


def _generator_pi(cfg, model) -> np.ndarray:
    """(3, 3) log pi(s_t, s_v) over (shows the place, generic, another place) implied by the regimes."""
    pb, pto, pio, pne = np.exp(model.log_regime)
    qt, qv = cfg.distractor_prob("text"), cfg.distractor_prob("image")
    st = lambda inf, q: np.array([inf, (1 - inf) * (1 - q), (1 - inf) * q])  # noqa: E731
    p = (pb * np.outer(st(1, qt), st(1, qv)) + pto * np.outer(st(1, qt), st(0, qv))
         + pio * np.outer(st(0, qt), st(1, qv)) + pne * np.outer(st(0, qt), st(0, qv)))
    return np.log(np.maximum(p, 1e-30))


def _evidence(m, text, image):
    """The run's place and generic evidence of each modality, and its own log pi (n, 3, 3)."""
    import torch

    with torch.inference_mode():
        t, v = m.text_in(torch.as_tensor(text).float(), None), m.image_in(torch.as_tensor(image).float(), None)
        (lt, gt), (lv, gv) = m.ev_t(t), m.ev_v(v)
        log_pi = m.log_pi(t, v, lt, gt, lv, gv).view(-1, 3, 3)
    return (lt, gt, lv, gv), log_pi.numpy()


def _state_evidence(m, l, g, log_q: np.ndarray) -> np.ndarray:
    """(n, 3, K) a_m^s(y) of eq T1' (the run's own ``state_evidence``) with the table ``log_q`` (K, K), rows y:
    given as conflict logits log_q / table_scale, whose masked log-softmax is log_q again (its rows sum to 1)."""
    import torch

    with torch.inference_mode():
        logits = torch.as_tensor(np.maximum(log_q, -30.0)).float() / m.table_scale
        return m.state_evidence(l, g, logits).numpy()


def _fuse(m, ev, tables: tuple, log_pi: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Eq T2's logits from the evidence, the tables (text, image), a log pi ((3, 3) or (n, 3, 3)) and a bias."""
    from scipy.special import logsumexp

    lt, gt, lv, gv = ev
    at, av = _state_evidence(m, lt, gt, tables[0]), _state_evidence(m, lv, gv, tables[1])
    log_pi = np.broadcast_to(log_pi, (len(at), 3, 3))
    joint = log_pi[..., None] + at[:, :, None, :] + av[:, None, :, :]
    return logsumexp(joint.reshape(len(at), 9, -1), 1) + bias


def _by_regime(pred, y, names) -> dict:
    out = {"test": round(100 * float(np.mean(pred == y)), 2)}
    out.update({r: round(100 * float(np.mean(pred[names == r] == y[names == r])), 1) for r in REGIMES
                if np.any(names == r)})
    return out


def _counted(y, comp, names, regime: str, k: int, alpha: float) -> np.ndarray:
    """log Q(c | y) counted on the posts of ``regime`` (told), add-alpha smoothed, the diagonal excluded."""
    keep = (names == regime) & (comp < k) & (comp != y)
    cnt = np.zeros((k, k))
    np.add.at(cnt, (y[keep], comp[keep]), 1)
    cnt += alpha
    np.fill_diagonal(cnt, 0)
    with np.errstate(divide="ignore"):
        return np.log(cnt / np.maximum(cnt.sum(1, keepdims=True), 1e-12))


def _tv(log_a: np.ndarray, log_b: np.ndarray) -> float:
    return round(float(0.5 * np.abs(np.exp(log_a) - np.exp(log_b)).sum(1).mean()), 3)


def _identification(cfg, model, ev, text, image, comp_t, comp_i) -> dict:
    """How often a modality's strongest place evidence is the place it shows: the run, and the exact likelihood."""
    from sgmft.data import simfeat as S

    k, out = cfg.num_classes, {}
    sigma = math.sqrt(cfg.nuisance / cfg.dim)
    for name, comp, l, x in (("text", comp_t, ev[0], text), ("image", comp_i, ev[2], image)):
        shown = comp < k
        exact = S._component_loglik(cfg, model, name, S._stored_content(cfg, model, x, sigma))[:, :k]
        out[name] = {"posts_showing_a_place": int(shown.sum()),
                     "run": round(100 * float(np.mean(l.numpy()[shown].argmax(1) == comp[shown])), 1),
                     "exact_likelihood": round(100 * float(np.mean(exact[shown].argmax(1) == comp[shown])), 1)}
    return out


def probe(run: Path, store: Path, alphas=(0.1, 0.5)) -> dict:
    import torch

    from sgmft.checkpoint import load_checkpoint
    from sgmft.features import FeatureStore

    m, _ = load_checkpoint(run / "model")
    if getattr(m, "conflict_t", None) is None:
        raise SystemExit(f"{run}: not a TrustMix run with learnt conflict tables (trust, trust_lda, trust_mda)")
    m.eval()
    cfg, model, comp_t, comp_i = _world(store)
    fs = FeatureStore.open(store)
    names = np.asarray(fs.regime_names)[np.asarray(fs.regime)]
    labels, split = np.asarray(fs.labels), np.load(run / "split.npy", allow_pickle=True).astype(str)
    te, tr, k = split == "test", split == "train", cfg.num_classes
    text, image = np.asarray(fs.text)[te], np.asarray(fs.image)[te]
    ev, log_pi = _evidence(m, text, image)
    eye = torch.eye(k, dtype=torch.bool)
    with torch.inference_mode():
        own = tuple(torch.log_softmax((m.table_scale * q).masked_fill(eye, float("-inf")), -1).numpy()
                    for q in (m.conflict_t, m.conflict_v))
    true = (model.log_conflict["text"], model.log_conflict["image"])
    gen_pi, log_prior, bias = _generator_pi(cfg, model), np.log(model.prior), m.bias.detach().numpy()
    y, nt = labels[te], names[te]
    fusions = {"as_trained": (own, log_pi, bias), "generator_pi_true_tables": (true, gen_pi, log_prior),
               "model_pi_true_tables": (true, log_pi, bias), "model_tables_generator_pi": (own, gen_pi, log_prior)}
    for a in alphas:
        fusions[f"counted_tables_alpha_{a}"] = (tuple(_counted(labels[tr], c[tr], names[tr], r, k, a) for c, r in
                                                      ((comp_t, "text_other_place"), (comp_i, "image_other_place"))),
                                                gen_pi, log_prior)
    oracle = json.loads((store / "meta.json").read_text())["extra"]["simfeat"]["oracle"]
    return {
        "run": str(run), "store": str(store), "test_posts": int(te.sum()),
        "oracle_by_regime": {r: round(100 * v, 1) for r, v in oracle["test_accuracy_by_regime"].items()
                             if v is not None and r in REGIMES},
        "identification": _identification(cfg, model, ev, text, image, comp_t[te], comp_i[te]),
        "tables_tv_to_generator": {"run": {"text": _tv(own[0], true[0]), "image": _tv(own[1], true[1])},
                                   **{f: {"text": _tv(t[0][0], true[0]), "image": _tv(t[0][1], true[1])}
                                      for f, t in fusions.items() if f.startswith("counted")}},
        "state_prior": {"run_mean": np.round(np.exp(log_pi).mean(0).astype(float), 3).tolist(),
                        "generator": np.round(np.exp(gen_pi), 3).tolist(), "order": "inf, gen, oth"},
        "fused": {f: _by_regime(_fuse(m, ev, *t).argmax(1), y, nt) for f, t in fusions.items()},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished TrustMix run with learnt tables (or candidates/<preset>)")
    ap.add_argument("store", type=Path, help="its SimFeat store")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = probe(args.run, args.store)
    out["command"] = "python benchmarks/probe_conflict_tables.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
