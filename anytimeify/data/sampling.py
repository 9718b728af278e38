"""The data order of a training run: reproducible, resumable and shared out across processes.

:class:`EpochSampler` is a ``DistributedSampler`` (the same permutation per ``(seed, epoch)``, the
same split of positions across ranks) that also yields a seed per sample and can start part-way
through an epoch. :class:`SeededSamples` wraps a data set so that each sample's augmentation is
drawn from that seed. Together they make a sample's content a function of the run's seed, the
epoch and the sample's position in the epoch only: not of the number of DataLoader workers, of
the number of processes sharing a global batch, or of whether the run was interrupted and resumed.
"""
from __future__ import annotations

import random
from typing import Iterator, Tuple

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["EpochSampler", "SeededSamples", "sample_seed"]


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the sample at global ``position`` of ``epoch`` (a fixed integer hash)."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(position) * 0x94D049BB133111EB)
    return mixed % (2 ** 63 - 1)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(index, sample_seed)`` and can resume mid-epoch.

    Args:
        dataset: the data set (only its length is used).
        num_replicas: processes sharing each global batch (1 without DDP).
        rank: this process's rank.
        shuffle: a new permutation every epoch (``set_epoch``).
        seed: the run's seed.
        drop_last: drop the tail that does not divide evenly across ranks (else pad by repeating).

    Call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``; ``start`` skips the
    first ``start`` samples of this rank's share (the ones a resumed run has already seen).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        """Select the permutation of ``epoch`` and skip this rank's first ``start`` samples."""
        super().set_epoch(epoch)
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must lie in [0, {self.num_samples}] (this rank's samples per epoch), got {start}")
        self.start = int(start)

    def __iter__(self) -> Iterator[Tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        for k in range(self.start, len(indices)):
            position = self.rank + k * self.num_replicas  # where the sample sits in the global order
            yield int(indices[k]), sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededSamples(Dataset):
    """Wraps a map-style data set: ``wrapped[(index, seed)]`` is ``dataset[index]`` computed with
    torch's and Python's global generators seeded by ``seed`` (and restored afterwards).

    A plain integer index reads the data set without reseeding.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
