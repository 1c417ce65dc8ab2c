"""Loading built for a GPU: workers only read int16 batches from the waveform store.

Each item of the dataset is a whole batch of store rows, read in sorted order
(neighbouring clips of a shard coalesce into few reads). Conversion to float,
features, augmentation and label lookup all happen on the device, so the CPU
side stays a cheap memcpy however large the model's appetite.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.waveform_store import WaveformStore


class StoreBatches(Dataset):
    """Batches of waveform-store rows; the store is opened lazily, once per worker process."""

    def __init__(self, store_path: Path, batches: Sequence[np.ndarray]):
        self.store_path = store_path
        self.batches = batches
        self._store: WaveformStore | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._store is None:
            self._store = WaveformStore.open(self.store_path)
        rows = np.sort(self.batches[index])
        return torch.from_numpy(self._store.read(rows)), torch.from_numpy(rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}  # workers open their own handle


def batch_loader(store_path: Path, batches: Sequence[np.ndarray], *, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding (int16 waveforms (B, samples), store rows (B,)) per batch."""
    workers = dict(num_workers=num_workers, multiprocessing_context="spawn", prefetch_factor=4,
                   persistent_workers=False) if num_workers > 0 else {}
    return DataLoader(StoreBatches(store_path, batches), batch_size=None, shuffle=False, pin_memory=pin_memory,
                      **workers)


def sequential_batches(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def class_balanced_weights(labels: np.ndarray, offset: float = 100.0) -> np.ndarray:
    """EfficientAT's sampling weight: the sum over a clip's classes of 1000 / (class count + offset)."""
    counts = labels.sum(axis=0).astype(np.float64)
    return labels.astype(np.float64) @ (1000.0 / (counts + offset))


def weighted_batches(rows: np.ndarray, weights: np.ndarray, n_samples: int, batch_size: int,
                     rng: np.random.Generator, drop_last: bool = True) -> list[np.ndarray]:
    """Draw `n_samples` distinct rows with probability proportional to `weights`, then batch them.

    Weighted sampling without replacement by Efraimidis-Spirakis keys (u ** (1 / w),
    largest first): one vectorised pass, however large the dataset.
    """
    n_samples = min(n_samples, int(np.count_nonzero(weights)))
    keys = rng.random(len(rows)) ** (1.0 / np.maximum(weights, 1e-12))
    keys[weights <= 0] = -1.0
    chosen = rows[np.argsort(-keys, kind="stable")[:n_samples]]
    rng.shuffle(chosen)
    batches = sequential_batches(chosen, batch_size)
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
