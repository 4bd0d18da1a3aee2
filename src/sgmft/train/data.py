"""Batches of post features read straight from a (memory-mapped) feature store."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``: the order of epoch ``e`` is the same
    whether the run went straight through or was killed and resumed before it. Lightning
    calls :meth:`set_epoch` at the start of every epoch (and forwards it through its
    distributed wrapper)."""

    def __init__(self, n: int, seed: int, draws_per_epoch: int = 1):
        self.n, self.seed, self.epoch, self.draws = int(n), int(seed), 0, int(draws_per_epoch)
        self._start: tuple[int, torch.Tensor] | None = None   # (epoch, the generator's state as that epoch begins)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        # The permutation a DataLoader(shuffle=True, generator=Generator().manual_seed(seed))
        # gives in epoch `epoch` of a run that goes straight through, recomputed from the seed,
        # so that results equal those of sgmft versions before exact resume. Per epoch that
        # loader draws the iterator's base seed and the epoch's permutation, plus a second,
        # empty-remainder permutation when the last batch is partial (`draws_per_epoch` 2).
        # The state at the start of the last epoch served is kept, so epoch e + 1 replays one epoch, not
        # e + 1 (a run of 1,000 one-step epochs drew 500,000 permutations); a resumed run replays from 0.
        g = torch.Generator().manual_seed(self.seed)
        done = 0
        if self._start is not None and self._start[0] <= self.epoch:
            done = self._start[0]
            g.set_state(self._start[1])
        for _ in range(done, self.epoch):
            torch.empty((), dtype=torch.int64).random_(generator=g)
            for _ in range(self.draws):
                torch.randperm(self.n, generator=g)
        self._start = (self.epoch, g.get_state())
        torch.empty((), dtype=torch.int64).random_(generator=g)
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_loader(store: FeatureStore, indices, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0, with_labels: bool = True, full_epochs: bool = True) -> DataLoader:
    """``full_epochs``: every epoch reads the whole loader (no ``limit_train_batches``)."""
    ds = FeatureDataset(store, indices, with_labels)
    # a private generator: creating an iterator draws a worker base seed from it, never from
    # the global RNG that dropout uses
    gen = torch.Generator().manual_seed(seed)
    draws = 2 if full_epochs and len(ds) % batch_size else 1
    return DataLoader(ds, batch_size=batch_size, sampler=EpochSampler(len(ds), seed, draws) if shuffle else None,
                      generator=gen, collate_fn=_identity,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
