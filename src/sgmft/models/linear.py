"""Textbook linear baselines as first-class heads: shrinkage LDA and L2-regularised logistic regression.

Both are the bar every neural head must clear (docs/design.md, "Textbook baselines"). They act on the
concatenation ``x = [t', v']`` of the two modalities' inputs (after the optional input
normalisation, with an absent modality replaced by its training mean) and end as one linear layer,
``logits = W x + b``, saved in safetensors like any other head, so they evaluate, predict, serve and
export like every model. Training is a closed-form / convex fit with scikit-learn
(:meth:`fit_closed_form`), not gradient steps:

* ``lda``: ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")``: Gaussian classes with a
  shared covariance, Ledoit-Wolf shrinkage; its ``decision_function`` is exactly ``W x + b`` and its
  probabilities the softmax of it.
* ``logreg``: multinomial ``LogisticRegression`` (L2, lbfgs) with ``C`` chosen on the validation
  split from ``c_grid`` (never the test split).
* ``lda_product``: one shrinkage LDA per modality, their evidence summed (eq L1 below): the same Gaussian
  classes, but text and image independent given the place, so the two D x D within-place covariances are
  estimated instead of one 2D x 2D one with its cross block. On a few hundred posts per modality that halves
  what is estimated; an absent modality adds no evidence (docs/design.md, "The default model", item 23).
"""

from __future__ import annotations

import warnings
from typing import Annotated, Literal, Union

import numpy as np
import torch
from pydantic import Field
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.comparisons import HeadOutput, _Head
from sgmft.models.options import ArchOptions, OneOrMany, PositiveInt, option
from sgmft.models.registry import MODELS

__all__ = ["LinearHead", "ShrinkageLDA", "ProductLDA", "LogisticHead"]


