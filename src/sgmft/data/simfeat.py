"""SimFeat: a synthetic benchmark of post features with a known Bayes-optimal accuracy.

The real Weibo data of the paper is private and no CLIP weights are available offline, so
sgmft's embedded default dataset is drawn from an explicit generative model that mimics
what SG-MFT is meant to handle (see docs/simfeat.md):

* **Shared space with a modality gap.** Class content lives in a ``content_dim``-dimensional
  subspace of R^D shared by both modalities. A class's image prototype is its text
  prototype partly rotated towards an image-specific direction (cosine ``alignment``), and
  the two modality clouds are offset by a constant vector of norm ``modality_gap``.
* **Heterogeneity regimes.** Each post is ``both`` (text and image show its place),
  ``text`` (only the text does), ``image`` or ``neither``. An uninformative modality shows
  plausible but unrelated content: a random class's prototype (probability
  ``distractor_class_prob``) or one of ``num_generic`` generic themes (selfies, memes, ...).
* **Users.** ``num_users`` authors, each with their own class mix (Dirichlet), so
  user-disjoint splits are meaningful. Features do not depend on the user given the class.
* **Label noise.** A fraction ``label_noise`` of labels is redrawn uniformly at random.
* **CLIP-like storage.** Stored features are the L2-normalised latent vectors, float32.
* **Held-out phenomena** (issue 17, off by default): spiked (anisotropic) noise inside and
  outside the content subspace, places with several looks per modality, conflict tables that
  make the distractor place depend on the post's place, 10 places. The ``aniso``, ``looks``,
  ``conflict``, ``wide`` and ``wide768`` profiles combine them (docs/simfeat.md).

Latent text vector: ``t = E @ (s_t * P_T[c_t] + nu_t * z) + m + (gap/2) * g + sigma * n``,
with ``E`` an orthonormal basis of the content subspace, ``c_t`` the post's text component
(its class, a random class, or a generic theme), ``z`` standard normal in the content
subspace, ``m`` a mean shared by both modalities (norm ``common_offset``), ``g`` the unit
gap direction (``m`` and ``g`` orthogonal to the content) and ``n`` isotropic noise
orthogonal to the content, scaled so ``sigma^2 * D = nuisance``. The image is the same with
its own prototypes and ``-(gap/2) * g``. All prototypes have the same norm, so only
the content coordinates ``E^T t`` carry class information and the norm of ``t``
concentrates (relative spread ~ 1/sqrt(2D)).

**The oracle.** :func:`generate_simfeat` computes the exact posterior p(y | t, i) of this
model (a mixture over regimes and components, in float64 with log-sum-exp), and reports
its test accuracy against the observed noisy labels, the text-only p(y | t) and image-only
p(y | i) counterparts, and their Monte-Carlo expectations. Stored features are a
deterministic function of the latents, so by the data-processing inequality no model on the
stored features can beat the oracle in expectation; the bound is tight because a plug-in
posterior computed from the stored float32 features (``stored_feature_test_accuracy``)
matches it.
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sgmft.labels import DEFAULT_LABELS

__all__ = ["REGIMES", "FINE_REGIMES", "PROFILES", "EXTRA_LABELS", "label_names", "SimFeatConfig",
           "SimFeatData", "generate_simfeat", "write_simfeat", "oracle_posteriors", "profile_config",
           "regime_names", "proxy_report", "textbook_report"]

# Coarse regimes (which modalities show the post's place); the ``default`` profile uses these.
REGIMES: tuple[str, ...] = ("both", "text", "image", "neither")
# Fine regimes (``fine_regimes=True``): an uninformative modality is named by what it shows,
# a generic theme or another place than the post's.  ``text_generic``: the text is generic
# and only the image shows the place; ``image_other_place``: the image shows another place
# than the (informative) text; ``neither``: no modality shows the post's place.
FINE_REGIMES: tuple[str, ...] = ("both", "text_generic", "text_other_place", "image_generic",
                                 "image_other_place", "neither")


@dataclass(frozen=True)
class SimFeatConfig:
    """All knobs of the generator. Defaults: the paper's scale, tuned so the oracle is
    ~88 %, each single-modality oracle is >= 10 points lower, and the oracle is learnable
    from the 13,600 training posts (docs/simfeat.md has the measurements)."""

    num_posts: int = 17000          # posts in total (paper: 17,000)
    dim: int = 1024                 # feature width D (Chinese-CLIP ViT-H/14: 1024)
    num_classes: int = 8            # places; named after sgmft.labels.DEFAULT_LABELS when 8
    num_users: int = 103            # authors (paper: 103)
    test_size: int = 3400           # stratified test posts (paper: 20 %); the rest is train
    # heterogeneity regimes (must sum to 1)
    p_both: float = 0.55            # text and image both show the place
    p_text_only: float = 0.20       # only the text does
    p_image_only: float = 0.20      # only the image does
    p_neither: float = 0.05         # neither does
    distractor_class_prob: float = 0.20  # uninformative modality shows a random class (else a generic theme)
    num_generic: int = 8            # generic themes per modality (selfie, meme, food photo, ...)
    label_noise: float = 0.05       # fraction of labels redrawn uniformly over the classes
    # geometry of the latent space (units: prototype norm = signal)
    content_dim: int = 16           # dimension of the shared content subspace
    text_signal: float = 1.0        # norm of text prototypes
    image_signal: float = 1.0       # norm of image prototypes
    text_noise: float = 0.15        # within-class std per content dimension, text
    image_noise: float = 0.15       # within-class std per content dimension, image
    alignment: float = 0.8          # cosine between a class's text and image prototypes
    modality_gap: float = 1.0       # distance between the text and image cloud centres
    common_offset: float = 0.7      # norm of a mean vector shared by both modalities (CLIP's cone)
    nuisance: float = 0.5           # energy sigma^2 * D of the isotropic class-free noise
    # users
    user_concentration: float = 1.0  # Dirichlet concentration of each user's class mix
    user_activity: float = 1.0       # Dirichlet concentration of users' posting shares
    # oracle
    mc_samples: int = 200_000       # Monte-Carlo draws for the expected oracle accuracy
    seed: int = 0
    # -- added with profiles (the defaults keep the original generator, bit for bit)
    text_distractor_prob: float = -1.0   # P(uninformative text shows a place); < 0: distractor_class_prob
    image_distractor_prob: float = -1.0  # P(uninformative image shows a place); < 0: distractor_class_prob
    distractor_excludes_label: bool = False  # a distractor place is *another* place than the post's
                                             # (uniform over the K - 1 others); False: any place
    fine_regimes: bool = False      # name regimes by what each uninformative modality shows (FINE_REGIMES)
    profile: str = "default"        # the PROFILES entry this config was built from (a record only)
    # -- phenomena of real CLIP features (issue 17; all off by default, docs/simfeat.md)
    # anisotropic ("spiked") noise: a few directions carry much more variance than the rest
    content_spikes: int = 0         # directions of the content subspace whose noise std is x content_spike_scale
    content_spike_scale: float = 1.0  # std multiplier of those directions (both modalities, same directions)
    outside_spikes: int = 0         # class-free directions outside the content with std outside_spike_std
    outside_spike_std: float = 0.0  # their std (latent units; the prototypes have norm 1)
    # places with several looks (a restaurant photo shows food, a table or a sign)
    text_looks: int = 1             # prototypes per place, text
    image_looks: int = 1            # prototypes per place, image
    look_cosine: float = 0.6        # cosine between a look and its place's centre (looks share this much)
    look_concentration: float = 0.0  # Dirichlet concentration of each place's look weights; <= 0: uniform
    # structured conflicts: the place a distractor shows depends on the post's place
    conflict_concentration: float = 0.0  # > 0: per place and modality, P(distractor place | y) ~ Dirichlet;
                                         # <= 0: uniform (the original)

    def distractor_prob(self, modality: str) -> float:
        """P(an uninformative ``modality`` shows a place rather than a generic theme)."""
        q = self.text_distractor_prob if modality == "text" else self.image_distractor_prob
        return self.distractor_class_prob if q < 0 else q

    @property
    def regimes(self) -> tuple[str, ...]:
        """The regime names this config's posts can carry (REGIMES or FINE_REGIMES)."""
        return FINE_REGIMES if self.fine_regimes else REGIMES

    def __post_init__(self) -> None:
        probs = (self.p_both, self.p_text_only, self.p_image_only, self.p_neither)
        if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            raise InputError(f"regime probabilities must be >= 0 and sum to 1, got {probs}")
        if not 0 <= self.label_noise <= 1 or not 0 <= self.distractor_class_prob <= 1:
            raise InputError("label_noise and distractor_class_prob must be in [0, 1]")
        for m in ("text", "image"):
            if self.distractor_prob(m) > 1:
                raise InputError(f"{m}_distractor_prob must be <= 1 (or < 0 for distractor_class_prob)")
            if self.num_generic < 1 and self.distractor_prob(m) < 1:
                raise InputError("num_generic must be >= 1 unless every distractor probability is 1")
        if self.content_dim < 1 or self.content_dim + 2 >= self.dim:
            raise InputError(f"need 1 <= content_dim and content_dim + 2 < dim, got content_dim={self.content_dim}, "
                             f"dim={self.dim} (raise dim above {self.content_dim + 2}, or set content_dim)")
        if not 0 < self.test_size < self.num_posts:
            raise InputError(f"SimFeat: need 0 < test_size < num_posts, got test_size={self.test_size}, "
                             f"num_posts={self.num_posts} (set test_size, e.g. 20 % of num_posts)")
        if self.num_classes < 2 or self.num_users < 1:
            raise InputError("need num_classes >= 2 and num_users >= 1")
        if min(self.text_noise, self.image_noise) <= 0 or self.nuisance < 0:
            raise InputError("text_noise, image_noise must be > 0 and nuisance >= 0")
        if not -1 <= self.alignment <= 1:
            raise InputError("alignment is a cosine, in [-1, 1]")
        self._check_phenomena()

    def _check_phenomena(self) -> None:
        if not 0 <= self.content_spikes <= self.content_dim or self.content_spike_scale <= 0:
            raise InputError(f"content_spikes must be in [0, content_dim={self.content_dim}] and "
                             f"content_spike_scale > 0, got {self.content_spikes}, {self.content_spike_scale}")
        if self.outside_spikes < 0 or self.outside_spike_std < 0 or \
                self.content_dim + 2 + self.outside_spikes >= self.dim:
            raise InputError(f"need outside_spikes >= 0, outside_spike_std >= 0 and content_dim + 2 + "
                             f"outside_spikes < dim, got {self.outside_spikes}, {self.outside_spike_std}, "
                             f"content_dim={self.content_dim}, dim={self.dim}")
        if min(self.text_looks, self.image_looks) < 1 or not 0 <= self.look_cosine <= 1:
            raise InputError(f"text_looks and image_looks must be >= 1 and look_cosine in [0, 1], got "
                             f"{self.text_looks}, {self.image_looks}, {self.look_cosine}")
        if self.conflict_concentration > 0 and self.distractor_excludes_label and self.num_classes < 3:
            raise InputError("conflict_concentration needs num_classes >= 3 with distractor_excludes_label")


