"""Teacher logits in Zarr: one store per teacher while extracting, one combined store for training.

Per teacher (`logits.zarr`, the unit of caching and resume):
  logits (N, C) float16|float32, NaN fill: a row never written reads as NaN
  views  (N, K, C) the same, for the K augmented views of each clip (extract.views > 0 only;
         chunked one view at a time, so a training epoch reads only its view)
  done   (chunks,) bool: chunks completely written (logits and views), set after their data
Combined (`teachers.zarr`, what stage two reads):
  clip_id (N,) str                       aligned with the waveform store
  teachers/<name>/logits (N, C)          copied from each teacher's store
  ensemble/logits (N, C)                 weighted mean of the teachers
  ensemble/views (N, K, C)               the same for each view (views only; every class), or
  ensemble/views_topk/values (N, K, k)   the view's k largest ensemble logits (extract.topk > 0),
  ensemble/views_topk/indexes (N, K, k)  and their int16 class indexes (kdpipe.topk)
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
from kdpipe.topk import INDEX_DTYPE, Fill, expand_topk, keep_topk
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
        self.views: zarr.Array | None = group["views"] if "views" in group else None
        self.chunk_clips: int = self.logits.chunks[0]

    @classmethod
    def create(cls, path: Path, n_clips: int, n_classes: int, chunk_clips: int, dtype: str,
               attributes: dict[str, Any], views: int = 0) -> TeacherLogits:
        chunk_clips = max(1, min(chunk_clips, n_clips))
        arrays = ["logits", "views"] if views else ["logits"]
        group = zarr.open_group(path, mode="w", attributes={"format": TEACHER_FORMAT, "unit_arrays": arrays,
                                                             **attributes})
        group.create_array("logits", shape=(n_clips, n_classes), dtype=dtype, chunks=(chunk_clips, n_classes),
                           fill_value=np.nan, dimension_names=("clip", "class"), **array_settings())
        if views:
            group.create_array("views", shape=(n_clips, views, n_classes), dtype=dtype,
                               chunks=(chunk_clips, 1, n_classes), fill_value=np.nan,
                               dimension_names=("clip", "view", "class"), **array_settings())
        create_done_flags(group, -(-n_clips // chunk_clips))
        return cls(group, path)

    @property
    def n_views(self) -> int:
        return 0 if self.views is None else self.views.shape[1]

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

    def read_views(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(rows, K, C) view logits of rows start:stop, checksum-verified."""
        assert self.views is not None, "this teacher was extracted without views"
        return read_rows(self.views, self.path, start, stop)

    @property
    def n_chunks(self) -> int:
        return self.group["done"].shape[0]

    def chunk_rows(self, chunk: int) -> range:
        start = chunk * self.chunk_clips
        return range(start, min(start + self.chunk_clips, self.logits.shape[0]))

    def write_chunk(self, chunk: int, logits: np.ndarray, views: np.ndarray | None = None) -> None:
        """Write one whole chunk, and its views when the store has them (rows without audio stay NaN);
        the caller is its only writer."""
        rows = self.chunk_rows(chunk)
        self.logits[rows.start:rows.stop] = logits
        if self.views is not None:
            assert views is not None, "a store with views needs every chunk's views"
            self.views[rows.start:rows.stop] = views

    def mark_done(self, chunk: int) -> None:
        self.group["done"][chunk] = True

    def done_chunks(self) -> np.ndarray:
        return self.group["done"][:]