class LinearHead(_Head):
    """``logits = W [t'; v'] + b`` (docstring above); subclasses say how W and b are fitted."""

    closed_form = True
    reads_validation = False    # the fit reads no validation split (logistic regression's C grid does)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)                   # options, normalised inputs with placeholders
        self.linear = nn.Linear(2 * cfg.dim, cfg.num_classes)

    def forward(self, text, image, text_mask=None, image_mask=None) -> HeadOutput:
        x = torch.cat([self.text_in(text, text_mask), self.image_in(image, image_mask)], dim=1)
        return HeadOutput(logits=self.linear(x), fused=x)

    # -- closed-form fit ------------------------------------------------------------------
    @torch.no_grad()
    def design(self, batch: dict) -> np.ndarray:
        """The float64 design matrix [t'; v'] of a batch dict (text, image, optional masks)."""
        return self(batch["text"], batch["image"], batch.get("text_mask"), batch.get("image_mask")).fused.double().numpy()

    @torch.no_grad()
    def _set_placeholders(self, batch: dict) -> None:
        """An absent modality stands for the training mean of the present ones (so it adds a constant)."""
        for inp, key in ((self.text_in, "text"), (self.image_in, "image")):
            x = inp.normalise(batch[key]) * inp.scale
            mask = batch.get(f"{key}_mask")
            x = x if mask is None else x[mask.bool()]
            inp.missing.copy_(x.mean(0) if len(x) else torch.zeros_like(inp.missing))

    @torch.no_grad()
    def _set_linear(self, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray) -> None:
        """Copy a scikit-learn (K', 2D) coef into the (K, 2D) layer; classes absent from training get -inf-ish bias."""
        k = self.cfg.num_classes
        w = np.zeros((k, coef.shape[1]))
        b = np.full(k, -30.0)                      # a class with no training post is never predicted
        if len(classes) == 2 and coef.shape[0] == 1:          # binary: sklearn keeps one row
            coef = np.vstack([-coef[0] / 2, coef[0] / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        w[classes], b[classes] = coef, intercept
        self.linear.weight.copy_(torch.from_numpy(w).float())
        self.linear.bias.copy_(torch.from_numpy(b).float())

    def fit_closed_form(self, train: dict, val: dict | None, seed: int = 0) -> dict:
        self._set_placeholders(train)
        x, y = self.design(train), train["label"].numpy()
        return self._fit(x, y, None if val is None else (self.design(val), val["label"].numpy()), seed)


def _shrinkage_lda(x: np.ndarray, y: np.ndarray, shrink):
    """scikit-learn's ``LinearDiscriminantAnalysis(solver="lsqr")`` with ``shrink`` ("auto": Ledoit-Wolf), fitted."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrink if shrink == "auto" else float(shrink))
    with warnings.catch_warnings():          # a place with one training post adds no within-class scatter
        warnings.filterwarnings("ignore", message="Only one sample available", category=UserWarning)
        return lda.fit(x, y)


@MODELS.register("lda")
class ShrinkageLDA(LinearHead):
    """Linear discriminant analysis with Ledoit-Wolf shrinkage (scikit-learn, lsqr solver)."""

    class Options(ArchOptions):
        shrinkage: Union[Literal["auto"], Annotated[float, Field(ge=0.0, le=1.0)]] = option(
            "auto", "`auto` (Ledoit-Wolf) or a shrinkage in [0, 1]")

    def _fit(self, x, y, val, seed) -> dict:
        lda = _shrinkage_lda(x, y, self.opt["shrinkage"])
        self._set_linear(lda.coef_, lda.intercept_, lda.classes_)
        return {"solver": "lsqr", "shrinkage": self.opt["shrinkage"]}


@MODELS.register("lda_product")
class ProductLDA(LinearHead):
    """Shrinkage LDA per modality with the evidence summed: eq L1,

        logit(c) = log p(c) + sum over present m of [ mu_mc^T P_m x_m - mu_mc^T P_m mu_mc / 2 ],

    ``P_m`` the inverse Ledoit-Wolf within-place covariance of modality m (scikit-learn's lsqr LDA fitted
    on the posts that have m), so an absent modality contributes nothing. ``linear.weight`` holds
    [W_text, W_image], ``linear.bias`` log p(c), ``evidence_bias`` each modality's -mu P mu / 2."""

    class Options(ArchOptions):
        shrinkage: Union[Literal["auto"], Annotated[float, Field(ge=0.0, le=1.0)]] = option(
            "auto", "`auto` (Ledoit-Wolf) or a shrinkage in [0, 1], for each modality's covariance")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.register_buffer("evidence_bias", torch.zeros(2, cfg.num_classes))

    def forward(self, text, image, text_mask=None, image_mask=None) -> HeadOutput:
        t, v = self.text_in(text, text_mask), self.image_in(image, image_mask)
        w, d = self.linear.weight, self.cfg.dim
        logits = self.linear.bias
        for m, (x, mask) in enumerate(((t, text_mask), (v, image_mask))):      # eq L1
            z = x @ w[:, m * d:(m + 1) * d].T + self.evidence_bias[m]
            logits = logits + (z if mask is None else z * mask.reshape(-1, 1).to(z.dtype))
        return HeadOutput(logits=logits, fused=torch.cat([t, v], dim=1))

    @torch.no_grad()
    def fit_closed_form(self, train: dict, val: dict | None, seed: int = 0) -> dict:
        self._set_placeholders(train)
        x, y, k, d = self.design(train), train["label"].numpy(), self.cfg.num_classes, self.cfg.dim
        counts = np.bincount(y, minlength=k)
        seen = counts > 0
        w, eb = np.zeros((k, 2 * d)), np.zeros((2, k))
        fitted = {}
        for m, key in enumerate(("text", "image")):
            mask = train.get(f"{key}_mask")
            rows = np.ones(len(y), bool) if mask is None else mask.bool().numpy()
            coef, bias, classes = self._modality_lda(x[rows, m * d:(m + 1) * d], y[rows])
            w[classes, m * d:(m + 1) * d], eb[m, classes] = coef, bias
            rest = np.setdiff1d(np.flatnonzero(seen), classes)     # a place with no post showing m: the mean
            if len(rest) and len(classes):                         # place's evidence (m tells nothing of it)
                w[rest, m * d:(m + 1) * d], eb[m, rest] = coef.mean(0), bias.mean()
            fitted[key] = {"posts": int(rows.sum()), "places": int(len(classes))}
        self.linear.weight.copy_(torch.from_numpy(w).float())
        prior = np.where(seen, np.log(np.maximum(counts, 1) / max(1, counts.sum())), -30.0)
        self.linear.bias.copy_(torch.from_numpy(prior).float())
        self.evidence_bias.copy_(torch.from_numpy(eb).float())
        return {"solver": "lsqr", "shrinkage": self.opt["shrinkage"], "modalities": fitted}

    def _modality_lda(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One modality's Gaussian evidence: (coef (K', D), bias (K',), classes) with coef = mu_c^T P and
        bias = -mu_c^T P mu_c / 2, from scikit-learn's shrinkage LDA (its means and covariance)."""
        classes = np.unique(y)
        if len(classes) < 2:                      # nothing to discriminate: no evidence from this modality
            return np.zeros((len(classes), x.shape[1])), np.zeros(len(classes)), classes
        lda = _shrinkage_lda(x, y, self.opt["shrinkage"])
        coef = np.linalg.lstsq(lda.covariance_, lda.means_.T, rcond=None)[0].T      # as sklearn's lsqr solver
        return coef, -0.5 * np.einsum("kd,kd->k", lda.means_, coef), lda.classes_


@MODELS.register("logreg")
class LogisticHead(LinearHead):
    """Multinomial L2 logistic regression (scikit-learn, lbfgs); C picked on the validation split."""

    reads_validation = True

    class Options(ArchOptions):
        c_grid: Annotated[list[Annotated[float, Field(gt=0.0)]], OneOrMany, Field(min_length=1)] = option(
            [0.01, 0.1, 1.0], "inverse regularisation strengths C tried; the best on the validation split is kept")
        max_iter: PositiveInt = option(300, "lbfgs iterations per fit")

    def _fit(self, x, y, val, seed) -> dict:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        grid = [float(c) for c in self.opt["c_grid"]]
        best = None
        for c in grid:
            clf = LogisticRegression(C=c, max_iter=int(self.opt["max_iter"]), random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(x, y)
            score = float((clf.predict(val[0]) == val[1]).mean()) if val is not None and len(val[1]) else 0.0
            if best is None or score > best[0]:
                best = (score, c, clf)
            if len(grid) > 1 and (val is None or not len(val[1])):
                break                              # no validation split: the first C of the grid
        score, c, clf = best
        self._set_linear(clf.coef_, clf.intercept_, clf.classes_)
        return {"C": c, "val_acc": None if val is None else round(score, 4), "c_grid": grid}