# Named profiles: SimFeatConfig field overrides (docs/simfeat.md, "Profiles").
PROFILES: dict[str, dict] = {
    # The original SimFeat, unchanged bit for bit: a 16-dim class subspace, symmetric regimes,
    # an uninformative modality shows a random place or a generic theme.
    "default": {},
    # Heterogeneity is the hard part: generic and contradicting modalities are common, the
    # image shows another place than the text far more often than the text does (a home
    # photo on an "at the cinema" post), class content is spread over a wide subspace and
    # noisier. Tuned so that at the paper's scale the oracle beats concatenation by > 6 points.
    "hetero": dict(
        p_both=0.45, p_text_only=0.28, p_image_only=0.22, p_neither=0.05,
        text_distractor_prob=0.03, image_distractor_prob=0.55, distractor_excludes_label=True,
        fine_regimes=True, num_generic=16, content_dim=256, text_noise=0.2, image_noise=0.2),
    # -- held-out phenomena of real CLIP features (issue 17; docs/simfeat.md says why each constant)
    # CLIP's narrow cone at ViT-L/14's width: a large shared mean and modality gap (centres 0.8
    # apart on the sphere, as measured for CLIP), 4 of the 32 class-content directions with 4x
    # the noise std, 8 class-free directions carrying 80 % of the class-free variance.
    # Regimes as in `default`.
    "aniso": dict(
        dim=768, content_dim=32, text_noise=0.2, image_noise=0.2, common_offset=2.0, modality_gap=3.0,
        content_spikes=4, content_spike_scale=4.0, outside_spikes=8, outside_spike_std=0.5),
    # Places with several looks at ViT-B/16's width: 2 kinds of text per place (the place, the
    # activity), 3 kinds of photo (a restaurant: food, a table, the sign), uneven look weights.
    "looks": dict(
        dim=512, content_dim=48, text_noise=0.2, image_noise=0.2,
        text_looks=2, image_looks=3, look_cosine=0.5, look_concentration=2.0),
    # Conflicts both ways: the text names another place as often as the image shows one, and
    # which place a distractor shows depends on the post's place ("missing the beach", posted
    # from home). Generic texts and images too.
    "conflict": dict(
        p_both=0.5, p_text_only=0.2, p_image_only=0.2, p_neither=0.1,
        text_distractor_prob=0.4, image_distractor_prob=0.4, distractor_excludes_label=True,
        conflict_concentration=0.3, fine_regimes=True, num_generic=16, content_dim=128,
        text_noise=0.2, image_noise=0.2),
    # Everything at once with 10 places (+ hospital, park), at the paper's width.
    "wide": dict(
        num_classes=10, p_both=0.5, p_text_only=0.2, p_image_only=0.2, p_neither=0.1,
        text_distractor_prob=0.4, image_distractor_prob=0.4, distractor_excludes_label=True,
        conflict_concentration=0.5, fine_regimes=True, num_generic=16, content_dim=64,
        text_noise=0.2, image_noise=0.2, common_offset=2.0, modality_gap=3.0,
        content_spikes=4, content_spike_scale=3.0, outside_spikes=8, outside_spike_std=0.4,
        text_looks=2, image_looks=3, look_cosine=0.5, look_concentration=2.0),
    # Everything with 10 places at width 768, other constants: more looks in text than in
    # images, stronger spikes, the image more often the distractor, noisier content.
    "wide768": dict(
        dim=768, num_classes=10, p_both=0.45, p_text_only=0.25, p_image_only=0.2, p_neither=0.1,
        text_distractor_prob=0.3, image_distractor_prob=0.5, distractor_excludes_label=True,
        conflict_concentration=1.0, fine_regimes=True, num_generic=12, content_dim=96,
        text_noise=0.25, image_noise=0.25, common_offset=2.5, modality_gap=3.0,
        content_spikes=6, content_spike_scale=5.0, outside_spikes=12, outside_spike_std=0.3,
        text_looks=3, image_looks=2, look_cosine=0.4, look_concentration=1.0),
}


