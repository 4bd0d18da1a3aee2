"""Peers: QMF and PDF, the published dynamic-fusion methods, re-created as heads on the same
frozen features (issue 17 item 3; docs/design.md "Peers: QMF and PDF" states what differs).

Both are late fusions: each modality m (text t, image v) has an encoder and its own
classifier giving logits l_m(x) in R^K, and the fused logits are a per-post weighted sum

    logits(x) = w_t(x) l_t(x) + w_v(x) l_v(x)                                      (eq P1)

with weights that estimate, per post, how reliable each modality is. Their encoders
(fine-tuned BERT and ResNet in the papers) become here one hidden layer on the frozen
features, ``Linear(D, hidden) -> ReLU -> Dropout`` (``hidden: 0`` = a linear classifier on
the features, as the official code's default ``--hidden []`` has on top of its encoders).
Training adds each modality's own cross-entropy, as both official trainers do.

``qmf``  QMF, Zhang et al., ICML 2023, "Provable Dynamic Fusion for Low-Quality Multimodal
         Data"; code QingyangZhang/QMF. The weight is the energy-based confidence
             w_m = -E_m(x) / T = logsumexp_c l_m(x)_c / T,  T = 10                   (eq P2)
         (src/models/late_fusion.py, lines 30-39: ``txt_energy = log(sum(exp(txt_out)))``,
         ``txt_conf = txt_energy / 10``, fusion with ``txt_conf.detach()``), and a ranking
         regulariser ties w_m to each post's historical loss: the cumulative training CE of
         modality m on that post, min-max normalised over the posts seen, ranks pairs of
         posts (each post and the next in the batch); the post with the larger historical
         loss must not have the larger confidence, up to the margin |c_1 - c_2|       (eq P3)
         (text-image-classification/train_qmf.py, ``rank_loss`` and ``model_forward``;
         RGBD-scene-recognition/utils/crl_utils.py, ``History``).
``pdf``  PDF, Cao et al., ICML 2024, "Predictive Dynamic Fusion is Guaranteed"; code
         Yinan-Xia/PDF. A ConfidNet per modality (three linear layers and a sigmoid, on the
         detached encoder features) predicts the Mono-confidence: the true-class
         probability TCP_m = softmax(l_m)_y, learnt with an L1 loss (train_pdf.py,
         ``tcp_pred_loss``). The Holo-confidence of m is
             holo_t = log TCP_v / (log(TCP_t TCP_v) + 1e-8)   (and symmetrically)     (eq P4)
         the co-belief is cb_m = TCP_m + holo_m, and w = softmax(cb_t, cb_v), detached
         (src/models/latefusion_pdf.py, lines 42-57, branch ``pdf_train``). At inference,
         relative calibration scales the co-belief of the more uncertain modality: with the distribution
         uncertainty du_m = mean_c |p_m(c) - 1/K|, RC_m = min(1, du_m / du_other),
         w = softmax(cb_t RC_t, cb_v RC_v)                                            (eq P5)
         (latefusion_pdf.py, lines 59-81, branch ``pdf_test``).

Missing modalities (mask False) get the learned placeholder of :class:`ModalityInput` as in
every model, and, beyond the papers, weight 0 in eq P1 (PDF: excluded from the softmax).
"""

from __future__ import annotations

from sgmft.errors import ConfigError  # noqa: E402,I001  (user errors: SgmftError and ValueError)


import torch
import torch.nn.functional as F
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.blocks import ModalityInput
from sgmft.models.comparisons import HeadOutput, head_options
from sgmft.models.options import ArchOptions, NoOptions, option
from sgmft.models.registry import MODELS

__all__ = ["QMF", "PDF", "LossHistory", "qmf_rank_loss"]


