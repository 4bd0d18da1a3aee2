"""Datasets: the SimFeat synthetic benchmark, splits."""

from importlib import import_module

_LAZY = {  # name -> module; imported on first use
    "SimFeatConfig": "sgmft.data.simfeat",
    "SimFeatData": "sgmft.data.simfeat",
    "generate_simfeat": "sgmft.data.simfeat",
    "write_simfeat": "sgmft.data.simfeat",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