def profile_config(name: str = "default", **overrides) -> SimFeatConfig:
    """The SimFeatConfig of profile ``name`` (a PROFILES key), with ``overrides`` on top."""
    if name not in PROFILES:
        raise InputError(f"unknown SimFeat profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}")
    from sgmft.config import build_config   # unknown fields and bad values: one ConfigError shape

    return build_config(SimFeatConfig, {**PROFILES[name], **overrides, "profile": name}, f"SimFeat profile {name!r}")


@dataclass
class SimFeatData:
    """One generated dataset. Rows of every array describe the same post."""

    ids: np.ndarray             # (N,) str
    users: np.ndarray           # (N,) str
    text: np.ndarray            # (N, D) float32, unit L2 norm
    image: np.ndarray           # (N, D) float32, unit L2 norm
    labels: np.ndarray          # (N,) int64, observed (noisy) labels
    split: np.ndarray           # (N,) str, 'train' / 'test'
    regime: np.ndarray          # (N,) str, one of REGIMES
    label_names: list[str]
    oracle: dict                # oracle accuracies, see generate_simfeat
    clean_labels: np.ndarray    # (N,) int64, labels before label noise
    oracle_posterior: np.ndarray  # (N, K) float32, exact p(y | latent text, latent image)
    config: SimFeatConfig = field(default_factory=SimFeatConfig)


