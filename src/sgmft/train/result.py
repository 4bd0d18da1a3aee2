"""What :func:`sgmft.train.train` returns (shared by the training loop and the selecting presets)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    best_val_acc: float | None
    seconds: float
    status: str = "trained"        # "trained", "resumed" (finished an interrupted run) or "complete"
                                   # (it was already complete: nothing was done)
