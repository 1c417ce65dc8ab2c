"""Loading built for a GPU: workers only read int16 batches from the waveform store.

Each item of the dataset is a whole batch of store rows, read in sorted order
(neighbouring clips of a shard coalesce into few reads). Conversion to float,
features, augmentation and label lookup all happen on the device, so the CPU
side stays a cheap memcpy however large the model's appetite.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdpipe.processes import loader_worker_dies_with_parent
from kdpipe.waveform_store import WaveformStore


class StoreRows(Dataset):
    """Reads a batch of store rows per item; the store is opened lazily, once per worker process."""

    def __init__(self, store_path: Path):
        self.store_path = store_path
        self._store: WaveformStore | None = None

    def __getitem__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._store is None:
            self._store = WaveformStore.open(self.store_path)
        rows = np.sort(rows)
        return torch.from_numpy(self._store.read(rows)), torch.from_numpy(rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}  # workers open their own handle


class _BatchList(Sampler):
    """The batches of the current pass; lives in the main process, so the next pass can replace them."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """Worker processes that read batches of store rows, started once and reused by every pass.

    A pass is `loader(batches)`: iterate it for (int16 waveforms (B, samples), store rows (B,))
    per batch, in order. Spawned workers import torch, which takes seconds: a training run
    that started new ones for every epoch and every evaluation would make the GPU wait for
    that each time. One pass at a time.
    """

    def __init__(self, store_path: Path, *, num_workers: int = 0, pin_memory: bool = False):
        self._sampler = _BatchList()
        workers = dict(num_workers=num_workers, multiprocessing_context="spawn", prefetch_factor=4,
                       persistent_workers=True, worker_init_fn=loader_worker_dies_with_parent) if num_workers > 0 else {}
        self._loader = DataLoader(StoreRows(store_path), batch_size=None, sampler=self._sampler,
                                  pin_memory=pin_memory, **workers)

    def __call__(self, batches: Sequence[np.ndarray]) -> DataLoader:
        self._sampler.batches = list(batches)
        return self._loader


def batch_loader(store_path: Path, batches: Sequence[np.ndarray], *, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """One pass over `batches`: (int16 waveforms (B, samples), store rows (B,)) per batch."""
    return BatchLoader(store_path, num_workers=num_workers, pin_memory=pin_memory)(batches)


def sequential_batches(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


SAMPLING_OFFSET = 100.0
"""EfficientAT's smoothing of class counts in its sampling weights."""
_WEIGHT_ROWS = 65536  # rows per step of the weighted sum: float32 temporaries of (65536, C), not (N, C)


def class_weights(labels: np.ndarray, rows: np.ndarray, offset: float = SAMPLING_OFFSET) -> np.ndarray:
    """EfficientAT's per-class sampling weight 1000 / (count + offset), the counts over `rows` of `labels` (N, C)."""
    counts = np.zeros(labels.shape[1], dtype=np.int64)
    for start in range(0, len(rows), _WEIGHT_ROWS):
        counts += labels[rows[start:start + _WEIGHT_ROWS]].sum(axis=0, dtype=np.int64)
    return (1000.0 / (counts + offset)).astype(np.float32)


def class_balanced_weights(labels: np.ndarray, rows: np.ndarray | None, per_class: np.ndarray) -> np.ndarray:
    """EfficientAT's clip weight: the sum of `per_class` over the clip's classes, for `rows` of `labels`
    (all of them when None). Multi-hot labels of any dtype; summed in float32 a block of rows at a time."""
    n = len(labels) if rows is None else len(rows)
    weights = np.empty(n, dtype=np.float64)
    for start in range(0, n, _WEIGHT_ROWS):
        block = labels[start:start + _WEIGHT_ROWS] if rows is None else labels[rows[start:start + _WEIGHT_ROWS]]
        weights[start:start + len(block)] = block.astype(np.float32) @ per_class
    return weights


def weighted_batches(rows: np.ndarray, weights: np.ndarray, n_samples: int, batch_size: int,
                     rng: np.random.Generator, drop_last: bool = True) -> list[np.ndarray]:
    """Draw `n_samples` distinct rows with probability proportional to `weights`, then batch them.

    Weighted sampling without replacement by Efraimidis-Spirakis keys, u ** (1 / w) largest first,
    computed as log(u) / w (the same order): u ** (1 / w) underflows to 0 for the small weights of
    common classes (w ~ 0.001 for AudioSet's Speech), and ties would then be broken by row order.
    One vectorised pass, however large the dataset.
    """
    positive = weights > 0
    n_samples = min(n_samples, int(np.count_nonzero(positive)))
    keys = np.full(len(rows), -np.inf)
    keys[positive] = np.log(rng.random(len(rows))[positive]) / weights[positive]
    chosen = rows[np.argsort(-keys, kind="stable")[:n_samples]]
    rng.shuffle(chosen)
    batches = sequential_batches(chosen, batch_size)
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