class _LateFusion(nn.Module):
    """Inputs, one encoder and one classifier per modality: the part QMF and PDF share."""

    reads: tuple[str, ...] = ("dropout",)
    Options: type[ArchOptions] = NoOptions
    #: LitClassifier passes the batch's store rows to ``aux_loss_fn(out, labels, index=...)``
    aux_loss_wants_index = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.opt = head_options(cfg, self.Options)
        h = int(self.opt["hidden"])
        if h < 0:
            raise ConfigError(f"{cfg.arch}: hidden must be >= 0 (0 = a linear classifier), got {h}")
        scale = cfg.resolved_input_scale()
        self.text_in, self.image_in = ModalityInput(cfg.dim, scale, "text"), ModalityInput(cfg.dim, scale, "image")
        self.enc_t, self.enc_v = self._encoder(cfg.dim, h, cfg.dropout), self._encoder(cfg.dim, h, cfg.dropout)
        self.feat_dim = h or cfg.dim
        self.cls_t, self.cls_v = nn.Linear(self.feat_dim, cfg.num_classes), nn.Linear(self.feat_dim, cfg.num_classes)

    @staticmethod
    def _encoder(dim: int, hidden: int, dropout: float) -> nn.Module:
        if hidden == 0:
            return nn.Dropout(dropout)
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))

    def unimodal(self, text, image, text_mask, image_mask):
        """(z_t, z_v, l_t, l_v): encoder features and unimodal logits."""
        zt = self.enc_t(self.text_in(text, text_mask))
        zv = self.enc_v(self.image_in(image, image_mask))
        return zt, zv, self.cls_t(zt), self.cls_v(zv)

    @staticmethod
    def present(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """(B,) 1.0 where the modality is present (all ones without a mask)."""
        if mask is None:
            return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
        return mask.to(like.dtype)

    def unimodal_ce(self, out: HeadOutput, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = out.extras
        return (F.cross_entropy(e["logits_text"], labels, reduction="none"),
                F.cross_entropy(e["logits_image"], labels, reduction="none"))


# --------------------------------------------------------------------------- QMF
class LossHistory:
    """QMF's per-sample history (crl_utils.py ``History``): the cumulative training loss of
    one modality on every post, keyed by the post's row in the feature store. Training state
    only: not in the state dict, so neither saved nor exported (a resumed run starts afresh)."""

    def __init__(self):
        self.total = torch.zeros(0)
        self.seen = torch.zeros(0, dtype=torch.bool)

    def __len__(self) -> int:
        return int(self.seen.sum())

    def update(self, index: torch.Tensor, loss: torch.Tensor) -> None:
        """``correctness_update``: add each post's loss to its running total."""
        index = index.to(torch.long).cpu()
        need = int(index.max()) + 1 if index.numel() else 0
        if need > self.total.numel():
            size = max(need, 2 * self.total.numel())
            self.total = torch.cat([self.total, torch.zeros(size - self.total.numel())])
            self.seen = torch.cat([self.seen, torch.zeros(size - self.seen.numel(), dtype=torch.bool)])
        self.total.index_add_(0, index, loss.detach().float().cpu())
        self.seen[index] = True

    def target_margin(self, i1: torch.Tensor, i2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``get_target_margin``: sign and size of the difference of the normalised totals."""
        i1, i2 = i1.to(torch.long).cpu(), i2.to(torch.long).cpu()
        seen = self.total[self.seen]
        lo, hi = seen.min(), seen.max()
        if hi <= lo:                                     # nothing to rank yet (the paper's 0/0)
            z = torch.zeros(len(i1))
            return z, z.clone()
        c1, c2 = (self.total[i1] - lo) / (hi - lo), (self.total[i2] - lo) / (hi - lo)
        return torch.sign(c1 - c2), (c1 - c2).abs()


def qmf_rank_loss(conf: torch.Tensor, index: torch.Tensor, history: LossHistory) -> torch.Tensor:
    """Eq P3 (train_qmf.py ``rank_loss``): pair each post with the next one in the batch; a
    post with the larger historical loss is penalised for the larger confidence."""
    conf2, index2 = torch.roll(conf, -1), torch.roll(index, -1)
    target, margin = (t.to(conf.device, conf.dtype) for t in history.target_margin(index, index2))
    nonzero = torch.where(target == 0, torch.ones_like(target), target)
    conf2 = conf2 + margin / nonzero
    return F.margin_ranking_loss(conf, conf2, -target, margin=0.0)


@MODELS.register("qmf")
class QMF(_LateFusion):
    """QMF (Zhang et al. 2023): energy-confidence-weighted late fusion + ranking regulariser
    on per-post loss history (eqs P1-P3 above)."""

    class Options(ArchOptions):      # hidden and temperature: range checked in __init__ (one message)
        hidden: int = option(512, "encoder width per modality (0 = a linear classifier on the features)")
        temperature: float = option(10.0, "T of eq P2, > 0 (late_fusion.py: energy / 10)")
        uni_weight: float = option(1.0, "unimodal CE terms (train_qmf.py: CE_t + CE_v + CE_fused)", ge=0)
        rank_weight: float = option(1.0, "eq P3 (train_qmf.py text-image: weight 1; the RGB-D trainer's 0.1)",
                                    ge=0)
    aux_loss_wants_index = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if float(self.opt["temperature"]) <= 0:
            raise ConfigError("qmf: temperature must be > 0")
        self.history = {"text": LossHistory(), "image": LossHistory()}

    def forward(self, text, image, text_mask=None, image_mask=None) -> HeadOutput:
        zt, zv, lt, lv = self.unimodal(text, image, text_mask, image_mask)
        temp = float(self.opt["temperature"])
        conf_t, conf_v = lt.logsumexp(-1) / temp, lv.logsumexp(-1) / temp            # eq P2
        wt = conf_t.detach() * self.present(text_mask, lt)
        wv = conf_v.detach() * self.present(image_mask, lv)
        logits = wt[:, None] * lt + wv[:, None] * lv                                  # eq P1
        fused = torch.cat([wt[:, None] * zt, wv[:, None] * zv], dim=1)
        return HeadOutput(logits=logits, fused=fused, extras={
            "logits_text": lt, "logits_image": lv, "conf_text": conf_t, "conf_image": conf_v,
            "weights": torch.stack([wt, wv], dim=-1)})

    def aux_loss_fn(self, out: HeadOutput, labels: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        ce_t, ce_v = self.unimodal_ce(out, labels)
        loss = float(self.opt["uni_weight"]) * (ce_t.mean() + ce_v.mean())
        w = float(self.opt["rank_weight"])
        if w > 0 and self.training and index is not None:   # train_qmf.py: update, then rank
            e = out.extras
            rank = out.logits.new_zeros(())
            for name, ce in (("text", ce_t), ("image", ce_v)):
                self.history[name].update(index, ce)
                rank = rank + qmf_rank_loss(e[f"conf_{name}"], index, self.history[name])
            loss = loss + w * rank
        return loss


# --------------------------------------------------------------------------- PDF
def _confidnet(width: int) -> nn.Module:
    """latefusion_pdf.py lines 24-35: three linear layers (no activation between) and a sigmoid."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.Linear(2 * width, width), nn.Linear(width, 1), nn.Sigmoid())


@MODELS.register("pdf")
class PDF(_LateFusion):
    """PDF (Cao et al. 2024): Mono-/Holo-confidence co-belief weights, relative calibration at
    inference (eqs P1, P4, P5 above)."""

    class Options(ArchOptions):      # hidden: range checked in __init__ (one message)
        hidden: int = option(512, "encoder width per modality (0 = a linear classifier on the features)")
        uni_weight: float = option(1.0, "unimodal CE terms (train_pdf.py: CE_t + CE_v + CE_fused)", ge=0)
        tcp_weight: float = option(1.0, "L1 loss of the predicted TCP (train_pdf.py: tcp_pred_loss, weight 1)",
                                   ge=0)
        confid_weight_decay: float = option(
            1.0, "L2 on each ConfidNet's first layer (the official run: weight_decay 1)", ge=0)
        relative_calibration: bool = option(True, "eq P5 at inference")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.confid_t, self.confid_v = _confidnet(self.feat_dim), _confidnet(self.feat_dim)

    @staticmethod
    def relative_calibration(lt: torch.Tensor, lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq P5: RC_t, RC_v (latefusion_pdf.py lines 68-72)."""
        k = lt.shape[-1]
        du_t = (torch.softmax(lt, -1) - 1.0 / k).abs().mean(-1)
        du_v = (torch.softmax(lv, -1) - 1.0 / k).abs().mean(-1)
        more_t = du_t > du_v
        rc_t = torch.where(more_t, torch.ones_like(du_t), du_t / du_v.clamp_min(1e-12))
        rc_v = torch.where(more_t, du_v / du_t.clamp_min(1e-12), torch.ones_like(du_v))
        return rc_t, rc_v

    def forward(self, text, image, text_mask=None, image_mask=None) -> HeadOutput:
        zt, zv, lt, lv = self.unimodal(text, image, text_mask, image_mask)
        tcp_t = self.confid_t(zt.detach()).squeeze(-1)                    # Mono-confidence
        tcp_v = self.confid_v(zv.detach()).squeeze(-1)
        log_t, log_v = tcp_t.clamp_min(1e-6).log(), tcp_v.clamp_min(1e-6).log()
        holo_t = log_v / (log_t + log_v + 1e-8)                           # eq P4 (log(ab) = log a + log b)
        holo_v = log_t / (log_t + log_v + 1e-8)
        cb_t, cb_v = tcp_t + holo_t, tcp_v + holo_v                        # co-belief
        if not self.training and self.opt["relative_calibration"]:
            rc_t, rc_v = self.relative_calibration(lt, lv)
            cb_t, cb_v = cb_t * rc_t, cb_v * rc_v
        cb = torch.stack([cb_t, cb_v], dim=-1).detach()
        present = torch.stack([self.present(text_mask, lt), self.present(image_mask, lv)], dim=-1)
        w = torch.softmax(cb.masked_fill(present == 0, -1e4), dim=-1)     # an absent modality: weight 0
        logits = w[:, :1] * lt + w[:, 1:] * lv                             # eq P1
        fused = torch.cat([w[:, :1] * zt, w[:, 1:] * zv], dim=1)
        return HeadOutput(logits=logits, fused=fused, extras={
            "logits_text": lt, "logits_image": lv, "tcp_text": tcp_t, "tcp_image": tcp_v, "weights": w})

    def aux_loss_fn(self, out: HeadOutput, labels: torch.Tensor) -> torch.Tensor:
        e = out.extras
        ce_t, ce_v = self.unimodal_ce(out, labels)
        loss = float(self.opt["uni_weight"]) * (ce_t.mean() + ce_v.mean())
        # TCP target: the true-class probability of each unimodal classifier, detached (train_pdf.py)
        tcp_t = torch.softmax(e["logits_text"], -1).gather(1, labels[:, None]).squeeze(1).detach()
        tcp_v = torch.softmax(e["logits_image"], -1).gather(1, labels[:, None]).squeeze(1).detach()
        tcp_loss = F.l1_loss(e["tcp_text"], tcp_t) + F.l1_loss(e["tcp_image"], tcp_v)
        loss = loss + float(self.opt["tcp_weight"]) * tcp_loss
        wd = float(self.opt["confid_weight_decay"])
        if wd > 0:   # Adam's coupled weight decay == the gradient of wd/2 ||W||^2
            loss = loss + 0.5 * wd * (self.confid_t[0].weight.square().sum() + self.confid_v[0].weight.square().sum())
        return loss
