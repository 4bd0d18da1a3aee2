"""Which modality decided a post's place: one small account per post (docs/predict.md, "Why this place").

Every account is a dict::

    {"decided_by": "text" | "image" | "both" | "neither",
     "text": STATE, "image": STATE, "sentence": "Decided by the image; the text looks generic.",
     "method": "trust_states" | "masking", "scores": {"text": float, "image": float}}

Two methods, chosen by the architecture:

* ``trust_states`` (TrustMix, preset ``trust``): the model's own posterior over its joint
  states given the predicted place y*, p(s_t, s_v | x, y*) (``state_posterior_pred``, the
  terms of eq T2 at y* in :mod:`sgmft.models.trust`, row-major over (s_t, s_v)), is
  marginalised per modality. A modality's state is its most probable
  one: ``shows_place`` (it shows the post's place), ``generic`` or ``other_place`` (with
  ``states: two`` the second state, "does not show the place", is called ``generic``).
  ``scores`` = the posterior probability that the modality shows the place. ``decided_by``
  names the modalities whose state is ``shows_place``.
* ``masking`` (every other architecture): the model is run again with the text, then the
  image masked out (mask False: the learnt "absent" placeholder the model was trained
  with). ``scores`` = the drop of the predicted place's probability when that modality is
  removed. A modality ``supports`` the answer when its drop is at least
  :data:`SUPPORT_DROP` (0.10), else it is ``weak``. ``decided_by``: the modalities that
  support it; when neither drop reaches 0.10 but each modality alone still gives the same
  place, the two are redundant and it is ``both``; otherwise ``neither``.

A modality the post does not have (mask False) is ``absent`` with score 0 in both methods.
Imports no training code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["SUPPORT_DROP", "TRUST_STATES", "explain_batch", "explanation_sentence"]

#: masking: the smallest drop of the predicted place's probability for a modality to "support" it
SUPPORT_DROP = 0.10
#: TrustMix's per-modality states in the model's order (eq T1: inf, gen, oth)
TRUST_STATES = ("shows_place", "generic", "other_place")

_PHRASE = {"shows_place": "also shows the place", "generic": "looks generic",
           "other_place": "seems to show another place", "absent": "is missing",
           "supports": "also supports it", "weak": "adds little"}


def explanation_sentence(decided_by: str, text: str, image: str) -> str:
    """One plain sentence for a person, e.g. "Decided by the image; the text looks generic."."""
    if decided_by in ("text", "image"):
        other, state = ("image", image) if decided_by == "text" else ("text", text)
        return f"Decided by the {decided_by}; the {other} {_PHRASE[state]}."
    if decided_by == "both":
        return "Decided by the text and the image together; both point to this place."
    if text == "absent" and image == "absent":
        return "Neither the text nor the image is available; the place is the model's prior guess."
    return "Neither the text nor the image clearly shows the place; treat it as a guess."


def _account(decided_by: str, text: str, image: str, method: str, s_text: float, s_image: float) -> dict:
    return {"decided_by": decided_by, "text": text, "image": image,
            "sentence": explanation_sentence(decided_by, text, image), "method": method,
            "scores": {"text": round(float(s_text), 6), "image": round(float(s_image), 6)}}


def _decided(text_on: bool, image_on: bool) -> str:
    return "both" if text_on and image_on else "text" if text_on else "image" if image_on else "neither"


def _masks(batch: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    def one(key):
        m = batch.get(key)
        return np.ones(n, bool) if m is None else m.detach().cpu().numpy().astype(bool)
    return one("text_mask"), one("image_mask")


def _trust_states(posterior: torch.Tensor, tm: np.ndarray, im: np.ndarray) -> list[dict]:
    n, s2 = posterior.shape
    s = int(round(s2 ** 0.5))
    post = posterior.detach().double().cpu().view(n, s, s)
    marg_t, marg_v = post.sum(2).numpy(), post.sum(1).numpy()         # p(s_t | x), p(s_v | x)
    out = []
    for i in range(n):
        st = TRUST_STATES[int(marg_t[i].argmax())] if tm[i] else "absent"
        sv = TRUST_STATES[int(marg_v[i].argmax())] if im[i] else "absent"
        out.append(_account(_decided(st == "shows_place", sv == "shows_place"), st, sv, "trust_states",
                            marg_t[i, 0] if tm[i] else 0.0, marg_v[i, 0] if im[i] else 0.0))
    return out


def _masking(forward: Callable[[dict], torch.Tensor], batch: dict, probs: np.ndarray,
             tm: np.ndarray, im: np.ndarray) -> list[dict]:
    n = len(probs)
    top = probs.argmax(1)
    rows = np.arange(n)
    off = torch.zeros(n, dtype=torch.bool, device=batch["text"].device)
    no_text = forward({**batch, "text_mask": off})              # the image alone
    no_image = forward({**batch, "image_mask": off})            # the text alone
    drop_t = probs[rows, top] - no_text[rows, top]
    drop_v = probs[rows, top] - no_image[rows, top]
    same_t, same_v = no_image.argmax(1) == top, no_text.argmax(1) == top   # each modality alone
    out = []
    for i in range(n):
        st = ("supports" if drop_t[i] >= SUPPORT_DROP else "weak") if tm[i] else "absent"
        sv = ("supports" if drop_v[i] >= SUPPORT_DROP else "weak") if im[i] else "absent"
        by = _decided(st == "supports", sv == "supports")
        if by == "neither" and tm[i] and im[i] and same_t[i] and same_v[i]:
            by = "both"                                         # redundant: either alone gives this place
        out.append(_account(by, st, sv, "masking", drop_t[i] if tm[i] else 0.0, drop_v[i] if im[i] else 0.0))
    return out


def explain_batch(out, batch: dict, probs: np.ndarray, forward: Callable[[dict], np.ndarray]) -> list[dict]:
    """Accounts for one batch. ``out``: the model's output on ``batch``; ``probs``: the
    (calibrated) probabilities the user sees; ``forward(batch) -> probs``: the same model and
    calibration on another batch (for masking)."""
    tm, im = _masks(batch, len(probs))
    extras = getattr(out, "extras", None) or {}
    # the states given the predicted place (what shows *that* place), else the marginal posterior
    post = extras.get("state_posterior_pred", extras.get("state_posterior"))
    if post is not None:
        return _trust_states(post, tm, im)
    return _masking(forward, batch, probs, tm, im)