# --------------------------------------------------------------------------- structure
class _Model:
    """The random but fixed parts of the distribution: prototypes, subspace, user mixes."""

    def __init__(self, cfg: SimFeatConfig, rng: np.random.Generator):
        K, G, r = cfg.num_classes, max(cfg.num_generic, 0), cfg.content_dim
        unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        text_cls = unit(rng.standard_normal((K, r)))
        image_own = rng.standard_normal((K, r))
        image_own -= np.sum(image_own * text_cls, 1, keepdims=True) * text_cls  # orthogonal part
        a = cfg.alignment
        image_cls = a * text_cls + math.sqrt(1 - a * a) * unit(image_own)
        # component tables: rows 0..K-1 are classes, K..K+G-1 generic themes (all unit norm)
        self.text_comp = np.vstack([text_cls, unit(rng.standard_normal((G, r)))]) if G else text_cls
        self.image_comp = np.vstack([unit(image_cls), unit(rng.standard_normal((G, r)))]) if G \
            else unit(image_cls)
        # orthonormal basis: content subspace (r columns), gap direction, common direction
        q, _ = np.linalg.qr(rng.standard_normal((cfg.dim, r + 2)))
        self.basis, self.gap_dir, self.common_dir = q[:, :r], q[:, r], q[:, r + 1]
        self.user_share = rng.dirichlet(np.full(cfg.num_users, cfg.user_activity))
        self.user_mix = rng.dirichlet(np.full(K, cfg.user_concentration), size=cfg.num_users)
        self.prior = self.user_share @ self.user_mix              # marginal p(y)
        # log weight of each component under an uninformative modality: a place (uniform over
        # all K, or over the K - 1 places other than the label) or a generic theme
        k_other = K - 1 if cfg.distractor_excludes_label else K

        def log_weights(q_cls):
            with np.errstate(divide="ignore"):
                return np.log(np.concatenate([np.full(K, q_cls / k_other),
                                              np.full(G, (1 - q_cls) / G if G else 0.0)]))

        self.log_uninf_text = log_weights(cfg.distractor_prob("text"))
        self.log_uninf_image = log_weights(cfg.distractor_prob("image"))
        self.log_uninf = self.log_uninf_text  # the original single table (text == image by default)
        with np.errstate(divide="ignore"):
            self.log_regime = np.log(np.array([cfg.p_both, cfg.p_text_only,
                                               cfg.p_image_only, cfg.p_neither]))
        self._add_phenomena(cfg, rng)

    def _add_phenomena(self, cfg: SimFeatConfig, rng: np.random.Generator) -> None:
        """Looks, spiked noise and structured conflicts (issue 17). Each draws from ``rng`` only
        when switched on, after every original draw, so the original generator is unchanged."""
        K, r = cfg.num_classes, cfg.content_dim
        self.looks, self.log_look_w, self.precision, self.log_conflict = {}, {}, {}, {}
        for m, M in (("text", cfg.text_looks), ("image", cfg.image_looks)):
            centre = self.comp(m)[:K]
            if M == 1:
                self.looks[m], self.log_look_w[m] = centre[:, None, :], np.zeros((K, 1))
                continue
            # look (k, j) = b * centre_k + sqrt(1 - b^2) * o_kj, o_kj a unit vector orthogonal to centre_k
            o = rng.standard_normal((K, M, r))
            o -= np.sum(o * centre[:, None], 2, keepdims=True) * centre[:, None]
            o /= np.linalg.norm(o, axis=2, keepdims=True)
            b = cfg.look_cosine
            self.looks[m] = b * centre[:, None, :] + math.sqrt(1 - b * b) * o
            w = rng.dirichlet(np.full(M, cfg.look_concentration), size=K) if cfg.look_concentration > 0 \
                else np.full((K, M), 1.0 / M)
            with np.errstate(divide="ignore"):                 # a weight may underflow to 0
                self.log_look_w[m] = np.log(w)
        # spiked covariance (Johnstone 2001): Sigma_m = nu_m^2 (I + U diag(kappa^2 - 1) U^T) in the content
        self.spike_dirs = np.linalg.qr(rng.standard_normal((r, cfg.content_spikes)))[0] \
            if cfg.content_spikes else None
        for m, nu in (("text", cfg.text_noise), ("image", cfg.image_noise)):
            if self.spike_dirs is None:
                self.precision[m] = None
                continue
            u, kappa = self.spike_dirs, cfg.content_spike_scale
            self.precision[m] = (np.eye(r) + (kappa ** -2 - 1) * (u @ u.T)) / nu ** 2   # Sigma_m^{-1}
        self.outside_dirs = np.zeros((cfg.dim, 0))
        if cfg.outside_spikes:
            known = np.column_stack([self.basis, self.gap_dir, self.common_dir])
            v = rng.standard_normal((cfg.dim, cfg.outside_spikes))
            self.outside_dirs = np.linalg.qr(v - known @ (known.T @ v))[0]
        for m in ("text", "image"):
            self.log_conflict[m] = None
            if cfg.conflict_concentration > 0:
                q = np.zeros((K, K))
                for y in range(K):
                    others = [c for c in range(K) if c != y or not cfg.distractor_excludes_label]
                    q[y, others] = rng.dirichlet(np.full(len(others), cfg.conflict_concentration))
                with np.errstate(divide="ignore"):
                    self.log_conflict[m] = np.log(q)      # log P(distractor place c | label y), (K, K)

    def comp(self, modality: str) -> np.ndarray:
        """The component table of ``modality``: place centres (K rows), then generic themes."""
        return self.text_comp if modality == "text" else self.image_comp


