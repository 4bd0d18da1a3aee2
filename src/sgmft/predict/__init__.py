"""Inference: a trained run in, place probabilities out. Imports neither Lightning, nor
:mod:`sgmft.train`, nor the CLI (a test checks it).

* :class:`Predictor` (:mod:`sgmft.predict.features`): feature vectors or a feature store in;
* :class:`PostPredictor` (:mod:`sgmft.predict.posts`): raw posts (text + image files) in,
  encoded by :mod:`sgmft.features.encode`, the same code ``sgmft extract`` runs.
"""

from sgmft.predict.features import Predictions, Predictor
from sgmft.predict.posts import BackboneMismatchError, PostPredictor, PrecisionMismatchError

__all__ = ["BackboneMismatchError", "PostPredictor", "PrecisionMismatchError", "Predictions", "Predictor"]
