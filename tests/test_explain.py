"""Which modality decided (issue 18): sgmft.predict.explain, through Predictor.predict_features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgmft.predict import Predictor
from sgmft.predict.explain import SUPPORT_DROP, TRUST_STATES, explain_batch, explanation_sentence

from conftest import make_store

KEYS = {"decided_by", "text", "image", "sentence", "method", "scores"}
DECIDED = {"text", "image", "both", "neither"}
STATES = {"shows_place", "generic", "other_place", "absent", "supports", "weak"}


def _posterior(st: int, sv: int, p: float = 0.9) -> torch.Tensor:
    """A (1, 9) joint posterior with mass ``p`` on (s_t, s_v), the rest spread evenly."""
    post = torch.full((3, 3), (1 - p) / 8)
    post[st, sv] = p
    return post.view(1, 9)


class _Out:
    def __init__(self, post):
        self.extras = {"state_posterior": post}


@pytest.mark.parametrize("st,sv,decided,sentence", [
    (0, 1, "text", "Decided by the text; the image looks generic."),
    (1, 0, "image", "Decided by the image; the text looks generic."),
    (2, 0, "image", "Decided by the image; the text seems to show another place."),
    (0, 0, "both", "Decided by the text and the image together; both point to this place."),
    (1, 2, "neither", "Neither the text nor the image clearly shows the place; treat it as a guess."),
])
def test_trust_states_name_the_modality_that_shows_the_place(st, sv, decided, sentence):
    batch = {"text": torch.zeros(1, 4), "image": torch.zeros(1, 4)}
    (e,) = explain_batch(_Out(_posterior(st, sv)), batch, np.array([[0.7, 0.3]]), forward=None)
    assert e["decided_by"] == decided and e["sentence"] == sentence and e["method"] == "trust_states"
    assert (e["text"], e["image"]) == (TRUST_STATES[st], TRUST_STATES[sv])
    # scores: the marginal posterior that each modality shows the place
    post = _posterior(st, sv).view(3, 3)
    assert e["scores"]["text"] == pytest.approx(float(post[0].sum()), abs=1e-6)
    assert e["scores"]["image"] == pytest.approx(float(post[:, 0].sum()), abs=1e-6)


def test_trust_states_mark_a_missing_modality_absent():
    batch = {"text": torch.zeros(2, 4), "image": torch.zeros(2, 4),
             "text_mask": torch.tensor([True, False]), "image_mask": torch.tensor([False, False])}
    post = torch.cat([_posterior(0, 0), _posterior(0, 0)])
    a, b = explain_batch(_Out(post), batch, np.array([[0.7, 0.3], [0.5, 0.5]]), forward=None)
    assert (a["decided_by"], a["text"], a["image"], a["scores"]["image"]) == ("text", "shows_place", "absent", 0.0)
    assert a["sentence"] == "Decided by the text; the image is missing."
    assert (b["decided_by"], b["text"], b["image"]) == ("neither", "absent", "absent")
    assert "prior guess" in b["sentence"]


def test_masking_measures_the_drop_of_the_predicted_place():
    """A stand-in model: class 0's probability is 0.5 + 0.3 (text present) + 0.05 (image present)."""
    def probs_of(b):
        n = len(b["text"])
        tm = b.get("text_mask", torch.ones(n, dtype=torch.bool)).double()
        im = b.get("image_mask", torch.ones(n, dtype=torch.bool)).double()
        p0 = 0.5 + 0.3 * tm + 0.05 * im
        return torch.stack([p0, 1 - p0], -1).numpy()

    batch = {"text": torch.zeros(1, 4), "image": torch.zeros(1, 4)}
    full = probs_of(batch)
    (e,) = explain_batch(object(), batch, full, probs_of)
    assert e["method"] == "masking" and e["decided_by"] == "text"
    assert (e["text"], e["image"]) == ("supports", "weak")
    assert e["scores"] == {"text": pytest.approx(0.3), "image": pytest.approx(0.05)}
    assert e["sentence"] == "Decided by the text; the image adds little."
    assert 0.05 < SUPPORT_DROP <= 0.3


def test_sentences_cover_every_state():
    for d in ("text", "image"):
        for s in ("shows_place", "generic", "other_place", "absent", "supports", "weak"):
            text, image = (("supports", s) if d == "text" else (s, "supports"))
            sentence = explanation_sentence(d, text, image)
            assert sentence.startswith(f"Decided by the {d};") and sentence.endswith(".")


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    from sgmft.config import load_preset
    from sgmft.train import train

    root = tmp_path_factory.mktemp("explain")
    store = make_store(root / "store", n=240, dim=16, k=4, with_split=True, masks=True)
    out = {"store": store}
    for preset in ("trust", "concat"):
        p = load_preset(preset)
        p.train.epochs, p.train.batch_size, p.train.progress = 2, 32, False
        train(store, root / preset, p)
        out[preset] = Predictor.load(root / preset)
    return out


@pytest.mark.parametrize("preset,method", [("trust", "trust_states"), ("concat", "masking")])
def test_predict_features_explains_every_post(predictors, preset, method):
    from sgmft.features import FeatureStore

    fs = FeatureStore.open(predictors["store"])
    pred = predictors[preset]
    p = pred.predict_store(fs, explain=True)
    assert len(p.explanations) == len(fs)
    assert pred.predict_store(fs).explanations is None                        # only when asked for
    tm, im = np.asarray(fs.text_mask), np.asarray(fs.image_mask)
    for e, t, i in zip(p.explanations, tm, im):
        assert set(e) == KEYS and e["method"] == method and e["decided_by"] in DECIDED
        assert {e["text"], e["image"]} <= STATES and isinstance(e["sentence"], str) and e["sentence"]
        assert (e["text"] == "absent") == (not t) and (e["image"] == "absent") == (not i)
    # rows in any order get the same accounts as in store order
    rows = np.array([5, 1, 3])
    q = pred.predict_store(fs, rows, explain=True)
    assert q.explanations == [p.explanations[r] for r in rows]
