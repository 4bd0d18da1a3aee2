"""The one inference object every front end shares (CLI, Python, and the HTTP service in sgmft.serve).

It holds a trained model with its label map and the feature contract (backbone, D,
normalisation) and turns feature vectors into class probabilities.  Raw posts go through
:mod:`sgmft.ingest` / :mod:`sgmft.features.backbones` first (``sgmft predict`` wires them up).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sgmft.atomic import atomic_file
from sgmft.checkpoint import load_checkpoint
from sgmft.features import FeatureStore
from sgmft.models import forward_batch
from sgmft.predict.output import PredictionWriter, prediction_format


class BackboneMismatchError(ValueError):
    """The backbone given for prediction is not the one the model's features came from."""


class PrecisionMismatchError(BackboneMismatchError):
    """Features or a backbone at another precision (fp32/bf16/int8) than the training features'."""


@dataclass
class Predictions:
    probs: np.ndarray              # (N, K) softmax probabilities
    fused: np.ndarray | None       # (N, F) M_fuse, when asked for
    label_names: list[str]

    @property
    def top(self) -> np.ndarray:
        return self.probs.argmax(1)


class Predictor:
    def __init__(self, model: torch.nn.Module, label_names: list[str], features: dict,
                 device: str = "cpu", info: dict | None = None):
        self.model = model.to(device).eval()
        self.label_names = list(label_names)
        self.features = features
        self.device = device
        self.info = info or {}

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
            raise ValueError("save_pretrained needs a Predictor made by Predictor.load / from_pretrained "
                             "(it writes the model config)")
        src = self.info.get("path")
        run = locate(src)[1] if src is not None else None
        old_card = Path(src) / CARD if src is not None else None
        if run is None and old_card is not None and old_card.is_file():
            card = old_card.read_text(encoding="utf-8")
        else:
            card = model_card(self._card_info(), run, name=name)
        return write_model_folder(out_dir, self.model, self.info["model_cfg"], self.label_names, self.features,
                                  self.info.get("train"), self.info.get("preset", ""), {CARD: card})

    def _card_info(self) -> dict:
        return {"model_cfg": self.info["model_cfg"], "label_names": self.label_names, "features": self.features,
                "preset": self.info.get("preset", ""), "train": self.info.get("train")}

    @property
    def dim(self) -> int:
        return int(self.features["dim"])

    def check_store(self, store: FeatureStore, *, allow_precision_mismatch: bool = False) -> None:
        """Refuse features that do not match what the model was trained on (D, backbone, and the
        extraction precision fp32/bf16/int8 unless ``allow_precision_mismatch``)."""
        if store.dim != self.dim:
            raise ValueError(f"{store.path}: features have D={store.dim}, the model expects D={self.dim}")
        want, got = self.features.get("backbone"), store.backbone
        if want and got and want != got:
            raise ValueError(f"{store.path}: features come from backbone {got!r}, the model was trained "
                             f"on {want!r}; extract features with the same backbone")
        want_p = (self.features.get("extraction") or {}).get("backbone_precision")
        got_p = (store.meta.get("extra") or {}).get("backbone_precision")
        if want_p and got_p and want_p != got_p and not allow_precision_mismatch:
            raise PrecisionMismatchError(
                f"{store.path}: features were extracted at precision {got_p}, the model was trained on "
                f"{want_p} features; re-extract with `sgmft extract --precision {want_p}` or accept the "
                "difference with --allow-precision-mismatch (allow_precision_mismatch=True)")

    @torch.inference_mode()
    def predict_features(self, text, image, text_mask=None, image_mask=None, *,
                         batch_size: int = 512, return_fused: bool = False) -> Predictions:
        text, image = np.asarray(text), np.asarray(image)
        if text.ndim != 2 or text.shape != image.shape or text.shape[1] != self.dim:
            raise ValueError(f"expected text and image of shape (N, {self.dim}), got "
                             f"{text.shape} and {image.shape}")
        probs, fused = [], []
        for s in range(0, len(text), batch_size):
            sl = slice(s, s + batch_size)
            batch = {"text": torch.as_tensor(text[sl], dtype=torch.float32, device=self.device),
                     "image": torch.as_tensor(image[sl], dtype=torch.float32, device=self.device)}
            if text_mask is not None:
                batch["text_mask"] = torch.as_tensor(np.asarray(text_mask[sl]), device=self.device)
            if image_mask is not None:
                batch["image_mask"] = torch.as_tensor(np.asarray(image_mask[sl]), device=self.device)
            out = forward_batch(self.model, batch)
            probs.append(torch.softmax(out.logits.float(), -1).cpu().numpy())
            if return_fused:
                fused.append(out.fused.float().cpu().numpy())
        k = len(self.label_names)
        return Predictions(np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
                           np.concatenate(fused) if return_fused and fused else None, self.label_names)

    def predict_store(self, store, indices=None, *, batch_size: int = 512,
                      return_fused: bool = False, allow_precision_mismatch: bool = False) -> Predictions:
        fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        self.check_store(fs, allow_precision_mismatch=allow_precision_mismatch)
        idx = np.arange(len(fs)) if indices is None else np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")                    # memmap reads in row order
        rows = idx[order]
        parts = [self.predict_features(
            fs.text[r], fs.image[r],
            None if fs.text_mask is None else fs.text_mask[r],
            None if fs.image_mask is None else fs.image_mask[r],
            batch_size=batch_size, return_fused=return_fused)
            for r in np.array_split(rows, max(1, -(-len(rows) // 8192)))]   # bounded memory
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        probs = np.concatenate([p.probs for p in parts])[inv]
        fused = np.concatenate([p.fused for p in parts])[inv] if return_fused else None
        return Predictions(probs, fused, self.label_names)

    def predict_store_to_file(self, store, out_path, *, split: str = "all", batch_size: int = 512,
                              chunk: int = 8192, progress: bool = False,
                              allow_precision_mismatch: bool = False) -> dict:
        """Predict every post of a feature store (labelled or not) into ``out_path``.

        Rows follow the one prediction schema (:mod:`sgmft.predict.output`): ``id, pred,
        prob_<place>..., true`` (``true`` only when the store has labels; empty / absent for
        an unlabelled row), CSV when ``out_path`` ends in ``.csv``, else JSONL; written
        atomically, ``chunk`` rows at a time (bounded memory). ``split``: ``all`` or a split
        of the store's ``split.npy``. Returns a summary dict (``posts``, ``predicted``,
        ``labelled``, ``accuracy`` when some rows are labelled, ``out``, ``seconds``).
        """
        t0 = time.perf_counter()
        fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        self.check_store(fs, allow_precision_mismatch=allow_precision_mismatch)
        if split == "all":
            rows = np.arange(len(fs))
        elif fs.split is None:
            raise ValueError(f"{fs.path}: the store has no split.npy, so --split {split!r} is undefined; "
                             "use --split all")
        else:
            rows = fs.indices(split)
        store_names = fs.label_names
        labels = None if fs.labels is None else fs.labels
        with_true = labels is not None and bool(np.any(np.asarray(labels[rows]) >= 0))
        out_path = Path(out_path)
        counts: Counter = Counter()
        n_labelled = n_correct = 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), unit="post", desc="predict", disable=not progress, dynamic_ncols=True)
        try:
            with atomic_file(out_path, "w", encoding="utf-8", newline="") as f:
                writer = PredictionWriter(f, prediction_format(out_path), self.label_names, with_true=with_true)
                for s in range(0, len(rows), chunk):
                    r = rows[s:s + chunk]
                    probs = self.predict_store(fs, r, batch_size=batch_size,
                                               allow_precision_mismatch=allow_precision_mismatch).probs
                    top = probs.argmax(1)
                    counts.update(self.label_names[i] for i in top)
                    true = None
                    if with_true:
                        lab = np.asarray(labels[r])
                        true = [store_names[i] if i >= 0 else None for i in lab]
                        known = lab >= 0
                        n_labelled += int(known.sum())
                        n_correct += sum(t == self.label_names[i] for t, i, k in zip(true, top, known) if k)
                    writer.write(np.asarray(fs.ids[r]), probs, true)
                    bar.update(len(r))
        finally:
            bar.close()
        summary = {"posts": int(len(rows)), "out": str(out_path), "store": str(fs.path), "split": split,
                   "predicted": {n: counts[n] for n in self.label_names if counts[n]},
                   "labelled": n_labelled, "seconds": round(time.perf_counter() - t0, 2)}
        if n_labelled:
            summary["accuracy"] = n_correct / n_labelled
        return summary
