"""Resume state without pickle, and what a run records once per epoch.

Lightning's checkpoint is a nested dict (weights, optimiser state, loop counters, callback
state). :class:`SafeCheckpointIO` writes it as one safetensors file: the tensors as
tensors, everything else as a JSON skeleton in the file's metadata, with a tag for each
non-JSON container (``{"$t": key}`` a tensor, ``{"$d": [[k, v], ...]}`` a dict with any
keys, ``{"$u": [...]}`` a tuple). Reading it parses the safetensors header and JSON only:
nothing is ever unpickled, so a planted or corrupt ``last.ckpt`` is refused with a
one-line error and never runs code. Only the types listed above (and bool, int, float,
str, None, lists) can be stored; anything else is an error at save time.

:class:`RunRecorder` is the callback that, after each epoch's validation, appends the
epoch's metrics to the run's history, keeps the best epoch's weights
(``best.safetensors``), saves ``last.ckpt`` (every epoch) and rewrites ``metrics.csv``
from the history. The history, the best score and the RNG states (torch CPU and CUDA,
numpy, Python) travel inside ``last.ckpt``, so a resumed run continues with the same
dropout masks and keeps every earlier epoch's metrics.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from sgmft import atomic
from sgmft.runs import RunDir

FORMAT, VERSION = "sgmft-resume", 1
META_KEY = "sgmft"
METRIC_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1")


from sgmft.errors import InputError  # noqa: E402  (user errors: SgmftError and ValueError)


class ResumeCheckpointError(InputError):
    """A resume checkpoint that cannot be used; the message names the file and what to do."""


from sgmft.errors import InputError  # noqa: E402  (user errors: SgmftError and ValueError)


class NonFiniteError(InputError):
    """Training produced a NaN or infinite loss or weights; nothing is exported."""


# -- encoding ------------------------------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: set, where: str):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu")
        if not t.is_contiguous() or t.data_ptr() in seen:
            t = t.contiguous().clone()
        seen.add(t.data_ptr())
        key = f"t{len(tensors)}"
        tensors[key] = t
        return {"$t": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return int(obj) if isinstance(obj, int) else float(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _encode(torch.from_numpy(np.ascontiguousarray(obj)), tensors, seen, where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {"$d": [[_encode(k, tensors, seen, f"{where}[{k!r}] (key)"),
                        _encode(v, tensors, seen, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$u": [_encode(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"resume checkpoint: cannot store a {type(obj).__name__} at {where} "
                    "(only tensors, numbers, strings, None, lists, tuples and dicts)")


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(node, list):
        return [_decode(v, tensors, where) for v in node]
    if isinstance(node, dict):
        if set(node) == {"$t"} and node["$t"] in tensors:
            return tensors[node["$t"]]
        if set(node) == {"$u"} and isinstance(node["$u"], list):
            return tuple(_decode(v, tensors, where) for v in node["$u"])
        if set(node) == {"$d"} and isinstance(node["$d"], list) and all(
                isinstance(p, list) and len(p) == 2 for p in node["$d"]):
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in node["$d"]}
        raise ResumeCheckpointError(f"{where}: malformed resume state (unexpected JSON object "
                                    f"{json.dumps(node)[:80]})")
    return node


def encode_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` for :func:`safetensors.torch.save_file`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, set(), "checkpoint")
    # one metadata key: safetensors writes several in no fixed order, and the file's bytes
    # must not depend on it (a resumed run is compared byte for byte)
    meta = {META_KEY: json.dumps({"format": FORMAT, "version": VERSION, "state": skeleton}, allow_nan=True)}
    return tensors, meta


def save_state(state: dict, path) -> Path:
    """Write ``state`` atomically (:func:`sgmft.atomic.atomic_file`) as a safetensors file."""
    path = Path(path)
    tensors, meta = encode_state(state)
    data = save(tensors, metadata=meta)
    atomic.write_bytes(path, data)
    return path


def _refuse(path: Path, why: str) -> ResumeCheckpointError:
    return ResumeCheckpointError(
        f"{path}: {why}. sgmft never unpickles checkpoints. Start the run again with --overwrite "
        "(or train into a new --out).")


def load_state(path) -> dict:
    """Read a file written by :func:`save_state`; anything else is refused without running code."""
    path = Path(path)
    if not path.is_file():                   # a FIFO or device would block or never end
        raise _refuse(path, "not a regular file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _refuse(path, f"not a readable sgmft resume checkpoint (safetensors: {first}); it may be "
                            "corrupt, or a pickle-based checkpoint from elsewhere") from None
    try:
        doc = json.loads(raw) if raw is not None else {}
    except ValueError as e:
        raise _refuse(path, f"resume state is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _refuse(path, "not an sgmft resume checkpoint (a safetensors file without sgmft's resume state)")
    if doc.get("version") != VERSION:
        raise _refuse(path, f"resume checkpoint version {doc.get('version')!r}; this sgmft reads version {VERSION}")
    state = _decode(doc.get("state"), tensors, str(path))
    if not isinstance(state, dict):
        raise _refuse(path, "resume state is not a dict")
    return state


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through :func:`save_state` / :func:`load_state` (no pickle).

    ``preloaded``: states already read and checked (path -> state), handed over without a
    second read."""

    def __init__(self, preloaded: dict[str, dict] | None = None):
        super().__init__()
        self._preloaded = dict(preloaded or {})

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        save_state(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        state = self._preloaded.pop(str(path), None)
        return state if state is not None else load_state(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


# -- RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every global generator a training step may draw from (dropout uses torch's)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"key": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached_gaussian": float(np_state[4]),
                       "state": torch.from_numpy(np_state[1].astype(np.int64))},
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda])


