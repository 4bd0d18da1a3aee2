"""TrustMix: a fusion that decides, per post, which modality to trust (docs/design.md, "TrustMix").

SG-MFT's P^m (eqs 1, 3) lets the similarity of text and image decide how much each token
attends to the other modality. TrustMix applies the same idea to whole modalities and
makes it explicit. For every post it estimates what each modality is showing, and combines
the two with a latent mixture over those states.

Each modality m (text t, image v) has an evidence network E_m. It gives

* ``l_m(c)``, c = 1..K: evidence that the modality shows place c (a log-likelihood up to a
  per-post constant);
* ``g_m = logsumexp_j h_m(j)``, j = 1..J: evidence that it shows something generic (a
  selfie, a meme, "nice day"). The J generic components are learnt; nothing ties them to
  a data set.

With ``looks`` = L > 1, a place is a mixture of L looks (a restaurant photo shows food, a table
or a sign), each linear in the features (eq T0): l_m(c) = logsumexp_{l=1..L} z_m(c, l).

Per modality, the evidence for label y under each state s is (eq T1)

    a_m^inf(y) = l_m(y)                              the modality shows the post's place
    a_m^gen(y) = g_m                                 it is generic: says nothing about y
    a_m^oth(y) = logsumexp_{c != y} l_m(c) - log(K-1) it shows another place than the post's

With ``conflict: learnt``, a contradicting modality's other place follows a learnt table
Q_m(c | y) (which place c it shows when the post's place is y: "missing the beach", posted
from home) instead of a uniform choice (eq T1'):

    a_m^oth(y) = logsumexp_{c != y} [ l_m(c) + log Q_m(c | y) ],  Q_m(. | y) a softmax over c != y

The logit of place y is the mixture over the joint states (s_t, s_v) (eq T2)

    logit(y) = logsumexp_{s_t, s_v} [ log pi(s_t, s_v | x) + a_t^{s_t}(y) + a_v^{s_v}(y) ] + b_y

with pi a softmax over the 9 joint states (eq T3): a learnt prior plus, if ``gate`` is on,
a linear function of similarity features of the post (eq T4): cosine of the projected text
and image, agreement sum_y p_t(y) p_v(y) of the unimodal evidence, and per modality the
confidence max_y p_m(y) and the margin of place over generic evidence. Setting ``states:
two`` drops the "other place" state (then there are 4 joint states: both, text, image,
neither).

The state prior and the conflict tables are small tables of logits that start at zero. Adam moves
a parameter by about lr per step, so at lr 1e-3 and the ~1,000 steps of a run a zero-initialised
logit can travel about 1, while a peaked conflict table needs log-ratios of 2 to 4. With
``table_scale`` = s their logits are s times their parameters (log Q_m = log_softmax(s theta_Q),
prior = s theta_pi), which is the same model with an s-times faster step for those tables only.

With ``init: lda`` the evidence networks do not start at random but as each modality's shrinkage
LDA (eq T6, :meth:`TrustMix.init_from_data`), and ``evidence_lr`` scales their learning rate
(preset ``trust_lda``): on features whose noise spreads over many correlated directions, gradient
steps need far more posts than the closed form to find the discriminant directions. With ``init: em``
(presets ``trust_lda``, ``trust_mda``) the start fits eq T1's states as well (eq T6', :func:`_em_fit`): each
modality's posts are split by classification EM into those that show their place, a generic theme or
another place, so that generic and contradicting posts neither widen the within-place covariance nor
leave the themes where the places are, and the state prior (eq T3) and the conflict tables (eq T1')
start from the fitted counts (``theme_start`` says where EM's themes start: among all posts, the default, or
among those no look of their own place explains, or both with the start kept that classifies the validation
posts better, given at least 500 of them). With ``start_shrinkage: cv`` (presets ``trust_lda``, ``trust_mda``) the shared covariance of the start
is shrunk towards a multiple of the identity by the intensity that cross-validation on the training posts
chooses for the discriminant (eq T6'', :func:`_cv_shrinkage`, regularised discriminant analysis): Ledoit-Wolf's
intensity, which suits the covariance itself, can be far too weak for its inverse when the width is not
small against the posts and a few directions dominate the spectrum.

A generic or contradicting modality is discounted because the mixture puts its weight on
the states in which that modality's evidence does not depend on y. When both modalities
show places and disagree, pi decides which one is trusted. ``aux_weight`` adds each
modality's marginal (eq T5, the mixture with the other modality summed out) as an auxiliary
cross-entropy term, so that each evidence network is also trained on its own. Missing
modalities (mask False) contribute no evidence: a_m^s(y) = 0 for every state.

With ``label_noise`` = eps > 0 the training loss is the likelihood of a label that is wrong with
probability eps (eq T7), for the fused logits and for both marginals of eq T5:

    -log[(1 - eps) p(y | x) + eps / K]

so a mislabelled post (both modalities show one place, the label names another) is not explained as
a contradiction in both modalities, which flattens the conflict tables and moves the state prior.
Prediction is unchanged (the noise term is uniform over places). Off in every preset (docs/design.md,
"The default model", item 17).

``fused`` (M_fuse, used for t-SNE) is [l_t, g_t, l_v, g_v, posterior over the joint states].
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.comparisons import HeadOutput, head_options
from sgmft.models.blocks import ModalityInput
from sgmft.models.options import ArchOptions, PositiveInt, option
from sgmft.models.registry import MODELS

__all__ = ["TrustMix"]


class _Evidence(nn.Module):
    """E_m: features -> (K place logits, J generic logits). Linear, or an MLP with a linear skip.

    With ``looks`` = L > 1 a place is a mixture of L looks (a restaurant photo shows food, a table
    or a sign): l_m(c) = logsumexp_l z_m(c, l) (eq T0), each look linear in the features.
    """

    def __init__(self, dim: int, k: int, j: int, hidden: int, dropout: float, looks: int = 1):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        out = k * looks + j
        self.linear = nn.Linear(dim, out)
        self.mlp = (nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out))
                    if hidden > 0 else None)
        self.k, self.looks = k, looks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.drop(x)
        z = self.linear(x)
        if self.mlp is not None:
            z = z + self.mlp(x)
        kl = self.k * self.looks
        place = z[:, :kl]
        if self.looks > 1:                                                  # eq T0
            place = place.view(-1, self.k, self.looks).logsumexp(-1)
        return place, z[:, kl:]


# k-means for eq T6 sees at most this many rows (a seeded subset): a start needs rough centres, and
# on 13,600 posts of width 1,024 all rows cost seconds per modality
KMEANS_ROWS = 4000


def _centres(x: np.ndarray, n: int, seed: int, inits: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``n`` k-means centres of ``x`` and the share of rows nearest each (repeats if too few rows); with
    ``inits`` > 1, the lowest-inertia of that many k-means++ starts."""
    from sklearn.cluster import KMeans

    if n == 1 or len(x) < 2 * n:                 # x has rows: absent places never get here
        return np.repeat(x.mean(0, keepdims=True), n, 0), np.full(n, 1.0 / n)
    if len(x) > KMEANS_ROWS:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), KMEANS_ROWS, replace=False))]
    km = KMeans(n_clusters=n, n_init=inits, random_state=seed).fit(x)
    share = np.bincount(km.labels_, minlength=n) + 1.0
    return km.cluster_centers_, share / share.sum()