def _draw_posts(cfg: SimFeatConfig, model: _Model, n: int, rng: np.random.Generator,
                components: bool = False):
    """Labels, users, regimes, components and content coordinates of n posts.

    Returns (users, y, regime, t, i) with ``regime`` the coarse regime index into REGIMES,
    plus the text and image component indices (c_t, c_i) if ``components``."""
    K, G = cfg.num_classes, cfg.num_generic
    users = rng.choice(cfg.num_users, size=n, p=model.user_share)
    cum = np.cumsum(model.user_mix[users], axis=1)
    y = np.minimum((rng.random(n)[:, None] > cum).sum(1), K - 1)
    regime = rng.choice(4, size=n, p=np.exp(model.log_regime))
    text_inf, image_inf = np.isin(regime, (0, 1)), np.isin(regime, (0, 2))

    def component(informative, q_cls, modality):
        as_class = rng.random(n) < q_cls
        if model.log_conflict[modality] is not None:   # structured: P(place | y) from the model's table
            cum = np.cumsum(np.exp(model.log_conflict[modality][y]), axis=1)
            place = np.minimum((rng.random(n)[:, None] > cum).sum(1), K - 1)
        elif cfg.distractor_excludes_label:     # another place: uniform over the K - 1 others
            place = (y + 1 + rng.integers(0, K - 1, n)) % K
        else:                                   # any place, independent of the label
            place = rng.integers(0, K, n)
        other = np.where(as_class, place, K + rng.integers(0, max(G, 1), n))
        return np.where(informative, y, other)

    c_t = component(text_inf, cfg.distractor_prob("text"), "text")
    c_i = component(image_inf, cfg.distractor_prob("image"), "image")
    t = _content(cfg, model, "text", c_t, rng)
    i = _content(cfg, model, "image", c_i, rng)
    if components:
        return users, y, regime, t, i, c_t, c_i
    return users, y, regime, t, i


def _content(cfg: SimFeatConfig, model: _Model, modality: str, comp: np.ndarray, rng) -> np.ndarray:
    """Content coordinates s * mean + noise of n posts whose ``modality`` shows component ``comp``.

    The mean is the component's prototype; a place with several looks shows one of them, drawn
    with the place's look weights. The noise is nu * (z + U (kappa - 1) U^T z), z ~ N(0, I): its
    covariance is nu^2 (I + U diag(kappa^2 - 1) U^T) (spiked, ``content_spikes`` > 0) or nu^2 I."""
    K = cfg.num_classes
    s, nu = (cfg.text_signal, cfg.text_noise) if modality == "text" else (cfg.image_signal, cfg.image_noise)
    mean = model.comp(modality)[comp]
    looks = model.looks[modality]
    if looks.shape[1] > 1:
        place = comp < K
        cum = np.cumsum(np.exp(model.log_look_w[modality][comp[place]]), axis=1)
        j = np.minimum((rng.random(int(place.sum()))[:, None] > cum).sum(1), looks.shape[1] - 1)
        mean[place] = looks[comp[place], j]
    z = rng.standard_normal((comp.shape[0], cfg.content_dim))
    x = s * mean + nu * z
    if model.spike_dirs is not None:
        u = model.spike_dirs
        x += nu * (cfg.content_spike_scale - 1) * ((z @ u) @ u.T)
    return x


def regime_names(cfg: SimFeatConfig, regime: np.ndarray, c_t: np.ndarray, c_i: np.ndarray) -> np.ndarray:
    """(n,) str regime names: REGIMES[regime], or the FINE_REGIMES name when ``cfg.fine_regimes``
    (an uninformative modality whose component is a place is ``*_other_place``, else ``*_generic``)."""
    if not cfg.fine_regimes:
        return np.array(REGIMES)[regime]
    K = cfg.num_classes
    out = np.full(regime.shape[0], "neither", dtype="<U17")
    out[regime == 0] = "both"
    out[regime == 1] = np.where(c_i[regime == 1] < K, "image_other_place", "image_generic")
    out[regime == 2] = np.where(c_t[regime == 2] < K, "text_other_place", "text_generic")
    return out


