"""Feature extraction and the HDF5 feature store (see docs/feature_store.md)."""
from pllcli.features.config import PRESETS, FeatureConfig, check_compatible  # noqa: F401
from pllcli.features.store import (  # noqa: F401
    FeatureStore, FeatureStoreWriter, merge_feature_stores, write_feature_store,
)