# eq T6'': the shrinkage intensities that cross-validation chooses among (beside Ledoit-Wolf's own), and its folds
SHRINK_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 0.6)
SHRINK_FOLDS = 3


def _shrunk_cov(resid: np.ndarray, delta: float | None) -> tuple[np.ndarray, float]:
    """(1 - delta) S + delta (tr S / D) I of the residual rows (S their covariance) and delta;
    Ledoit-Wolf's own intensity when ``delta`` is None."""
    from sklearn.covariance import ledoit_wolf

    if delta is None:      # one block of the width: the same estimate as sklearn's default 1,000, 20x faster at 1,024
        return ledoit_wolf(resid, block_size=max(1000, resid.shape[1]))
    s = np.cov(resid, rowvar=False, bias=True)
    return (1 - delta) * s + delta * (np.trace(s) / len(s)) * np.eye(len(s)), delta


def _cv_shrinkage(x: np.ndarray, y: np.ndarray, seed: int,
                  group: np.ndarray | None = None) -> tuple[float | None, dict]:
    """Eq T6'': the shrinkage intensity of the within-component covariance chosen for the discriminant, as in
    regularised discriminant analysis (Friedman 1989): among Ledoit-Wolf's and :data:`SHRINK_GRID`, the
    intensity whose Gaussian classifier (one component per ``group``, a place scored by its best component;
    ``group`` defaults to the place) classifies held-out rows best (:data:`SHRINK_FOLDS` folds), if it beats
    Ledoit-Wolf's by more than one standard error of the paired per-row difference (else Ledoit-Wolf's; ties go
    to the weaker shrinkage). Ledoit-Wolf minimises the covariance's expected Frobenius error; where the width is not
    small against the posts, the sample eigenvalues it keeps spread (Marchenko-Pastur) and their inverse,
    which the discriminant uses, amplifies the noise. Returns the intensity (None: Ledoit-Wolf's, re-estimated
    with the covariance) and the held-out accuracy of each."""
    if len(x) < 10 * SHRINK_FOLDS:                                       # too few rows to tell intensities apart
        return None, {"rows": int(len(x))}
    from sklearn.covariance import ledoit_wolf_shrinkage

    group = y if group is None else group
    gs, gi = np.unique(group, return_inverse=True)
    owner = np.array([y[gi == i][0] for i in range(len(gs))])          # a group's place
    resid = x - np.stack([x[gi == i].mean(0) for i in range(len(gs))])[gi]
    lw = round(float(ledoit_wolf_shrinkage(resid, block_size=max(1000, x.shape[1]))), 6)
    grid = sorted({lw, *SHRINK_GRID})
    fold = np.random.default_rng(seed).permutation(len(x)) % SHRINK_FOLDS
    right = np.zeros((len(grid), len(x)))
    for f in range(SHRINK_FOLDS):
        fit, held = fold != f, fold == f
        seen = np.unique(gi[fit])
        means = np.stack([x[fit & (gi == i)].mean(0) for i in seen])
        r = x[fit] - means[np.searchsorted(seen, gi[fit])]
        vals, vecs = np.linalg.eigh(np.cov(r, rowvar=False, bias=True))
        xp, mp = x[held] @ vecs, means @ vecs
        logw = np.log(np.bincount(gi[fit], minlength=len(gs))[seen] / fit.sum())
        for i, d in enumerate(grid):
            inv = 1.0 / ((1 - d) * vals + d * vals.mean())
            score = (xp * inv) @ mp.T - 0.5 * (mp ** 2 * inv).sum(1) + logw
            right[i, held] = owner[seen][score.argmax(1)] == y[held]
    diff = right - right[grid.index(lw)]                           # paired, against Ledoit-Wolf's
    gain = np.where(diff.mean(1) > diff.std(1) / np.sqrt(len(x)), diff.mean(1), 0.0)
    best = grid[int(np.flatnonzero(gain == gain.max())[0])] if gain.max() > 0 else None
    return best, {"ledoit_wolf": round(lw, 4), "rows": int(len(x)), "held_out_accuracy": {
        str(d): round(float(a), 4) for d, a in zip(grid, right.mean(1))}}


