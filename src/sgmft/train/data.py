"""Batches of post features read straight from a (memory-mapped) feature store."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sgmft.features import FeatureStore


class FeatureDataset(Dataset):
    """Rows ``indices`` of a store; ``__getitems__`` reads a whole batch with one sorted fancy index."""

    def __init__(self, store: FeatureStore, indices: np.ndarray, with_labels: bool = True):
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.with_labels = with_labels and store.labels is not None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, positions) -> dict[str, torch.Tensor]:
        rows = self.indices[np.asarray(positions, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        srt = rows[order]
        s = self.store

        def take(a):
            return torch.from_numpy(np.ascontiguousarray(a[srt][inverse]))

        batch = {
            "text": take(s.text).float(),
            "image": take(s.image).float(),
            "index": torch.from_numpy(rows),
        }
        if s.text_mask is not None:
            batch["text_mask"] = take(s.text_mask)
        if s.image_mask is not None:
            batch["image_mask"] = take(s.image_mask)
        if self.with_labels:
            batch["label"] = take(s.labels).long()
        return batch


def _identity(batch):
    return batch


def make_loader(store: FeatureStore, indices, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0, with_labels: bool = True) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(FeatureDataset(store, indices, with_labels), batch_size=batch_size,
                      shuffle=shuffle, generator=gen, collate_fn=_identity,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
