"""Helpers for the run-folder safety tests: a tiny store and preset, and a training process
that SIGKILLs itself at a chosen point (run as ``python tests/resume_support.py KILL STORE OUT``).

Kill points (``KILL``):
  ``step:N``       at the start of global step N (mid-epoch when N is not a multiple of the
                   number of batches per epoch)
  ``epoch:E``      right after epoch E's end-of-epoch work (between two epochs)
  ``ckpt-write:E`` while writing epoch E's last.ckpt (its temp file is written, not renamed)
  ``export``       while exporting model/ (after model.safetensors is written into the temp folder)
  ``none``         no kill
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def tiny_preset(epochs=4, **train):
    from sgmft.config import load_preset

    p = load_preset("sgmft")
    p.model.n_tokens, p.model.attn_dim, p.model.heads, p.model.ffn_hidden = 4, 8, 2, 16
    p.model.classifier_hidden = [16, 16, 16, 16]
    p.model.dropout = 0.2                      # dropout draws from the RNG a resume must restore
    p.train.epochs, p.train.lr, p.train.batch_size, p.train.progress = epochs, 3e-3, 16, False
    for k, v in train.items():
        setattr(p.train, k, v)
    return p


def tiny_store(path, **kw):
    from conftest import make_store

    kw.setdefault("n", 120)
    kw.setdefault("dim", 16)
    kw.setdefault("k", 3)
    return make_store(path, **kw)


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill: str) -> None:
    what, _, arg = kill.partition(":")
    if what == "step":
        from sgmft.train.module import LitClassifier

        orig = LitClassifier.training_step

        def step(self, batch, batch_idx):
            if self.global_step == int(arg):
                _die()
            return orig(self, batch, batch_idx)

        LitClassifier.training_step = step
    elif what == "epoch":
        from sgmft.train.resume import RunRecorder

        orig = RunRecorder.on_train_epoch_end

        def end(self, trainer, module):
            orig(self, trainer, module)
            if trainer.current_epoch == int(arg):
                _die()

        RunRecorder.on_train_epoch_end = end
    elif what == "ckpt-write":
        import sgmft.atomic as A
        import sgmft.train.resume as R

        state = {"epoch": -1}
        orig_end = R.RunRecorder.on_train_epoch_end
        orig_replace = A.os.replace

        def end(self, trainer, module):
            state["epoch"] = trainer.current_epoch
            return orig_end(self, trainer, module)

        def replace(src, dst):                   # the temp file is complete, the rename not done
            if state["epoch"] == int(arg) and Path(dst).name == "last.ckpt":
                _die()
            return orig_replace(src, dst)

        A.os.replace = replace
        R.RunRecorder.on_train_epoch_end = end
    elif what == "export":
        import sgmft.checkpoint as C

        orig = C.save_file

        def save_file(tensors, path, *a, **k):
            orig(tensors, path, *a, **k)
            _die()

        C.save_file = save_file
    elif what != "none":
        raise SystemExit(f"unknown kill point {kill!r}")


if __name__ == "__main__":
    kill, store, out = sys.argv[1:4]
    epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    import sgmft.train.resume as R

    if kill.startswith("sparse/"):      # the default: last.ckpt after the first and the last epoch only (tiny epochs)
        kill = kill.removeprefix("sparse/")
    else:                               # last.ckpt after every epoch, so each kill point has its checkpoint
        R.CHECKPOINT_EVERY_S = 0.0
    arm(kill)
    from sgmft.train import train

    train(store, out, tiny_preset(epochs))
    print("finished", flush=True)
