"""Precomputed post features: the on-disk feature store (see docs/feature-store.md)."""

from sgmft.features.store import (
    FeatureStore,
    FeatureStoreError,
    FeatureStoreWriter,
    validate_feature_store,
    write_feature_store,
)

__all__ = [
    "FeatureStore",
    "FeatureStoreError",
    "FeatureStoreWriter",
    "validate_feature_store",
    "write_feature_store",
]
