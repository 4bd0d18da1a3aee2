"""The one inference object every front end shares (CLI, Python, and the HTTP service in sgmft.serve).

It holds a trained model with its label map and the feature contract (backbone, D,
normalisation) and turns feature vectors into class probabilities.  Raw posts go through
:mod:`sgmft.ingest` / :mod:`sgmft.features.backbones` first (``sgmft predict`` wires them up).
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sgmft.checkpoint import FeatureContract, calibrated_probs, load_checkpoint
from sgmft.features import FeatureStore
from sgmft.models import forward_batch
from sgmft.predict.output import PredictionBatch, write_prediction_batches


from sgmft.errors import BackboneMismatchError, PrecisionMismatchError  # noqa: E402,F401  (one class everywhere)


def check_min_confidence(min_confidence) -> float | None:
    """``None``, or a number in [0, 1] (else a ValueError that names ``min_confidence``)."""
    if min_confidence is None:
        return None
    try:
        v = float(min_confidence)
    except (TypeError, ValueError):
        raise InputError(f"min_confidence must be a number in [0, 1], got {min_confidence!r}") from None
    if not 0.0 <= v <= 1.0:                       # also refuses NaN
        raise InputError(f"min_confidence must be in [0, 1], got {min_confidence!r}")
    return v


def uncertain_mask(probs: np.ndarray, min_confidence: float | None) -> np.ndarray:
    """True where the top probability is below ``min_confidence`` (all False for None)."""
    probs = np.asarray(probs)
    v = check_min_confidence(min_confidence)
    if v is None or len(probs) == 0:
        return np.zeros(len(probs), dtype=bool)
    return probs.max(1) < v


@dataclass
class Predictions:
    probs: np.ndarray              # (N, K) probabilities, calibrated as the checkpoint says (calibrated_probs)
    fused: np.ndarray | None       # (N, F) M_fuse, when asked for
    label_names: list[str]
    uncertain: np.ndarray | None = None    # (N,) bool: top probability below min_confidence (all False without)
    explanations: list[dict] | None = None  # one account per post (sgmft.predict.explain), when asked for
    logits: np.ndarray | None = None       # (N, K) raw logits, before calibration

    def __post_init__(self):
        if self.uncertain is None:
            self.uncertain = np.zeros(len(self.probs), dtype=bool)

    @property
    def top(self) -> np.ndarray:
        return self.probs.argmax(1)


class Predictor:
    def __init__(self, model: torch.nn.Module, label_names: list[str], features: dict,
                 device: str = "cpu", info: dict | None = None, calibration: dict | None = None):
        self.model = model.to(device).eval()
        self.label_names = list(label_names)
        self.features = features
        self.device = device
        self.info = info or {}
        # post-hoc calibration (sgmft.train.calibrate, calibrated_probs): the checkpoint's record
        # unless given; T = 1, eps = 0 = none (older checkpoints, calibration: none)
        cal = (calibration if calibration is not None else self.info.get("calibration")) or {}
        self.temperature = float(cal.get("temperature", 1.0))
        self.uniform_weight = float(cal.get("uniform_weight", 0.0))
        if not self.temperature > 0 or not 0 <= self.uniform_weight < 1:
            raise ValueError(f"calibration: temperature must be positive and uniform_weight in [0, 1), got "
                             f"{self.temperature}, {self.uniform_weight}")

    @classmethod
    def load(cls, path, device: str = "cpu") -> "Predictor":
        model, info = load_checkpoint(path)
        return cls(model, info["label_names"], info["features"], device, info)

    @classmethod
    def from_pretrained(cls, name_or_path, *, device: str = "cpu", revision: str | None = None,
                        cache_dir=None) -> "Predictor":
        """Load a run, a model folder or a Hugging Face hub id (``owner/name``; the local cache
        first, nothing downloaded when offline: the error says how to download it).
        See :mod:`sgmft.predict.pretrained`."""
        from sgmft.predict.pretrained import resolve_pretrained

        return cls.load(resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir), device=device)

    def save_pretrained(self, out_dir, *, name: str | None = None) -> Path:
        """Write a shareable model folder: the checkpoint files (safetensors + JSON + feature
        contract) and a model card ``README.md`` (built from the run folder when this model
        was loaded from one, else the card of the source folder is kept). Atomic."""
        from sgmft.checkpoint import write_model_folder
        from sgmft.card import CARD, model_card
        from sgmft.runs import locate

        if "model_cfg" not in self.info:
            raise InputError("save_pretrained needs a Predictor made by Predictor.load / from_pretrained "
                             "(it writes the model config)")
        src = self.info.get("path")
        run = locate(src)[1] if src is not None else None
        old_card = Path(src) / CARD if src is not None else None
        if run is None and old_card is not None and old_card.is_file():
            card = old_card.read_text(encoding="utf-8")
        else:
            card = model_card(self._card_info(), run, name=name)
        return write_model_folder(out_dir, self.model, self.info["model_cfg"], self.label_names, self.features,
                                  self.info.get("train"), self.info.get("preset", ""), {CARD: card},
                                  calibration=self._calibration_record())

    def _calibration_record(self) -> dict | None:
        """The calibration the saved folder carries: the loaded record with this temperature."""
        cal = dict(self.info.get("calibration") or {})
        if cal.get("method", "none") == "none" and self.temperature == 1.0 and not self.uniform_weight:
            return None
        method = "temperature_uniform" if self.uniform_weight else "temperature"
        return {**cal, "method": method, "temperature": self.temperature, "uniform_weight": self.uniform_weight}

    def _card_info(self) -> dict:
        return {"model_cfg": self.info["model_cfg"], "label_names": self.label_names, "features": self.features,
                "preset": self.info.get("preset", ""), "train": self.info.get("train")}

    @property
    def dim(self) -> int:
        return int(self.features["dim"])

    @property
    def contract(self) -> FeatureContract:
        """The feature contract (:class:`sgmft.checkpoint.FeatureContract`) with the model's D."""
        return dataclasses.replace(FeatureContract.from_dict(self.features), dim=self.dim)

    def check_store(self, store: FeatureStore, *, allow_precision_mismatch: bool = False) -> None:
        """Refuse features that do not match what the model was trained on (D, backbone, and the
        extraction precision fp32/bf16/int8 unless ``allow_precision_mismatch``)."""
        self.contract.check_store(store, allow_precision_mismatch=allow_precision_mismatch)   # the one check

    def _probs(self, logits: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities (:func:`calibrated_probs`; T = 1, eps = 0: the raw softmax)."""
        return calibrated_probs(logits.float(), self.temperature, self.uniform_weight).cpu().numpy()

    def _batch(self, text, image, text_mask, image_mask, sl: slice) -> dict:
        batch = {"text": torch.as_tensor(text[sl], dtype=torch.float32, device=self.device),
                 "image": torch.as_tensor(image[sl], dtype=torch.float32, device=self.device)}
        if text_mask is not None:
            batch["text_mask"] = torch.as_tensor(np.asarray(text_mask[sl]), device=self.device)
        if image_mask is not None:
            batch["image_mask"] = torch.as_tensor(np.asarray(image_mask[sl]), device=self.device)
        return batch

    @torch.inference_mode()
    def predict_features(self, text, image, text_mask=None, image_mask=None, *,
                         batch_size: int = 512, return_fused: bool = False, min_confidence: float | None = None,
                         explain: bool = False) -> Predictions:
        """Feature vectors ``(N, D)`` (and optional bool masks) -> :class:`Predictions`.

        ``probs`` are calibrated as the checkpoint says (:func:`calibrated_probs`); ``min_confidence`` (in
        [0, 1]) marks posts whose top probability is below it as ``uncertain`` (their
        probabilities are kept); ``explain`` adds one account per post of which modality
        decided (:mod:`sgmft.predict.explain`; masking costs two more forward passes)."""
        from sgmft.predict.explain import explain_batch

        check_min_confidence(min_confidence)
        text, image = np.asarray(text), np.asarray(image)
        if text.ndim != 2 or text.shape != image.shape or text.shape[1] != self.dim:
            raise InputError(f"expected text and image of shape (N, {self.dim}), got "
                             f"{text.shape} and {image.shape}")
        probs, fused, logits, expl = [], [], [], []
        for s in range(0, len(text), batch_size):
            batch = self._batch(text, image, text_mask, image_mask, slice(s, s + batch_size))
            out = forward_batch(self.model, batch)
            logits.append(out.logits.float().cpu().numpy())
            probs.append(self._probs(out.logits))
            if return_fused:
                fused.append(out.fused.float().cpu().numpy())
            if explain:
                expl += explain_batch(out, batch, probs[-1],
                                      lambda b: self._probs(forward_batch(self.model, b).logits))
        k = len(self.label_names)
        p = np.concatenate(probs) if probs else np.zeros((0, k), np.float32)
        return Predictions(p, np.concatenate(fused) if return_fused and fused else None, self.label_names,
                           uncertain_mask(p, min_confidence), expl if explain else None,
                           np.concatenate(logits) if logits else np.zeros((0, k), np.float32))

    def predict_store(self, store, indices=None, *, batch_size: int = 512,
                      return_fused: bool = False, allow_precision_mismatch: bool = False,
                      min_confidence: float | None = None, explain: bool = False) -> Predictions:
        """:meth:`predict_features` on rows ``indices`` of a feature store (all by default), in
        the order given."""
        fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        self.check_store(fs, allow_precision_mismatch=allow_precision_mismatch)
        idx = np.arange(len(fs)) if indices is None else np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")                    # memmap reads in row order
        rows = idx[order]
        parts = [self.predict_features(
            fs.text[r], fs.image[r],
            None if fs.text_mask is None else fs.text_mask[r],
            None if fs.image_mask is None else fs.image_mask[r],
            batch_size=batch_size, return_fused=return_fused, min_confidence=min_confidence, explain=explain)
            for r in np.array_split(rows, max(1, -(-len(rows) // 8192)))]   # bounded memory
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        probs = np.concatenate([p.probs for p in parts])[inv]
        fused = np.concatenate([p.fused for p in parts])[inv] if return_fused else None
        expl = None
        if explain:
            flat = [e for p in parts for e in p.explanations]
            expl = [flat[i] for i in inv]
        return Predictions(probs, fused, self.label_names, np.concatenate([p.uncertain for p in parts])[inv], expl,
                           np.concatenate([p.logits for p in parts])[inv])

    def predict_store_to_file(self, store, out_path, *, split: str = "all", batch_size: int = 512,
                              chunk: int = 8192, progress: bool = False,
                              allow_precision_mismatch: bool = False, min_confidence: float | None = None) -> dict:
        """Predict every post of a feature store (labelled or not) into ``out_path``.

        Rows follow the one prediction schema (:mod:`sgmft.predict.output`): ``id, pred,
        prob_<place>..., true, uncertain, explanation...`` (``true`` only when the store has
        labels; empty / absent for an unlabelled row; ``uncertain``: top probability below
        ``min_confidence``), CSV when ``out_path`` ends in ``.csv``, else JSONL; written
        atomically, ``chunk`` rows at a time (bounded memory). ``split``: ``all`` or a split
        (train, val, test) taken as ``evaluate`` takes it: the run's own saved split when the
        model's run was trained on this store, else the store's ``split.npy``. Returns a summary dict (``posts``, ``predicted``,
        ``labelled``, ``accuracy`` when some rows are labelled, ``uncertain`` (a count), ``out``,
        ``seconds``).
        """
        t0 = time.perf_counter()
        check_min_confidence(min_confidence)
        fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        self.check_store(fs, allow_precision_mismatch=allow_precision_mismatch)
        from sgmft.runs import locate, split_rows

        src = self.info.get("path")         # the run's own split, as evaluate takes it
        rows = split_rows(fs, locate(src)[1] if src is not None else None, split)
        with_true = fs.labels is not None and bool(np.any(np.asarray(fs.labels[rows]) >= 0))

        def batches():
            for s in range(0, len(rows), chunk):
                r = rows[s:s + chunk]
                p = self.predict_store(fs, r, batch_size=batch_size, allow_precision_mismatch=allow_precision_mismatch,
                                       min_confidence=min_confidence, explain=True)
                true = [fs.label_names[i] if i >= 0 else None for i in np.asarray(fs.labels[r])] if with_true else None
                yield PredictionBatch(np.asarray(fs.ids[r]), p.probs, p.uncertain, p.explanations, true)

        tally = write_prediction_batches(out_path, self.label_names, batches(), total=len(rows), with_true=with_true,
                                         progress=progress, min_confidence=min_confidence, t0=t0)
        return tally.summary(store=str(fs.path), split=split)