def write_combined(path: Path, clip_ids: np.ndarray, teachers: dict[str, TeacherLogits], weights: dict[str, float],
                   ensemble: str, dtype: str, attributes: dict[str, Any], expected: dict[str, np.ndarray],
                   topk: int = 0) -> None:
    """Copy each teacher's logits and add their weighted ensemble (mean of logits or of probabilities);
    with views, the ensemble of each view too, whole or as its top-k (`topk` > 0).

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
    n_views = {store.n_views for store in teachers.values()}
    if len(n_views) != 1:
        raise KdpipeError(f"the teachers were extracted with different numbers of views ({sorted(n_views)})")
    views = _view_arrays(group, n_clips, n_views.pop(), n_classes, chunk, dtype, topk)
    total = sum(weights.values())
    for start in range(0, n_clips, chunk):
        block = {name: store.read(start, start + chunk).astype(np.float32) for name, store in teachers.items()}
        for name, values in block.items():
            _check_present(values, expected[name][start:start + chunk], start, teachers[name].path, name)
            copies[name][start:start + chunk] = values
        mean[start:start + chunk] = ensemble_of(block, weights, ensemble, total)
        if views is None:
            continue
        view_block = {name: store.read_views(start, start + chunk).astype(np.float32)
                      for name, store in teachers.items()}
        for name, values in view_block.items():
            _check_present(values.reshape(len(values), -1), expected[name][start:start + chunk], start,
                           teachers[name].path, name)
        combined = ensemble_of(view_block, weights, ensemble, total)
        if topk:
            values, indexes = keep_topk(combined, topk, dtype)
            views[0][start:start + chunk], views[1][start:start + chunk] = values, indexes
        else:
            views[0][start:start + chunk] = combined


def _view_arrays(group: zarr.Group, n_clips: int, n_views: int, n_classes: int, chunk: int, dtype: str,
                 topk: int) -> tuple[zarr.Array, ...] | None:
    """The ensemble's view arrays: (views,) whole, (values, indexes) as top-k, or None without views."""
    if not n_views:
        return None
    if not topk or topk >= n_classes:
        return (group.create_array("ensemble/views", shape=(n_clips, n_views, n_classes), dtype=dtype,
                                   chunks=(chunk, 1, n_classes), fill_value=np.nan,
                                   dimension_names=("clip", "view", "class"), **array_settings()),)
    shape, chunks = (n_clips, n_views, topk), (chunk, 1, topk)
    names = ("clip", "view", "rank")
    return (group.create_array("ensemble/views_topk/values", shape=shape, dtype=dtype, chunks=chunks,
                               fill_value=np.nan, dimension_names=names, **array_settings()),
            group.create_array("ensemble/views_topk/indexes", shape=shape, dtype=INDEX_DTYPE, chunks=chunks,
                               fill_value=-1, dimension_names=names, **array_settings()))


def _check_present(values: np.ndarray, expected: np.ndarray, start: int, store: Path, name: str) -> None:
    """Rows that must have the teacher's logits and do not: an error, never "no teacher"."""
    missing = np.flatnonzero(expected & ~np.isfinite(values).all(axis=1))
    if len(missing):
        raise KdpipeError(f"{store}: rows {', '.join(str(start + r) for r in missing[:5])} should have teacher "
                          f"{name}'s logits and do not; run `kdpipe verify` and `kdpipe run` to rebuild them")


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

    @property
    def n_views(self) -> int:
        """K, the augmented views per clip the ensemble has targets for (0: clean clips only)."""
        if "ensemble/views" in self.group:
            return self.group["ensemble/views"].shape[1]
        if "ensemble/views_topk" in self.group:
            return self.group["ensemble/views_topk/values"].shape[1]
        return 0

    def read_view(self, view: int, fill: Fill = "zero", temperature: float = 1.0) -> np.ndarray:
        """(N, C) float32 ensemble logits of view `view` of every clip, divided by `temperature`; from top-k
        storage the classes not kept follow `fill` applied after that division (kdpipe.topk). Only that
        view's chunks are read."""
        if not 0 <= view < self.n_views:
            raise KdpipeError(f"{self.path}: no view {view}; the ensemble has {self.n_views} views")
        if "ensemble/views" in self.group:
            logits = read_rows(self.group["ensemble/views"], self.path, column=view).astype(np.float32)
            return logits / np.float32(temperature) if temperature != 1.0 else logits
        values = read_rows(self.group["ensemble/views_topk/values"], self.path, column=view)
        indexes = read_rows(self.group["ensemble/views_topk/indexes"], self.path, column=view)
        return expand_topk(values, indexes, self.group["ensemble/logits"].shape[1], fill, temperature)


def ensemble_of(block: dict[str, np.ndarray], weights: dict[str, float], mode: str, total: float) -> np.ndarray:
    """Weighted mean of logits, or the logit of the weighted mean probability."""
    if mode == "logits":
        return sum(weights[name] * values for name, values in block.items()) / total
    probability = sum(weights[name] / (1.0 + np.exp(-values)) for name, values in block.items()) / total
    probability = np.clip(probability, 1e-7, 1 - 1e-7)
    return np.log(probability) - np.log1p(-probability)
