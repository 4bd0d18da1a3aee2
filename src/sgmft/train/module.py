"""Lightning wrapper: cross-entropy (eq 19) + any auxiliary loss, Adam (section 4.2)."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
import torchmetrics

from sgmft.config import ModelConfig, TrainConfig
from sgmft.models import build_model, forward_batch


class LitClassifier(L.LightningModule):
    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig):
        super().__init__()
        self.save_hyperparameters({"model": asdict(model_cfg), "train": asdict(train_cfg)})
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.model = build_model(model_cfg)
        k = model_cfg.num_classes
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=k)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=k)
        self.val_f1 = torchmetrics.F1Score(task="multiclass", num_classes=k, average="macro")

    def forward(self, batch):
        return forward_batch(self.model, batch)

    def _loss(self, out, y, index=None):
        """CE (eq 19) + a label-free ``out.aux_loss`` + the model's ``aux_loss_fn(out, y)`` if any
        (unimodal / contrastive terms of the UniS-MMC- and BalanceMLA-style heads; a model with
        ``aux_loss_wants_index`` also gets the batch's store rows, for QMF's per-post history)."""
        from sgmft.models.registry import training_loss

        return training_loss(self.model, out, y, index)

    def training_step(self, batch, batch_idx):
        out = self(batch)
        loss = self._loss(out, batch["label"], batch.get("index"))
        # a NaN/Inf loss stops the run at once (every rank agrees), naming where (docs/training.md)
        finite = bool(torch.isfinite(loss.detach()))
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            from sgmft.train.resume import NonFiniteError

            raise NonFiniteError(
                f"non-finite training loss ({float(loss.detach())}) at epoch {self.current_epoch}, step "
                f"{self.global_step} (batch {batch_idx} of the epoch; both count from 0): training stopped and "
                f"nothing was exported. The learning rate (lr={self.train_cfg.lr:g}) may be too high or the "
                "features too large; fix it, then re-run with --overwrite (or a new --out)")
        self.train_acc(out.logits, batch["label"])
        bs = len(batch["label"])
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def validation_step(self, batch, _):
        out = self(batch)
        loss = self._loss(out, batch["label"])
        self.val_acc(out.logits, batch["label"])
        self.val_f1(out.logits, batch["label"])
        bs = len(batch["label"])
        self.log("val_loss", loss, on_epoch=True, batch_size=bs, sync_dist=True)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("val_macro_f1", self.val_f1, on_epoch=True, batch_size=bs)

    def configure_optimizers(self):
        t = self.train_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        groups = getattr(self.model, "param_groups", None)   # a head that sets its own per-group lr
        groups = groups(t.lr) if groups is not None else [{"params": params}]
        # torch's fused Adam (same update, one kernel for all tensors): 4x cheaper than the
        # default on CPU, where it is a sizeable part of a `paper` preset step (11M parameters)
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
        return torch.optim.Adam(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                fused=fused or None)


class EpochLines(L.Callback):
    """One line per finished epoch on stderr when no progress bar is drawn (stderr is not a
    terminal): ``sgmft train: epoch 3/10  train_loss 0.512  val_acc 0.871``. Long runs print about
    20 lines (every k-th epoch, the first and the last)."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.every = max(1, -(-epochs // 20))

    def on_train_epoch_end(self, trainer, pl_module) -> None:     # after validation, as RunRecorder
        import sys

        e = trainer.current_epoch + 1
        if not trainer.is_global_zero or (e % self.every and e not in (1, self.epochs)):
            return
        m = trainer.callback_metrics
        parts = [f"{k} {float(m[k]):.4f}" for k in ("train_loss", "val_loss", "val_acc") if k in m]
        print(f"sgmft train: epoch {e}/{self.epochs}  " + "  ".join(parts), file=sys.stderr, flush=True)