# --------------------------------------------------------------------------- oracle
def _lse(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _normalise(logp: np.ndarray) -> np.ndarray:
    return np.exp(logp - _lse(logp, 1)[:, None])


def oracle_posteriors(cfg: SimFeatConfig, model: _Model, t_content: np.ndarray,
                      i_content: np.ndarray) -> dict[str, np.ndarray]:
    """Exact p(y|t,i), p(y|t), p(y|i) (float64, (n, K)) from content coordinates.

    Per modality, log N(x; s P_c, Sigma) up to a term shared by all components is
    s x^T Sigma^-1 P_c - s^2 P_c^T Sigma^-1 P_c / 2 (:func:`_component_loglik`); shared terms
    cancel in the posterior. A place with several looks mixes them with its look weights.
    An uninformative modality's likelihood u(y) = sum_c w_c N(x; s P_c) mixes the generic
    themes and the places; it depends on y when a distractor place excludes the label or
    follows the label's conflict table (:func:`_uninformative`).
    """
    K = cfg.num_classes
    lt = _component_loglik(cfg, model, "text", t_content)
    li = _component_loglik(cfg, model, "image", i_content)
    t_cls, i_cls = lt[:, :K], li[:, :K]                       # modality shows class y
    t_un = _uninformative(cfg, model, "text", lt)
    i_un = _uninformative(cfg, model, "image", li)
    lb, ltx, lim, lne = model.log_regime
    joint = _lse(np.stack(np.broadcast_arrays(lb + t_cls + i_cls, ltx + t_cls + i_un,
                                              lim + t_un + i_cls, lne + t_un + i_un)), 0)
    log_prior = np.log(model.prior)
    with np.errstate(divide="ignore"):
        text_only = np.logaddexp(np.log(cfg.p_both + cfg.p_text_only) + t_cls,
                                 np.log(cfg.p_image_only + cfg.p_neither) + t_un)
        image_only = np.logaddexp(np.log(cfg.p_both + cfg.p_image_only) + i_cls,
                                  np.log(cfg.p_text_only + cfg.p_neither) + i_un)
    return {name: _normalise(log_prior + lp) for name, lp in
            (("joint", joint), ("text", text_only), ("image", image_only))}


def _component_loglik(cfg: SimFeatConfig, model: _Model, modality: str, x: np.ndarray) -> np.ndarray:
    """(n, K + G): log-likelihood of each place (its looks mixed) and each generic theme, up to
    a term shared by all components of the modality.

    Isotropic, one look per place (the original): s x.P_c / nu^2, all prototypes of norm 1.
    Otherwise log N(x; s P, Sigma) = s x^T Sigma^-1 P - s^2 P^T Sigma^-1 P / 2 + shared, and a
    place's likelihood is log sum_j w_kj N(x; s P_kj, Sigma) (log-sum-exp over its looks)."""
    K = cfg.num_classes
    s, nu = (cfg.text_signal, cfg.text_noise) if modality == "text" else (cfg.image_signal, cfg.image_noise)
    comp, looks, prec = model.comp(modality), model.looks[modality], model.precision[modality]
    if prec is None and looks.shape[1] == 1:
        return s * (x @ comp.T) / nu ** 2
    M = looks.shape[1]
    means = s * np.vstack([looks.reshape(K * M, -1), comp[K:]])    # (K M + G, r)
    if prec is None:
        prec = np.eye(cfg.content_dim) / nu ** 2
    pm = means @ prec
    ll = x @ pm.T - 0.5 * np.sum(pm * means, 1)
    place = _lse(ll[:, :K * M].reshape(-1, K, M) + model.log_look_w[modality][None], 2)
    return np.hstack([place, ll[:, K * M:]])


def _uninformative(cfg: SimFeatConfig, model: _Model, modality: str, ll: np.ndarray) -> np.ndarray:
    """log u(y) of an uninformative ``modality`` from its component log-likelihoods ``ll``:
    (n, 1) when it does not depend on y, else (n, K).

    With a conflict table Q (``conflict_concentration`` > 0),
    u(y) = q sum_c Q(c | y) N_c + ((1 - q) / G) sum_g N_g; with ``distractor_excludes_label``,
    u(y) = sum_{c != y} w_c N_c + generic terms; otherwise one table for every y."""
    K = cfg.num_classes
    logw = model.log_uninf_text if modality == "text" else model.log_uninf_image
    table = model.log_conflict[modality]
    if table is not None:
        with np.errstate(divide="ignore"):
            places = math.log(cfg.distractor_prob(modality)) if cfg.distractor_prob(modality) > 0 else -np.inf
        # log sum_c Q(c|y) N_c as a matrix product, shifted by the row max; rows where every
        # allowed term underflows (far-apart places) are redone exactly with log-sum-exp
        top = ll[:, :K].max(1, keepdims=True)
        with np.errstate(divide="ignore"):
            shown = np.log(np.exp(ll[:, :K] - top) @ np.exp(table).T) + top
        bad = ~np.all(np.isfinite(shown), 1)
        if bad.any():
            shown[bad] = _lse(table[None] + ll[bad, None, :K], 2)   # (n_bad, K, K): [post, y, place c]
        gen = _lse(ll[:, K:] + logw[K:], 1)[:, None] if ll.shape[1] > K else np.full((ll.shape[0], 1), -np.inf)
        return np.logaddexp(places + shown, gen)
    if cfg.distractor_excludes_label:
        # u(y) = log sum_{c != y} w_c N_c: per y, the component table with place y removed
        keep = ~np.eye(K, ll.shape[1], dtype=bool)            # (K, K + G): row y drops column y
        a = np.where(keep[None], (ll + logw)[:, None, :], -np.inf)
        return _lse(a, 2)                                      # (n, K)
    return _lse(ll + logw, 1)[:, None]


def _expected_accuracy(cfg: SimFeatConfig, model: _Model, rng: np.random.Generator) -> dict:
    """Monte-Carlo E[max_y p(noisy y | x)] = (1-eta) E[max_y p(y|x)] + eta/K, per posterior.

    Rao-Blackwellised (averages the max posterior, not 0/1 hits), so its standard error is
    far below that of a test-set accuracy.
    """
    eta, K = cfg.label_noise, cfg.num_classes
    sums = {k: [0.0, 0.0] for k in ("joint", "text", "image")}
    n_done, chunk = 0, 50_000 if cfg.content_dim <= 64 else max(2_000, 3_200_000 // cfg.content_dim)
    while n_done < cfg.mc_samples:
        n = min(chunk, cfg.mc_samples - n_done)
        _, _, _, t, i = _draw_posts(cfg, model, n, rng)
        for k, p in oracle_posteriors(cfg, model, t, i).items():
            acc = (1 - eta) * p.max(1) + eta / K
            sums[k][0] += acc.sum()
            sums[k][1] += (acc ** 2).sum()
        n_done += n
    out = {}
    for k, key in (("joint", "expected_accuracy"), ("text", "expected_text_only_accuracy"),
                   ("image", "expected_image_only_accuracy")):
        mean = sums[k][0] / n_done
        out[key] = mean
        if k == "joint":
            out["expected_accuracy_se"] = math.sqrt(max(sums[k][1] / n_done - mean ** 2, 0) / n_done)
    return out


# --------------------------------------------------------------------------- generation
def _embed(content, basis, offset, sigma, rng, out, spikes=None):
    """Write normalise(basis @ content + offset + sigma * noise orthogonal to the content
    [+ spikes: (D, b) directions times their std, each with its own N(0, 1) weight])."""
    b32, off32 = basis.astype(np.float32), offset.astype(np.float32)
    for s in range(0, content.shape[0], 4096):
        x = rng.standard_normal((min(4096, content.shape[0] - s), basis.shape[0]), dtype=np.float32)
        x -= (x @ b32) @ b32.T                     # isotropic noise, orthogonal to the content
        x *= np.float32(sigma)
        x += (content[s:s + 4096] @ basis.T).astype(np.float32)
        x += off32
        if spikes is not None and spikes.shape[1]:
            x += (rng.standard_normal((x.shape[0], spikes.shape[1])) @ spikes.T).astype(np.float32)
        x /= np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True).astype(np.float32)
        out[s:s + x.shape[0]] = x


def _stratified_test(labels: np.ndarray, test_size: int, K: int, rng) -> np.ndarray:
    """'test' for exactly test_size rows, allocated to classes by largest remainder."""
    counts = np.bincount(labels, minlength=K)
    quota = counts * test_size / counts.sum()
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: test_size - take.sum()]] += 1
    split = np.full(labels.shape[0], "train", dtype="<U5")
    for c in range(K):
        rows = np.flatnonzero(labels == c)
        split[rng.choice(rows, size=take[c], replace=False)] = "test"
    return split


