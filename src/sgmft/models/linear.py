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

__all__ = ["LinearHead", "ShrinkageLDA", "LogisticHead"]


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


@MODELS.register("lda")
class ShrinkageLDA(LinearHead):
    """Linear discriminant analysis with Ledoit-Wolf shrinkage (scikit-learn, lsqr solver)."""

    class Options(ArchOptions):
        shrinkage: Union[Literal["auto"], Annotated[float, Field(ge=0.0, le=1.0)]] = option(
            "auto", "`auto` (Ledoit-Wolf) or a shrinkage in [0, 1]")

    def _fit(self, x, y, val, seed) -> dict:
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        shrink = self.opt["shrinkage"]
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrink if shrink == "auto" else float(shrink))
        with warnings.catch_warnings():          # a place with one training post adds no within-class scatter
            warnings.filterwarnings("ignore", message="Only one sample available", category=UserWarning)
            lda.fit(x, y)
        self._set_linear(lda.coef_, lda.intercept_, lda.classes_)
        return {"solver": "lsqr", "shrinkage": shrink}


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
