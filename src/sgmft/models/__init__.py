"""Models: SG-MFT, baselines and fusion modules, all listed by registries.

Importing this package registers every built-in component.
"""

from sgmft.models import baselines, fusion, sgmft  # noqa: F401  (registration)
from sgmft.models import fusion_variants, heads  # noqa: F401  (registration: Table 1 and 3 variants)
from sgmft.models.output import ModelOutput
from sgmft.models.registry import FUSIONS, MODELS, build_model, list_models

__all__ = ["FUSIONS", "MODELS", "ModelOutput", "build_model", "list_models"]