def _stored_content(cfg, model, feats, noise_sigma):
    """Plug-in estimate of the latent content coordinates from stored unit vectors.

    The norm of the latent is recovered from the energy outside the content, gap, common and
    outside-spike directions, sigma^2 * (D - r - 2 - b) up to a ~1/sqrt(2D) relative fluctuation.
    """
    f = feats.astype(np.float64)
    coords = f @ model.basis
    perp2 = 1.0 - np.sum(coords ** 2, 1) - (f @ model.gap_dir) ** 2 - (f @ model.common_dir) ** 2
    b = model.outside_dirs.shape[1]
    if b:
        perp2 -= np.sum((f @ model.outside_dirs) ** 2, 1)
    norm = noise_sigma * math.sqrt(cfg.dim - cfg.content_dim - 2 - b) / np.sqrt(np.maximum(perp2, 1e-300))
    return coords * norm[:, None]


# Places beyond the paper's eight, for profiles with more places (issue 17): K = 9 or 10
# takes the first K of DEFAULT_LABELS + EXTRA_LABELS.
EXTRA_LABELS: tuple[str, ...] = ("hospital", "park")


def label_names(num_classes: int) -> list[str]:
    """The place names of a SimFeat dataset with ``num_classes`` places: the paper's eight
    (sgmft.labels.DEFAULT_LABELS), extended by EXTRA_LABELS up to 10, else ``class<k>``."""
    full = list(DEFAULT_LABELS) + list(EXTRA_LABELS)
    if len(DEFAULT_LABELS) <= num_classes <= len(full):
        return full[:num_classes]
    return [f"class{k}" for k in range(num_classes)]


def generate_simfeat(cfg: SimFeatConfig | None = None) -> SimFeatData:
    """Draw a SimFeat dataset (deterministic given cfg, < 10 s at default scale).

    ``oracle`` holds, for the test split and the observed (noisy) labels:
    ``test_accuracy`` (argmax of the exact p(y|t,i)), ``text_only_test_accuracy``,
    ``image_only_test_accuracy``, ``clean_test_accuracy`` (against the labels before noise),
    ``test_accuracy_by_regime`` and ``test_regime_counts``, ``stored_feature_test_accuracy``
    (the plug-in posterior from the stored float32 features: shows the bound is tight), and
    the Monte-Carlo expectations ``expected_accuracy`` (+ ``expected_accuracy_se``),
    ``expected_text_only_accuracy``, ``expected_image_only_accuracy``.
    """
    cfg = cfg or SimFeatConfig()
    K, N = cfg.num_classes, cfg.num_posts
    seeds = np.random.SeedSequence(cfg.seed).spawn(5)
    r_model, r_posts, r_embed, r_split, r_mc = (np.random.default_rng(s) for s in seeds)
    model = _Model(cfg, r_model)
    users, clean, regime, t_c, i_c, comp_t, comp_i = _draw_posts(cfg, model, N, r_posts, components=True)
    noisy = r_posts.random(N) < cfg.label_noise
    labels = np.where(noisy, r_posts.integers(0, K, N), clean).astype(np.int64)

    sigma = math.sqrt(cfg.nuisance / cfg.dim)
    text = np.empty((N, cfg.dim), dtype=np.float32)
    image = np.empty((N, cfg.dim), dtype=np.float32)
    common = cfg.common_offset * model.common_dir
    spikes = model.outside_dirs * cfg.outside_spike_std
    _embed(t_c, model.basis, common + 0.5 * cfg.modality_gap * model.gap_dir, sigma, r_embed, text, spikes)
    _embed(i_c, model.basis, common - 0.5 * cfg.modality_gap * model.gap_dir, sigma, r_embed, image, spikes)
    split = _stratified_test(labels, cfg.test_size, K, r_split)

    post = oracle_posteriors(cfg, model, t_c, i_c)
    test = split == "test"
    acc = lambda p, y=labels: float(np.mean(p[test].argmax(1) == y[test]))  # noqa: E731
    names_r = regime_names(cfg, regime, comp_t, comp_i)
    oracle = {
        "test_accuracy": acc(post["joint"]),
        "text_only_test_accuracy": acc(post["text"]),
        "image_only_test_accuracy": acc(post["image"]),
        "clean_test_accuracy": acc(post["joint"], clean),
        "test_accuracy_by_regime": {
            r: float(np.mean(post["joint"][test & (names_r == r)].argmax(1)
                             == labels[test & (names_r == r)]))
            if np.any(test & (names_r == r)) else None for r in cfg.regimes},
        "test_regime_counts": {r: int(np.sum(test & (names_r == r))) for r in cfg.regimes},
    }
    if cfg.nuisance > 0:
        st = _stored_content(cfg, model, text, sigma)
        si = _stored_content(cfg, model, image, sigma)
        oracle["stored_feature_test_accuracy"] = acc(oracle_posteriors(cfg, model, st, si)["joint"])
    else:
        oracle["stored_feature_test_accuracy"] = None
    oracle.update(_expected_accuracy(cfg, model, r_mc))

    names = label_names(K)
    width = max(len(str(N - 1)), 5)
    return SimFeatData(
        ids=np.array([f"sf{k:0{width}d}" for k in range(N)]),
        users=np.array([f"u{u:03d}" for u in users]),
        text=text, image=image, labels=labels, split=split, regime=names_r,
        label_names=names, oracle=oracle, clean_labels=clean.astype(np.int64),
        oracle_posterior=post["joint"].astype(np.float32), config=cfg)