# -- the per-epoch recorder ----------------------------------------------------------------------
def _finite_module(module: torch.nn.Module) -> str | None:
    """Name of the first parameter or buffer with a NaN/Inf, or None."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    keys = ["epoch", "step"] + [k for k in METRIC_KEYS if any(k in row for row in history)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else repr(row[k]) if isinstance(row[k], float) else row[k])
                    for k in keys})
    atomic.write_text(path, buf.getvalue())


# ``last.ckpt`` after an epoch only when this many seconds have passed since the last one (and always after the
# first and the last epoch). On a few hundred posts an epoch is one step and writing the checkpoint took 44 % of
# the run; a kill then costs at most this much work, redone from the older checkpoint to the same bytes.
CHECKPOINT_EVERY_S = 10.0


class RunRecorder(Callback):
    """Once per finished epoch, after validation: the history row, the best weights, then ``last.ckpt`` and
    ``metrics.csv`` when a save is due (:data:`CHECKPOINT_EVERY_S`). Each write is atomic; a kill between two of
    them, or epochs after the last save, is repaired by redoing those epochs from ``last.ckpt``, which rewrites
    the same bytes."""

    STATE_KEY = "sgmft.RunRecorder"

    def __init__(self, run: RunDir, has_val: bool, fingerprint: str = "", select_on: str = "val_acc"):
        self.run, self.has_val, self.fingerprint = run, has_val, fingerprint
        self.select_on = select_on          # TrainConfig.select_on: which epoch's weights are kept
        self.history: list[dict] = []
        self.best_score: float | None = None   # the validation accuracy of the kept epoch
        self.best_epoch: int | None = None
        self._saved_at: float | None = None    # monotonic time of this process's last checkpoint; None: none yet

    def _checkpoint_due(self, trainer, epoch: int) -> bool:
        """Rank 0 decides (a clock differs between ranks, and every rank must take part in the save)."""
        last = trainer.max_epochs is not None and trainer.max_epochs >= 0 and epoch + 1 >= trainer.max_epochs
        due = self._saved_at is None or last or time.monotonic() - self._saved_at >= CHECKPOINT_EVERY_S
        return bool(trainer.strategy.broadcast(due, src=0))

    @property
    def state_key(self) -> str:
        return self.STATE_KEY

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "history": self.history, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(r) for r in state.get("history", [])]
        self.best_score, self.best_epoch = state.get("best_score"), state.get("best_epoch")
        if state.get("rng"):
            set_rng_state(state["rng"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = int(trainer.current_epoch)
        metrics = trainer.callback_metrics
        row = {"epoch": epoch, "step": int(trainer.global_step)}
        row.update({k: float(metrics[k]) for k in METRIC_KEYS if k in metrics})
        for k in ("train_loss", "val_loss"):
            if k in row and not np.isfinite(row[k]):
                raise NonFiniteError(f"non-finite {k.replace('_', ' ')} ({row[k]}) at epoch {epoch}: training "
                                     "stopped and nothing was exported; lower the learning rate or check the "
                                     "features, then re-run with --overwrite (or a new --out)")
        bad = _finite_module(pl_module.model)
        if bad:
            raise NonFiniteError(f"weights became non-finite ({bad}) at epoch {epoch}, step {trainer.global_step}: "
                                 "training stopped and nothing was exported; lower the learning rate, then "
                                 "re-run with --overwrite (or a new --out)")
        self.history = [r for r in self.history if r["epoch"] != epoch] + [row]
        improved = self.has_val and self._better(row)
        if improved:
            self.best_score, self.best_epoch = row.get("val_acc"), epoch
            if trainer.is_global_zero:
                save_weights(pl_module.model, self.run.best_weights)
        # metrics.csv with last.ckpt, not every epoch (rewriting every row each epoch is quadratic in the
        # epochs); training writes the whole history again when it ends
        if self._checkpoint_due(trainer, epoch):
            trainer.save_checkpoint(str(self.run.last_checkpoint))
            self._saved_at = time.monotonic()
            if trainer.is_global_zero:
                write_metrics_csv(self.run.metrics_csv, self.history)


    def _better(self, row: dict) -> bool:
        """Whether this epoch beats the kept one: higher val_acc, or lower val_loss (``select_on``)."""
        key = self.select_on
        if row.get(key) is None:
            return False
        if self.best_epoch is None:
            return True
        kept = next((r for r in self.history if r["epoch"] == self.best_epoch), None)
        if kept is None or kept.get(key) is None:
            return True
        return row[key] > kept[key] if key == "val_acc" else row[key] < kept[key]


def save_weights(model: torch.nn.Module, path) -> Path:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return save_state({"state_dict": state}, path)


def load_weights(path) -> dict[str, torch.Tensor]:
    state = load_state(path).get("state_dict")
    if not isinstance(state, dict):
        raise _refuse(Path(path), "no state_dict inside")
    return state
