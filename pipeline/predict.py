"""Tag audio files of any length and sample rate: the model runs on windows of its training clip length.

A file is decoded (every format prepare reads), downmixed, resampled to the store's rate, and cut
into windows of `window_seconds` every `hop_seconds`; the last window is zero-padded, so a file
shorter than a window is one padded window. Windows run through the model in batches. The file's
answer averages the windows' probabilities, each weighted by the seconds of audio it holds: a
tail window that is mostly padding counts for little.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdpipe import console, frontends
from kdpipe.audio_io import AudioError, decode
from kdpipe.errors import ConfigError
from kdpipe.tagger import Tagger


@dataclass(frozen=True)
class Prediction:
    """One file's window probabilities and where each window lies in it."""

    path: Path
    seconds: float
    starts: np.ndarray  # (windows,) seconds
    ends: np.ndarray  # (windows,) seconds, at most the file's end
    window_probabilities: np.ndarray  # (windows, classes)

    @property
    def probabilities(self) -> np.ndarray:
        """The file's answer: the windows' probabilities weighted by the audio each holds."""
        return np.average(self.window_probabilities, axis=0, weights=self.ends - self.starts)


def window_starts(n_samples: int, window: int, hop: int) -> np.ndarray:
    """First samples of windows every `hop` up to the first that reaches the end; at least one."""
    return np.arange(1 + max(0, -(-(n_samples - window) // hop))) * hop


def read_mono(path: Path, sample_rate: int) -> np.ndarray:
    """A whole file as mono float32 at `sample_rate`; a missing or unreadable file is a usage error."""
    try:
        audio, rate = decode(path)
    except AudioError as exc:
        raise ConfigError(str(exc)) from None
    return frontends.resample(audio.mean(axis=0), rate, sample_rate)


def predict_file(tagger: Tagger, path: Path, window_seconds: float, hop_seconds: float,
                 batch_size: int) -> Prediction:
    """Sigmoid probabilities of every window of one file."""
    if window_seconds <= 0 or hop_seconds <= 0:
        raise ConfigError(f"window and hop must be positive, got {window_seconds} s and {hop_seconds} s")
    rate = tagger.sample_rate
    waveform = read_mono(path, rate)
    window, hop = round(window_seconds * rate), max(1, round(hop_seconds * rate))
    starts = window_starts(len(waveform), window, hop)
    padded = np.pad(waveform, (0, starts[-1] + window - len(waveform)))
    batches = np.array_split(starts, -(-len(starts) // batch_size))
    probabilities = np.concatenate([_probabilities(tagger, padded, batch, window) for batch in batches])
    ends = np.minimum(starts + window, len(waveform))
    return Prediction(path, len(waveform) / rate, starts / rate, ends / rate, probabilities)


def _probabilities(tagger: Tagger, waveform: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    windows = np.stack([waveform[start:start + window] for start in starts])
    return torch.sigmoid(tagger.logits(torch.from_numpy(windows))).numpy()


def predict_files(tagger: Tagger, paths: Sequence[Path], window_seconds: float | None = None,
                  hop_seconds: float | None = None, batch_size: int = 64) -> list[Prediction]:
    """Every file's prediction, with a progress bar; windows default to the training clip length, hop to the window."""
    window_seconds = window_seconds or tagger.clip_seconds
    hop_seconds = hop_seconds or window_seconds
    return [predict_file(tagger, Path(path), window_seconds, hop_seconds, batch_size)
            for path in console.track(paths, len(paths), f"predicting with {tagger.name}")]


def top_k(probabilities: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The k most probable classes, most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(names[i], float(probabilities[i])) for i in order]


def write_windows_csv(predictions: Sequence[Prediction], names: Sequence[str], path: Path, k: int) -> None:
    """One row per window: file, start and end in seconds, then its top k labels with their probabilities."""
    k = min(k, len(names))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["file", "start", "end", *(f"{column}_{rank}" for rank in range(1, k + 1)
                                                   for column in ("label", "probability"))])
        for prediction in predictions:
            for start, end, probabilities in zip(prediction.starts, prediction.ends,
                                                 prediction.window_probabilities):
                ranked = [item for label, p in top_k(probabilities, names, k) for item in (label, f"{p:.4f}")]
                writer.writerow([str(prediction.path), f"{start:.3f}", f"{end:.3f}", *ranked])
