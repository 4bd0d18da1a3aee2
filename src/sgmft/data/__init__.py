"""Datasets: the SimFeat synthetic benchmark, splits."""

from sgmft.data.simfeat import SimFeatConfig, SimFeatData, generate_simfeat, write_simfeat

__all__ = ["SimFeatConfig", "SimFeatData", "generate_simfeat", "write_simfeat"]