def write_simfeat(path, cfg: SimFeatConfig | None = None, overwrite: bool = False) -> Path:
    """Generate SimFeat and write it as a feature store (backbone ``"simfeat"``).

    ``meta.extra["simfeat"]`` holds the config (with its ``profile``) and the oracle figures.
    The per-post regimes go into the store too when ``write_feature_store`` accepts a
    ``regime`` argument; either way ``generate_simfeat(SimFeatConfig(**config))``
    reproduces them exactly.
    """
    import inspect

    from sgmft.features import write_feature_store

    cfg = cfg or SimFeatConfig()
    d = generate_simfeat(cfg)
    optional = {}
    if "regime" in inspect.signature(write_feature_store).parameters:
        optional["regime"] = d.regime
    return write_feature_store(
        path, ids=d.ids, text=d.text, image=d.image, label_names=d.label_names,
        labels=d.labels, users=d.users, split=d.split, backbone="simfeat",
        normalization="l2", dtype="float32",
        extra={"simfeat": {"config": asdict(cfg), "oracle": d.oracle}}, overwrite=overwrite, **optional)


# --------------------------------------------------------------------------- proxies
def proxy_report(cfg: SimFeatConfig | None = None, *, epochs: int = 20, dropout: float = 0.3,
                 logreg: bool = True, seed: int = 0) -> dict:
    """Check learnability: oracle figures vs. quick proxies trained on the stored features.

    Proxies (train split -> test split, observed labels): sklearn LogisticRegression on
    standardised features (C=0.05) and a torch MLP (2 hidden layers of 512 with ReLU and
    ``dropout``, Adam lr 1e-3, batch 128, ``epochs`` epochs, last epoch scored), each on
    text, image and concatenated text+image. Takes minutes on CPU.
    """
    import time

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    d = generate_simfeat(cfg)
    gen_s = time.perf_counter() - t0
    tr, te = d.split == "train", d.split == "test"
    views = {"text": d.text, "image": d.image, "concat": np.hstack([d.text, d.image])}
    report = {"config": asdict(d.config), "generate_seconds": round(gen_s, 2),
              "mlp_settings": {"epochs": epochs, "dropout": dropout, "seed": seed},
              "oracle": d.oracle, "logreg": {}, "mlp": {}}

    for name, x in views.items():
        scaler = StandardScaler().fit(x[tr])
        xtr, xte = scaler.transform(x[tr]), scaler.transform(x[te])
        if logreg:
            clf = LogisticRegression(C=0.05, max_iter=300).fit(xtr, d.labels[tr])
            report["logreg"][name] = float(clf.score(xte, d.labels[te]))
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 512), torch.nn.ReLU(),
                                  torch.nn.Dropout(dropout), torch.nn.Linear(512, 512),
                                  torch.nn.ReLU(), torch.nn.Dropout(dropout),
                                  torch.nn.Linear(512, d.config.num_classes))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        X, Y = torch.tensor(xtr, dtype=torch.float32), torch.tensor(d.labels[tr])
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(X), generator=gen).split(128):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(X[idx]), Y[idx]).backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            pred = net(torch.tensor(xte, dtype=torch.float32)).argmax(1).numpy()
        report["mlp"][name] = float(np.mean(pred == d.labels[te]))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def textbook_report(cfg: SimFeatConfig | None = None) -> dict:
    """Textbook baselines on the concatenated [text, image] features, against the oracle.

    Train split -> test split (observed labels): scikit-learn
    ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")``, ``LogisticRegression(C=1,
    max_iter=300)`` and the nearest class mean (an isotropic classifier), with their test
    accuracy overall and per regime. About a minute per profile on one core at D = 1024.
    """
    import time

    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import NearestCentroid

    t0 = time.perf_counter()
    d = generate_simfeat(cfg)
    report = {"profile": d.config.profile, "generate_seconds": round(time.perf_counter() - t0, 1),
              "oracle": {k: d.oracle[k] for k in ("test_accuracy", "text_only_test_accuracy",
                                                 "image_only_test_accuracy", "stored_feature_test_accuracy",
                                                 "expected_accuracy", "test_accuracy_by_regime")}}
    tr, te = d.split == "train", d.split == "test"
    x = np.hstack([d.text, d.image])
    models = {"lda": LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"),
              "logreg": LogisticRegression(C=1.0, max_iter=300), "nearest_mean": NearestCentroid()}
    for name, clf in models.items():
        t1 = time.perf_counter()
        pred = clf.fit(x[tr], d.labels[tr]).predict(x[te])
        hit = pred == d.labels[te]
        report[name] = {"test_accuracy": float(hit.mean()), "seconds": round(time.perf_counter() - t1, 1),
                        "by_regime": {r: float(hit[d.regime[te] == r].mean()) for r in d.config.regimes
                                      if np.any(d.regime[te] == r)}}
    return report


def parse_overrides(items) -> dict:
    """``["key=value", ...]`` (``--set``) -> SimFeatConfig field overrides, in the one override grammar
    of :func:`sgmft.config.parse_overrides`: each value parsed as YAML and checked against the
    field's type; a typo or a bad value is a ConfigError naming the field, the value and what is
    allowed. ``simfeat.<field>=V`` is the same as ``<field>=V``."""
    from sgmft.config import parse_overrides as parse

    return parse(SimFeatConfig, list(items or []), "simfeat")
