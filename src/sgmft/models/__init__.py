"""Models: SG-MFT, its fusion modules and the baselines, all listed by registries.

``blocks``       building blocks (attention, FFN, norms, classifier)
``fusions``      every module for SG-MFT's fusion slot (SFM, concat, sum, co-attention, ...)
``sgmft``        SG-MFT itself (SIM + fusion + classifier)
``baselines``    Table 2's feature baselines (text only, image only, concatenation)
``comparisons``  Table 1's other methods, re-created as heads on the same features
``trust``        TrustMix, the fusion that decides per post which modality to trust
``linear``       the textbook bar: shrinkage LDA and logistic regression (closed-form fits)
``input_norm``   fitting the input normalisation (mean, scale, whitening) on the training split
``ensemble``     the mean of trained runs' calibrated probabilities (assembled by ``auto``, not trained)

Importing this package registers every built-in component.
"""

from sgmft.models import baselines, comparisons, fusions, sgmft  # noqa: F401  (registration)
from sgmft.models import trust  # noqa: F401  (registration: TrustMix, docs/design.md)
from sgmft.models import peers  # noqa: F401  (registration: QMF and PDF, docs/design.md)
from sgmft.models import linear  # noqa: F401  (registration: shrinkage LDA, logistic regression)
from sgmft.models import zeroshot  # noqa: F401  (registration: CLIP zero-shot head, sgmft zero-shot)
from sgmft.models import ensemble  # noqa: F401  (registration: ensembles that auto assembles)
from sgmft.models.output import ModelOutput
from sgmft.models.registry import FUSIONS, MODELS, build_model, forward_batch, list_models

__all__ = ["FUSIONS", "MODELS", "ModelOutput", "build_model", "forward_batch", "list_models"]
