"""Teacher logits in Zarr: one store per teacher while extracting, one combined store for training.

Per teacher (`logits.zarr`, the unit of caching and resume):
  logits (N, C) float16|float32, NaN fill: a row never written reads as NaN
  done   (chunks,) bool: chunks completely written, set after their data
Combined (`teachers.zarr`, what stage two reads):
  clip_id (N,) str                       aligned with the waveform store
  teachers/<name>/logits (N, C)          copied from each teacher's store
  ensemble/logits (N, C)                 weighted mean of the teachers
Rows are the waveform store's rows, so no lookup by id is ever needed inside
kdpipe; `clip_id` is there for export and for humans.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdpipe.errors import KdpipeError
from kdpipe.integrity import array_settings, check_written, read_rows
from kdpipe.zarr_groups import create_done_flags, open_group

TEACHER_FORMAT = "kdpipe.teacher-logits/1"
COMBINED_FORMAT = "kdpipe.teachers/1"
TEACHER_FILE = "logits.zarr"  # in each extract/<name> output
COMBINED_FILE = "teachers.zarr"  # in the extract-teachers output


class TeacherLogits:
    """One teacher's logits for every clip of the waveform store, written chunk by chunk."""

    def __init__(self, group: zarr.Group, path: Path):
        self.group = group
        self.path = path
        self.logits: zarr.Array = group["logits"]
        self.chunk_clips: int = self.logits.chunks[0]

    @classmethod
    def create(cls, path: Path, n_clips: int, n_classes: int, chunk_clips: int, dtype: str,
               attributes: dict[str, Any]) -> TeacherLogits:
        chunk_clips = max(1, min(chunk_clips, n_clips))
        group = zarr.open_group(path, mode="w", attributes={"format": TEACHER_FORMAT, "unit_arrays": ["logits"],
                                                             **attributes})
        group.create_array("logits", shape=(n_clips, n_classes), dtype=dtype, chunks=(chunk_clips, n_classes),
                           fill_value=np.nan, dimension_names=("clip", "class"), **array_settings())
        create_done_flags(group, -(-n_clips // chunk_clips))
        return cls(group, path)

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> TeacherLogits:
        """Open for reading (refusing missing chunks) or, with mode "r+", for resuming an extraction."""
        group = open_group(path, mode, TEACHER_FORMAT)
        if mode == "r":
            check_written(path)
        return cls(group, path)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start:stop (all by default), checksum-verified."""
        return read_rows(self.logits, self.path, start, stop)

    @property
    def n_chunks(self) -> int:
        return self.group["done"].shape[0]

    def chunk_rows(self, chunk: int) -> range:
        start = chunk * self.chunk_clips
        return range(start, min(start + self.chunk_clips, self.logits.shape[0]))

    def write_chunk(self, chunk: int, logits: np.ndarray) -> None:
        """Write one whole chunk (rows without audio stay NaN); the caller is its only writer."""
        rows = self.chunk_rows(chunk)
        self.logits[rows.start:rows.stop] = logits

    def mark_done(self, chunk: int) -> None:
        self.group["done"][chunk] = True

    def done_chunks(self) -> np.ndarray:
        return self.group["done"][:]


def write_combined(path: Path, clip_ids: np.ndarray, teachers: dict[str, TeacherLogits], weights: dict[str, float],
                   ensemble: str, dtype: str, attributes: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    """Copy each teacher's logits and add their weighted ensemble (mean of logits or of probabilities).

    `expected[name]` marks the rows that must have that teacher's logits (decoded clips; for imported
    logits, none): a NaN there is an error, never "no teacher", so a lost chunk cannot turn into
    clips without a KD target.
    """
    first = next(iter(teachers.values())).logits
    n_clips, n_classes = first.shape
    chunk = first.chunks[0]
    group = zarr.open_group(path, mode="w", attributes={"format": COMBINED_FORMAT, **attributes})
    group.create_array("clip_id", shape=(n_clips,), dtype=str, chunks=(chunk,), **array_settings())[:] = clip_ids
    spec = dict(shape=(n_clips, n_classes), dtype=dtype, chunks=(chunk, n_classes), fill_value=np.nan,
                dimension_names=("clip", "class"), **array_settings())
    copies = {name: group.create_array(f"teachers/{name}/logits", attributes=dict(store.group.attrs), **spec)
              for name, store in teachers.items()}
    mean = group.create_array("ensemble/logits", attributes={"weights": weights, "mode": ensemble}, **spec)
    total = sum(weights.values())
    for start in range(0, n_clips, chunk):
        block = {name: store.read(start, start + chunk).astype(np.float32) for name, store in teachers.items()}
        for name, values in block.items():
            missing = np.flatnonzero(expected[name][start:start + chunk] & ~np.isfinite(values).all(axis=1))
            if len(missing):
                raise KdpipeError(f"{teachers[name].path}: rows {', '.join(str(start + r) for r in missing[:5])} "
                                  f"should have teacher {name}'s logits and do not; run `kdpipe verify` and "
                                  "`kdpipe run` to rebuild them")
            copies[name][start:start + chunk] = values
        mean[start:start + chunk] = ensemble_of(block, weights, ensemble, total)


class CombinedLogits:
    """A finished `teachers.zarr` for reading: its format checked and no chunk file missing on open,
    every read checksum-verified."""

    def __init__(self, path: Path):
        self.path = path
        self.group = open_group(path, "r", COMBINED_FORMAT)
        check_written(path)

    @classmethod
    def in_folder(cls, out_dir: Path) -> CombinedLogits:
        """The combined store of an extract-teachers output folder."""
        return cls(out_dir / COMBINED_FILE)

    @property
    def teachers(self) -> list[str]:
        return sorted(self.group["teachers"].group_keys())

    def array(self, teacher: str | None = None) -> zarr.Array:
        """The ensemble's logits (teacher None) or one teacher's; an unknown name is an error naming the others."""
        if teacher is None:
            return self.group["ensemble/logits"]
        if teacher not in self.teachers:
            raise KdpipeError(f"no teacher named {teacher!r}; teachers: {', '.join(self.teachers)}")
        return self.group[f"teachers/{teacher}/logits"]

    def read(self, teacher: str | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """Logits of every row, or of `rows` (sorted store rows), as stored."""
        return read_rows(self.array(teacher), self.path, rows=rows)

    def attributes(self, teacher: str) -> dict[str, Any]:
        """What the teacher's extraction recorded (checkpoint, device, precision, metrics)."""
        return dict(self.array(teacher).attrs)

    def clip_ids(self) -> np.ndarray:
        return read_rows(self.group["clip_id"], self.path)


def ensemble_of(block: dict[str, np.ndarray], weights: dict[str, float], mode: str, total: float) -> np.ndarray:
    """Weighted mean of logits, or the logit of the weighted mean probability."""
    if mode == "logits":
        return sum(weights[name] * values for name, values in block.items()) / total
    probability = sum(weights[name] / (1.0 + np.exp(-values)) for name, values in block.items()) / total
    probability = np.clip(probability, 1e-7, 1 - 1e-7)
    return np.log(probability) - np.log1p(-probability)