MDA_ROUNDS = 3


def _whitener(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W with W^T cov W = I (symmetric inverse square root; tiny eigenvalues floored) and its inverse,
    from one eigendecomposition."""
    vals, vecs = np.linalg.eigh(cov)
    root = np.sqrt(np.maximum(vals, max(vals.max() * 1e-9, 1e-30)))    # 1e-30: a zero covariance (constant rows)
    return (vecs / root) @ vecs.T, (vecs * root) @ vecs.T


def _mda_looks(x: np.ndarray, y: np.ndarray, present: list[int], means: np.ndarray, looks: int,
               seed: int, delta: float | None = None, inits: int = 1) -> tuple[dict, np.ndarray, float]:
    """Eq T6 with L > 1 looks: mixture discriminant analysis (Hastie & Tibshirani 1996, "Discriminant
    analysis by Gaussian mixtures"). The looks of a place are k-means centres found in the space
    whitened by the within-look covariance, which is then re-estimated from the residuals about those
    centres (:data:`MDA_ROUNDS` alternations, from the within-place covariance). In the raw space the
    noise swamps the distance between two looks and k-means splits the noise instead. Returns each
    present place's (centres, shares) in input coordinates, the covariance and its shrinkage
    (``delta``, or Ledoit-Wolf's: :func:`_shrunk_cov`)."""
    cov, shrink = _shrunk_cov(x - means[y], delta)
    fitted = {}
    for _ in range(MDA_ROUNDS):
        w, w_inv = _whitener(cov)
        resid = np.empty_like(x)
        for c in present:
            rows = np.flatnonzero(y == c)
            z = x[rows] @ w
            cz, share = _centres(z, looks, seed, inits)
            near = ((cz ** 2).sum(1)[None] - 2 * z @ cz.T).argmin(1)     # nearest centre
            mu = cz @ w_inv                              # back to input coordinates
            resid[rows] = x[rows] - mu[near]
            fitted[c] = (mu, share)
        cov, shrink = _shrunk_cov(resid[np.isin(y, present)], delta)
    return fitted, cov, shrink


EM_ROUNDS = 5


def _unexplained(z: np.ndarray, cz: np.ndarray, owner: np.ndarray, alive: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Eq T6' (the themes' start): the rows whose nearest look, in the whitened space ``z`` (looks ``cz``, of places
    ``owner``; ``alive``: places with training posts), belongs to another place than their label. Those are the
    posts the places do not explain, where a generic theme or a contradicting modality must be; k-means on all
    posts puts the themes where most posts are, on the places."""
    score = z @ cz.T - 0.5 * (cz ** 2).sum(1)
    score[:, ~alive] = -np.inf
    own = np.where(owner[None] == y[:, None], score, -np.inf).max(1)
    return own < score.max(1)


def _em_fit(x: np.ndarray, y: np.ndarray, k: int, looks: int, j: int, fitted: dict, cov: np.ndarray,
            seed: int, cv: bool = False, theme_start: str = "all", skip_fallback: bool = False, inits: int = 1
            ) -> tuple[dict, tuple, np.ndarray, float, np.ndarray, dict | None] | None:
    """Eq T6' (eq T6 with the states of eq T1): classification EM of each modality's generative model. A post's
    modality shows its place (a look of it), a generic theme, or another place's look; looks, themes,
    state shares and the shared shrinkage covariance are re-estimated from the assignments
    (:data:`EM_ROUNDS` rounds; the covariance is Ledoit-Wolf's, or with ``cv``, from the second round on,
    shrunk by the intensity :func:`_cv_shrinkage` chooses on the posts the first round found showing their
    place, each look a component: eq T6''). A look that explains more posts of other labels than of its own place is
    a theme in disguise and moves to the themes. Without this, generic and contradicting posts widen the
    within-place covariance along the very directions that tell places apart. Returns the looks (as
    ``fitted``), the themes (centres, shares), the covariance, its shrinkage, each post's (state, place
    shown; -1 for a theme) and, with ``cv``, the held-out accuracies it chose by. ``theme_start`` ``unexplained``
    with fewer than 2J such posts starts on all posts, as ``all`` does; with ``skip_fallback`` it returns None
    then instead of fitting the same again."""
    kl = k * looks
    fill = np.repeat(x.mean(0, keepdims=True), looks, 0)
    mu = np.concatenate([fitted[c][0] if c in fitted else fill for c in range(k)])           # (K*L, D)
    cnt = np.concatenate([fitted[c][1] if c in fitted else np.full(looks, 1e-6) for c in range(k)])
    w, w_inv = _whitener(cov)
    owner = np.repeat(np.arange(k), looks)
    alive = np.isin(owner, list(fitted))
    z = x @ w
    pool = z                                                       # the rows k-means starts the themes on
    if theme_start == "unexplained":
        rows = _unexplained(z, mu @ w, owner, alive, y)
        if rows.sum() >= 2 * j:
            pool = z[rows]
        elif skip_fallback:                                         # too few: the same start as ``all``
            return None
    tz, tcnt = _centres(pool, j, seed, inits)
    theme = tz @ w_inv
    state_cnt = np.array([0.6, 0.2, 0.2])                          # shares of inf, gen, oth: a first guess
    delta, chosen = None, None
    for _ in range(EM_ROUNDS):
        w, w_inv = _whitener(cov)
        z, cz, tzz = x @ w, mu @ w, theme @ w
        logw = np.log(cnt / np.bincount(owner, cnt, k)[owner])
        ls = np.log(state_cnt / state_cnt.sum())
        sl = z @ cz.T - 0.5 * (cz ** 2).sum(1) + logw + np.where(owner[None] == y[:, None], ls[0], ls[2] - math.log(k - 1))
        sl[:, ~alive] = -np.inf                                        # a place without training posts
        st = z @ tzz.T - 0.5 * (tzz ** 2).sum(1) + np.log(tcnt / tcnt.sum()) + ls[1]
        comp = np.concatenate([sl, st], 1).argmax(1)
        state = np.where(comp >= kl, 1, np.where(owner[np.minimum(comp, kl - 1)] == y, 0, 2))
        per = np.bincount(comp, minlength=kl + j).astype(float)
        own = np.bincount(comp[state == 0], minlength=kl + j)
        for a in np.flatnonzero((per[:kl] - own[:kl] > own[:kl]) & (per[:kl] >= 2)):   # a theme in disguise
            b = kl + int(per[kl:].argmin())
            moved = comp == a
            comp[moved], state[moved] = b, 1
            per[b], per[a] = per[a] + per[b], 0
            mu[a] = mu[owner == owner[a]][cnt[owner == owner[a]].argmax()]
        centres = np.concatenate([mu, theme])
        for q in np.flatnonzero(per >= 1):
            centres[q] = x[comp == q].mean(0)
        mu, theme = centres[:kl], centres[kl:]
        cnt, tcnt = per[:kl] + 1e-3, per[kl:] + 1e-3
        state_cnt = np.bincount(state, minlength=3) + 1.0
        if cv and chosen is None:                                         # eq T6''
            delta, chosen = _cv_shrinkage(x[state == 0], y[state == 0], seed, group=comp[state == 0])
        cov, shrink = _shrunk_cov(x - centres[comp], delta)
    shown = np.where(state == 1, -1, owner[np.minimum(comp, kl - 1)])
    fitted = {c: (mu[owner == c], cnt[owner == c] / cnt[owner == c].sum()) for c in fitted}
    return fitted, (theme, tcnt / tcnt.sum()), cov, shrink, np.stack([state, shown], 1), chosen


def _lda_weights(fitted: dict, themes: tuple, cov: np.ndarray, means: np.ndarray, k: int, looks: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``ev.linear`` in eq T6's LDA form: z = mu^T P x - mu^T P mu / 2 + log w for each
    look (``fitted``: a present place's centres and weights) and theme (``themes``), P = ``cov``^-1."""
    prec = np.linalg.inv(cov)
    rows, bias = [], []
    for c in range(k):                          # a place without training posts: never its evidence
        mu, w = fitted[c] if c in fitted else (np.repeat(means[:1], looks, 0), np.full(looks, 1e-6))
        rows.append(mu), bias.append(np.log(w))
    rows.append(themes[0]), bias.append(np.log(themes[1]))
    mu, logw = np.concatenate(rows), np.concatenate(bias)
    pm = mu @ prec
    wgt = torch.from_numpy(pm).float()
    jitter = 1e-3 * wgt.std() * torch.randn(wgt.shape, generator=torch.Generator().manual_seed(seed))
    return wgt + jitter, torch.from_numpy(logw - 0.5 * (pm * mu).sum(1)).float()     # jitter: repeated looks can part


def _lda_start(ev: _Evidence, x: np.ndarray, y: np.ndarray, seed: int, em: bool = False,
               shrinkage: str = "ledoit_wolf", theme_starts: tuple[str, ...] = ("all",), inits: int = 1) -> list[tuple]:
    """Eq T6 for one modality: the LDA form of each look and theme for ``ev.linear`` (with several looks,
    their mixture-discriminant form: :func:`_mda_looks`; with ``em``, the states of eq T1 fitted as well,
    once per start of the themes in ``theme_starts``: :func:`_em_fit`; with ``shrinkage`` ``cv``, the
    covariance's shrinkage chosen by :func:`_cv_shrinkage`, else Ledoit-Wolf's). Returns one (what was
    fitted, each post's (state, place shown) or None without ``em``, weight, bias) per start; the fit
    before EM is shared by the starts."""
    k, looks = ev.k, ev.looks
    j = ev.linear.out_features - k * looks
    present = [c for c in range(k) if np.any(y == c)]
    means = np.zeros((k, x.shape[1]))
    means[present] = [x[y == c].mean(0) for c in present]
    delta, chosen = _cv_shrinkage(x, y, seed) if shrinkage == "cv" and (looks > 1 or not em) else (None, None)
    if looks > 1:
        fitted, cov, shrink = _mda_looks(x, y, present, means, looks, seed, delta, inits)
    else:
        cov, shrink = _shrunk_cov(x - means[y], delta)
        fitted = {c: (means[c:c + 1], np.ones(1)) for c in present}
    base = {"posts": int(len(x)), "looks": looks, "themes": j, **({"mda_rounds": MDA_ROUNDS} if looks > 1 else {}),
            **({"kmeans_starts": inits} if inits > 1 else {})}
    if not em:
        info = {"shrinkage": round(float(shrink), 4), **({"shrinkage_cv": chosen} if chosen else {}), **base}
        return [(info, None, *_lda_weights(fitted, _centres(x, j, seed, inits), cov, means, k, looks, seed))]
    fits = []
    for start in theme_starts:
        res = _em_fit(x, y, k, looks, j, fitted, cov, seed, shrinkage == "cv", start,
                      skip_fallback=bool(fits) and theme_starts[0] == "all", inits=inits)
        if res is None:                          # the places explain almost every post: the first start again
            fits.append(fits[0])
            continue
        f, themes, c, sh, states, ch = res
        info = {"shrinkage": round(float(sh), 4), **({"shrinkage_cv": ch} if ch else {}), **base, "em_rounds": EM_ROUNDS,
                "state_shares": np.round(np.bincount(states[:, 0], minlength=3) / len(x), 4).tolist()}
        fits.append((info, states, *_lda_weights(f, themes, c, means, k, looks, seed)))
    return fits


@MODELS.register("trust")
class TrustMix(nn.Module):
    """Per-post latent mixture over which modalities show the post's place (eqs T1-T5 above)."""

    reads: tuple[str, ...] = ()     # no flat SG-MFT field: dropout, classifier, token view are not used

    class Options(ArchOptions):
        hidden: int = option(0, "evidence networks: 0 = linear, > 0 = an MLP of this width plus a linear skip", ge=0)
        generic: PositiveInt = option(8, "J, learnt generic components per modality")
        states: Literal["three", "two"] = option(
            "three", "`three`: shows the place / generic / another place; `two`: place / not (eq T1)")
        gate: bool = option(True, "pi depends on similarity features (eq T4); false = a learnt constant prior")
        proj_dim: PositiveInt = option(64, "width of the text/image projections whose cosine feeds the gate")
        aux_weight: float = option(0.5, "weight of the unimodal marginal CE terms (eq T5)", ge=0)
        input_dropout: float = option(0.1, "dropout on the scaled features before the evidence networks",
                                      ge=0, lt=1)
        looks: PositiveInt = option(1, "L, looks per place: l_m(c) = logsumexp over L linear scores (eq T0)")
        conflict: Literal["uniform", "learnt"] = option(
            "uniform", "which other place a contradicting modality shows: `uniform` (eq T1) or a learnt "
            "K x K table Q_m(c | y) per modality (eq T1')")
        table_scale: float = option(
            1.0, "the logits of Q_m (eq T1') and of the state prior (eq T3) are table_scale x their parameters, "
            "so the optimiser moves them table_scale times faster", gt=0)
        init: Literal["random", "lda", "em"] = option(
            "random", "`lda`: before training, each evidence network starts as the modality's shrinkage LDA "
            "(eq T6: Gaussian looks and generic themes with one shrinkage covariance, fitted on the training "
            "split; with several looks, by mixture discriminant analysis); `em`: the same, then eq T1's states "
            "fitted by classification EM (looks, generic themes, covariance, state prior and conflict tables; "
            "with `states: two`, as `lda`); "
            "`random`: PyTorch's default initialisation")
        start_shrinkage: Literal["cv", "ledoit_wolf"] = option(
            "ledoit_wolf", "with `init: lda` or `em`, the shrinkage of the start's within-place covariance: `cv` (eq T6'', "
            "regularised discriminant analysis), the intensity whose Gaussian classifier classifies held-out training "
            "posts best, where it beats Ledoit-Wolf's by more than one standard error (with `em`, chosen again on the "
            "posts the first EM round finds showing their place); `ledoit_wolf`, Ledoit-Wolf's")
        theme_start: Literal["all", "unexplained", "best"] = option(
            "all", "with `init: em`, where EM's generic themes start (eq T6'): `all`, k-means centres of all the "
            "modality's posts; `unexplained`, of the posts whose nearest look belongs to another place than their "
            "label; `best`, EM from both, keeping the start that classifies the validation posts better (the higher "
            "accuracy, then the lower cross-entropy); with fewer than 500 validation posts, `all`")
        start_inits: PositiveInt = option(
            1, "with `init: lda` or `em`, k-means starts for each place's looks and for the generic themes; the "
            "lowest-inertia one is kept (1: one start, seeded)")
        evidence_lr: float = option(
            1.0, "the evidence networks' learning rate, as a multiple of train.lr (0: they stay as initialised)",
            ge=0)
        table_lr: float = option(
            1.0, "the state prior's (eq T3) and the conflict tables' (eq T1') learning rate, as a multiple of train.lr "
            "(0: they stay as initialised; with `init: em`, EM's counts)", ge=0)
        label_noise: float = option(
            0.0, "epsilon of eq T7: training maximises log[(1 - epsilon) p(y | x) + epsilon / K], a label that is "
            "wrong with probability epsilon, so mislabelled posts are not explained as contradictions; 0 = plain "
            "cross-entropy", ge=0, lt=1)

        def unread(self) -> dict[str, str]:
            """Options that these values make dead: the gate's projections without the gate, the start's
            settings without a fitted start, the conflict tables and EM's themes without three states."""
            out = {}
            if not self.gate:
                out["proj_dim"] = "gate is true"
            if self.init == "random":
                out["start_shrinkage"] = out["start_inits"] = "init is lda or em"
            if self.init != "em" or self.states != "three":
                out["theme_start"] = "init is em and states is three"
            if self.states != "three":
                out["conflict"] = "states is three"
            return out

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.opt = o = head_options(cfg, self.Options)
        k, j = cfg.num_classes, int(o["generic"])
        scale = cfg.resolved_input_scale()
        self.text_in, self.image_in = ModalityInput(cfg.dim, scale, "text"), ModalityInput(cfg.dim, scale, "image")
        ev = (cfg.dim, k, j, int(o["hidden"]), float(o["input_dropout"]), int(o["looks"]))
        self.ev_t, self.ev_v = _Evidence(*ev), _Evidence(*ev)
        self.n_states = 3 if o["states"] == "three" else 2
        self.table_scale = float(o["table_scale"])
        if o["conflict"] == "learnt" and self.n_states == 3:        # Q_t, Q_v of eq T1', uniform at start
            self.conflict_t, self.conflict_v = nn.Parameter(torch.zeros(k, k)), nn.Parameter(torch.zeros(k, k))
        else:
            self.conflict_t = self.conflict_v = None
        ns2 = self.n_states ** 2
        self.log_prior = nn.Parameter(torch.zeros(ns2))
        self.bias = nn.Parameter(torch.zeros(k))
        if o["gate"]:
            self.proj_t = nn.Linear(cfg.dim, int(o["proj_dim"]))
            self.proj_v = nn.Linear(cfg.dim, int(o["proj_dim"]))
            self.gate = nn.Linear(7, ns2)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        else:
            self.gate = None

    # -- eq T1 --------------------------------------------------------------------------
    def state_evidence(self, l: torch.Tensor, g: torch.Tensor, conflict: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, K): a_m^s(y) for s in (inf, gen[, oth]).

        ``conflict`` (K, K), if learnt: logits of Q_m(c | y), which other place c the modality shows
        when the post's place is y ("missing the beach", posted from home). Then
        a_m^oth(y) = logsumexp_{c != y} [l_m(c) + log Q_m(c | y)] (eq T1'); with Q uniform this is
        eq T1's logsumexp_{c != y} l_m(c) - log(K-1).
        """
        k = l.shape[-1]
        parts = [l, g.logsumexp(-1, keepdim=True).expand_as(l)]
        if self.n_states == 3:
            eye = torch.eye(k, dtype=torch.bool, device=l.device)
            if conflict is None:
                others = l.unsqueeze(1).masked_fill(eye, float("-inf"))    # (B, y, c): c != y
                parts.append(others.logsumexp(-1) - math.log(k - 1))
            else:
                log_q = torch.log_softmax((self.table_scale * conflict).masked_fill(eye, float("-inf")), dim=-1)
                parts.append((l.unsqueeze(1) + log_q).logsumexp(-1))                        # eq T1'
        return torch.stack(parts, dim=1)

    # -- eqs T3, T4 ---------------------------------------------------------------------
    def log_pi(self, t, v, lt, gt, lv, gv) -> torch.Tensor:
        """(B, S*S) log pi(s_t, s_v | x), row-major over (s_t, s_v)."""
        prior = (self.table_scale * self.log_prior).expand(t.shape[0], -1)          # eq T3
        if self.gate is not None:
            cos = F.cosine_similarity(self.proj_t(t), self.proj_v(v), dim=-1)
            pt, pv = torch.softmax(lt, -1), torch.softmax(lv, -1)
            agree = (pt * pv).sum(-1)
            margin_t = lt.logsumexp(-1) - gt.logsumexp(-1)
            margin_v = lv.logsumexp(-1) - gv.logsumexp(-1)
            feats = torch.stack([cos, agree, pt.amax(-1), pv.amax(-1),
                                 torch.tanh(margin_t / 4), torch.tanh(margin_v / 4), cos * agree], dim=-1)
            prior = prior + self.gate(feats)
        return torch.log_softmax(prior, dim=-1)

    def forward(self, text, image, text_mask=None, image_mask=None) -> HeadOutput:
        t, v = self.text_in(text, text_mask), self.image_in(image, image_mask)
        lt, gt = self.ev_t(t)
        lv, gv = self.ev_v(v)
        at, av = self.state_evidence(lt, gt, self.conflict_t), self.state_evidence(lv, gv, self.conflict_v)
        if text_mask is not None:                                           # absent: no evidence
            at = at * text_mask.to(at.dtype)[:, None, None]
        if image_mask is not None:
            av = av * image_mask.to(av.dtype)[:, None, None]
        s = self.n_states
        log_pi = self.log_pi(t, v, lt, gt, lv, gv).view(-1, s, s)            # (B, s_t, s_v)
        joint = log_pi[..., None] + at[:, :, None, :] + av[:, None, :, :]    # (B, s_t, s_v, K)
        logits = joint.flatten(1, 2).logsumexp(1) + self.bias               # eq T2
        post = torch.softmax(joint.flatten(1, 2).logsumexp(-1), dim=-1)     # p(s_t, s_v | x)
        fused = torch.cat([lt, gt.logsumexp(-1, keepdim=True), lv, gv.logsumexp(-1, keepdim=True), post], -1)
        # p(s_t, s_v | x, y = the predicted place): which modality shows *that* place (the per-post account)
        top = logits.argmax(-1)
        at_top = joint.flatten(1, 2).gather(-1, top[:, None, None].expand(-1, joint.shape[1] * joint.shape[2], 1))
        extras = {"state_posterior": post, "state_posterior_pred": torch.softmax(at_top.squeeze(-1), dim=-1)}
        if self.opt["aux_weight"] > 0:
            # eq T5: each modality alone, the other one summed out of the mixture
            pi_t, pi_v = log_pi.logsumexp(2), log_pi.logsumexp(1)           # (B, s)
            extras["logits_text"] = (pi_t[..., None] + at).logsumexp(1) + self.bias
            extras["logits_image"] = (pi_v[..., None] + av).logsumexp(1) + self.bias
        return HeadOutput(logits=logits, fused=fused, extras=extras)

    def param_groups(self, lr: float) -> list[dict]:
        """Adam parameter groups: the evidence networks at ``evidence_lr`` x lr, the state prior and conflict
        tables at ``table_lr`` x lr, the rest at lr. A group at 0 is left out, so its parameters keep their start."""
        ev = [p for p in (*self.ev_t.parameters(), *self.ev_v.parameters()) if p.requires_grad]
        tables = [p for p in (self.log_prior, self.conflict_t, self.conflict_v) if p is not None and p.requires_grad]
        if float(self.opt["table_lr"]) == 1:                   # at lr: with the rest, in the same order as before
            tables = []
        ids = {id(p) for p in (*ev, *tables)}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest}]
        for params, scale in ((ev, float(self.opt["evidence_lr"])), (tables, float(self.opt["table_lr"]))):
            if scale > 0 and params:
                groups.append({"params": params, "lr": lr * scale})
        return groups

    # -- eq T6: a generative start ------------------------------------------------------
    @property
    def wants_data_init(self) -> bool:
        """Whether training should call :meth:`init_from_data` (``init: lda`` or ``em``) before the first step."""
        return self.opt["init"] in ("lda", "em")

    @torch.no_grad()
    def init_from_data(self, batch: dict, seed: int = 0, val_batch: dict | None = None) -> dict | None:
        """With ``init: lda`` or ``em``, set each evidence network to the modality's shrinkage LDA (eq T6):

            z_m(c, l) = mu_cl^T P x - mu_cl^T P mu_cl / 2 + log w_cl,    h_m(j) = the same for theme j

        with P the inverse of the shrinkage within-place covariance of the normalised inputs (Ledoit-Wolf's, or
        with ``start_shrinkage: cv`` an intensity chosen by cross-validation: :func:`_cv_shrinkage`, eq T6''),
        mu_cl the k-means centres of place c's training posts (its looks, weights w_cl; with L > 1 found
        in the whitened space by mixture discriminant analysis, :func:`_mda_looks`), the generic
        themes the k-means centres of all the modality's posts (with ``init: em``, the looks, themes,
        covariance, state prior and conflict tables fitted by :func:`_em_fit`, its themes started as ``theme_start``
        says; ``best``: from both starts, keeping the one that classifies ``val_batch`` better, :meth:`_choose_start`;
        without ``val_batch``, which training passes only with at least 500 validation posts, the first), and
        b_y = log p(y). Gradient steps
        start from there. A discriminative linear layer needs many posts to find the directions that a
        shared-covariance Gaussian model estimates in closed form (docs/design.md, "The default model").
        Returns what was fitted (run.json), or None with ``init: random``."""
        if not self.wants_data_init:
            return None
        y_all = batch["label"].numpy()
        em = self.opt["init"] == "em" and self.n_states == 3
        best = self.opt["theme_start"] == "best"
        if not em:
            starts = ("all",)                        # without EM the themes are eq T6's k-means of all posts
        elif best:                                   # too few validation posts to choose on: the first start only
            starts = ("all", "unexplained") if val_batch is not None else ("all",)
        else:
            starts = (self.opt["theme_start"],)
        fits = {}                                    # modality -> (rows with it, one fit per start of the themes)
        for key, inp, ev in (("text", self.text_in, self.ev_t), ("image", self.image_in, self.ev_v)):
            mask = batch.get(f"{key}_mask")
            keep = np.ones(len(y_all), bool) if mask is None else mask.bool().numpy()
            x, places = inp(batch[key], None).double().numpy()[keep], len(np.unique(y_all[keep]))
            if places < 2 or len(x) <= places:
                fits[key] = ({"posts": int(len(x)), "fitted": False}, None)   # too few posts with this modality
                continue
            if not np.ptp(x, 0).any():               # the same features on every post: nothing to fit
                fits[key] = ({"posts": int(len(x)), "fitted": False, "why": "the same features on every post"}, None)
                continue
            fits[key] = (keep, _lda_start(ev, x, y_all[keep], seed, em, self.opt["start_shrinkage"], starts,
                                          int(self.opt["start_inits"])))
        if not any(f[1] for f in fits.values()):                 # nothing fitted: nothing to choose between
            starts = starts[:1]
        kept, record = self._choose_start(fits, y_all, starts, batch, val_batch) if len(starts) > 1 else (0, None)
        info = self._apply_start(fits, y_all, kept)
        if record is not None:
            info["theme_start"] = record
        elif best and em:
            info["theme_start"] = {"chosen": "all", "rule": "too few validation posts to choose on: the first start"}
        return info

    def _choose_start(self, fits: dict, y_all: np.ndarray, starts: tuple, batch: dict,
                      val_batch: dict) -> tuple[int, dict]:
        """Which of EM's starts of the themes to keep (``theme_start: best``, docs/design.md item 16): the one whose
        start alone classifies the validation posts best (accuracy, then cross-entropy; the first start on a full
        tie), since the trained model stays close to its start. Returns the index and the record for run.json."""
        scores = []
        for i in range(len(starts)):
            self._apply_start(fits, y_all, i)
            scores.append((self._cross_entropy(batch)[0], *self._cross_entropy(val_batch)))
        kept = min(range(len(starts)), key=lambda i: (-scores[i][2], scores[i][1], i))
        return kept, {"chosen": starts[kept], "rule": "higher validation accuracy, then lower validation cross-entropy",
                      "validation_accuracy": {s: round(100 * v[2], 2) for s, v in zip(starts, scores)},
                      "validation_cross_entropy": {s: round(v[1], 4) for s, v in zip(starts, scores)},
                      "training_cross_entropy": {s: round(v[0], 4) for s, v in zip(starts, scores)}}

    def _apply_start(self, fits: dict, y_all: np.ndarray, i: int) -> dict:
        """Write start ``i`` of each modality's fits (:func:`_lda_start`) into the evidence networks, b_y = log p(y),
        and with EM's states the state prior and conflict tables (:meth:`_state_start`). Returns what was fitted."""
        info, states = {}, {}
        for key, ev in (("text", self.ev_t), ("image", self.ev_v)):
            keep, per_start = fits[key]
            if per_start is None:                    # not fitted: ``keep`` says why
                info[key] = keep
                continue
            info[key], st, weight, bias = per_start[i]
            ev.linear.weight.copy_(weight)
            ev.linear.bias.copy_(bias)
            if st is not None:
                states[key] = np.full((len(y_all), 2), -1)
                states[key][keep] = st
        counts = np.bincount(y_all, minlength=self.cfg.num_classes) + 1.0
        self.bias.copy_(torch.from_numpy(np.log(counts / counts.sum())).float())
        if len(states) == 2:
            info["joint_states"] = self._state_start(y_all, states["text"], states["image"])
        return info

    def _cross_entropy(self, batch: dict) -> tuple[float, float]:
        """The model's cross-entropy (eq T2, no dropout) and accuracy on ``batch``'s posts."""
        was = self.training
        self.eval()
        out = self(batch["text"], batch["image"], batch.get("text_mask"), batch.get("image_mask"))
        self.train(was)
        y = batch["label"]
        return float(F.cross_entropy(out.logits, y)), float((out.logits.argmax(-1) == y).float().mean())

    @torch.no_grad()
    def _state_start(self, y: np.ndarray, st_t: np.ndarray, st_v: np.ndarray) -> list:
        """With ``init: em`` (eq T6'): the state prior (eq T3) from the joint counts of the fitted states, and the
        conflict tables Q_m(c | y) (eq T1') from the places the contradicting posts showed."""
        both = (st_t[:, 0] >= 0) & (st_v[:, 0] >= 0)
        joint = np.bincount(st_t[both, 0] * 3 + st_v[both, 0], minlength=9) + 1.0
        self.log_prior.copy_(torch.from_numpy(np.log(joint / joint.sum()) / self.table_scale).float())
        k = self.cfg.num_classes
        for table, st in ((self.conflict_t, st_t), (self.conflict_v, st_v)):
            if table is None:
                continue
            oth = st[:, 0] == 2
            q = np.full((k, k), 0.5)
            np.add.at(q, (y[oth], st[oth, 1]), 1.0)
            table.copy_(torch.from_numpy(np.log(q) / self.table_scale).float())
        return np.round(joint / joint.sum(), 4).tolist()

    # -- eq T7: a label that is wrong with probability epsilon -------------------------------
    def nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean -log[(1 - eps) softmax(logits)_y + eps / K] (eq T7); plain cross-entropy when eps = 0."""
        eps = float(self.opt["label_noise"])
        if eps <= 0:
            return F.cross_entropy(logits, labels)
        clean = math.log1p(-eps) - F.cross_entropy(logits, labels, reduction="none")
        return -torch.logaddexp(clean, clean.new_tensor(math.log(eps / logits.shape[-1]))).mean()

    def loss_fn(self, out: HeadOutput, labels: torch.Tensor) -> torch.Tensor:
        """The fused term of the training loss: eq T7's likelihood of the observed label."""
        return self.nll(out.logits, labels)

    def aux_loss_fn(self, out: HeadOutput, labels: torch.Tensor) -> torch.Tensor:
        w = float(self.opt["aux_weight"])
        if w <= 0:
            return out.logits.new_zeros(())
        e = out.extras
        return w * (self.nll(e["logits_text"], labels) + self.nll(e["logits_image"], labels))
