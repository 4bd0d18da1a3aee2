"""Training on cached features (Lightning), checkpoints, evaluation."""

from sgmft.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sgmft.train.fit import TrainResult, train
from sgmft.train.resume import NonFiniteError, ResumeCheckpointError

__all__ = ["CheckpointError", "NonFiniteError", "ResumeCheckpointError", "TrainResult", "load_checkpoint",
           "save_checkpoint", "train"]
