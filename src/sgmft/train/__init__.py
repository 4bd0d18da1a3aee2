"""Training on cached features (Lightning), checkpoints, evaluation."""

from sgmft.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sgmft.train.fit import TrainResult, train

__all__ = ["CheckpointError", "TrainResult", "load_checkpoint", "save_checkpoint", "train"]
