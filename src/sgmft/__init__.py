"""sgmft: semantic location prediction from social-media posts (SG-MFT and baselines)."""

__version__ = "0.1.0"

from sgmft.labels import DEFAULT_LABELS  # noqa: E402

__all__ = ["DEFAULT_LABELS", "__version__"]
