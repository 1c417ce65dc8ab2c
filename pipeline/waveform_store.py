"""The waveform store: every clip decoded once to int16 at one sample rate, in Zarr.

Layout of `waveforms.zarr` (one row per manifest clip, in manifest order):
  waveform (N, samples) int16   chunks of one clip (read one clip alone), shards of
                                `shard_clips` clips (one file, and one writer, each)
  labels   (N, classes) uint8   multi-hot
  labelled (N,) bool            the clip's labels were given (False: unlabelled audio, a source
                                with `labels: none`); a labelled clip may have no positive class
  clip_id, split (N,) str
  status   (N,) str             "ok", or why the clip was skipped ("" = not decoded yet)
  message  (N,) str             details for skipped clips
  done     (shards,) bool       shards completely written: the unit of resume
Attributes: sample_rate, clip_samples, shard_clips, class mids and names.

Zarr has no locks, so each shard is written by exactly one process. Every array is
verifiable (kdpipe.integrity): opened for reading, a store with a missing chunk file
where data was written is refused; a chunk that fails its checksum fails the read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdpipe.classes import ClassList
from kdpipe.integrity import array_settings, check_written, read_rows
from kdpipe.zarr_groups import create_done_flags, open_group

FORMAT = "kdpipe.waveforms/2"
STORE_FILE = "waveforms.zarr"  # in the prepare output
OK = "ok"
WHOLE_CHUNK_ROWS = 16384
"""Rows per chunk of the arrays written whole at creation (labels: 8.6 MB a chunk at 527 classes)."""


class WaveformStore:
    UNIT_ARRAYS = ("waveform", "status", "message")  # written shard by shard; the rest at creation

    def __init__(self, group: zarr.Group, path: Path):
        self.group = group
        self.path = path
        attrs = group.attrs
        self.sample_rate: int = attrs["sample_rate"]
        self.clip_samples: int = attrs["clip_samples"]
        self.shard_clips: int = attrs["shard_clips"]
        self.classes = ClassList(tuple(attrs["class_mids"]), tuple(attrs["class_names"]))
        self.waveform: zarr.Array = group["waveform"]
        self._columns: dict[str, np.ndarray] = {}  # per-clip columns read so far (not labels: 1 GB at 2 M)

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        clip_ids: list[str],
        splits: list[str],
        labels: np.ndarray,
        labelled: np.ndarray,
        classes: ClassList,
        sample_rate: int,
        clip_samples: int,
        shard_clips: int,
        compression: str = "none",
        attributes: dict[str, Any] | None = None,
    ) -> WaveformStore:
        """Create an empty store with all per-clip metadata written; waveforms follow shard by shard."""
        n = len(clip_ids)
        shard_clips = max(1, min(shard_clips, n))
        group = zarr.open_group(path, mode="w", attributes={
            "format": FORMAT,
            "sample_rate": sample_rate,
            "clip_samples": clip_samples,
            "shard_clips": shard_clips,
            "class_mids": list(classes.mids),
            "class_names": list(classes.names),
            "unit_arrays": list(cls.UNIT_ARRAYS),
            **(attributes or {}),
        })
        group.create_array(
            "waveform", shape=(n, clip_samples), dtype="int16", chunks=(1, clip_samples),
            shards=(shard_clips, clip_samples), fill_value=0, dimension_names=("clip", "sample"),
            **array_settings(compress=compression == "zstd"),
        )
        # Arrays written whole here take large chunks: a column of AudioSet's 2 M clips in 256-row chunks is
        # 7,813 files and 4 s to read. Those written shard by shard keep one chunk per shard (one writer each).
        whole = max(shard_clips, WHOLE_CHUNK_ROWS)
        per_clip = {"chunks": (whole,), "dimension_names": ("clip",), **array_settings()}
        group.create_array("labels", shape=(n, len(classes)), dtype="uint8", chunks=(whole, len(classes)),
                           fill_value=0, dimension_names=("clip", "class"), **array_settings())[:] = labels
        group.create_array("labelled", shape=(n,), dtype=bool, **per_clip)[:] = np.asarray(labelled, dtype=bool)
        group.create_array("clip_id", shape=(n,), dtype=str, **per_clip)[:] = np.asarray(clip_ids)
        group.create_array("split", shape=(n,), dtype=str, **per_clip)[:] = np.asarray(splits)
        per_shard = {**per_clip, "chunks": (shard_clips,)}
        group.create_array("status", shape=(n,), dtype=str, **per_shard)
        group.create_array("message", shape=(n,), dtype=str, **per_shard)
        create_done_flags(group, -(-n // shard_clips))
        return cls(group, path)

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> WaveformStore:
        """Open for reading (refusing missing chunks) or, with mode "r+", for resuming a build."""
        group = open_group(path, mode, FORMAT)
        if mode == "r":
            check_written(path)
        return cls(group, path)

    # ------------------------------------------------------------- layout
    @property
    def n_clips(self) -> int:
        return self.waveform.shape[0]

    @property
    def n_shards(self) -> int:
        return self.group["done"].shape[0]

    def shard_rows(self, shard: int) -> range:
        start = shard * self.shard_clips
        return range(start, min(start + self.shard_clips, self.n_clips))

    # ------------------------------------------------------------ writing
    def write_shard(self, shard: int, waves: np.ndarray, status: list[str], messages: list[str]) -> None:
        """Write one shard's waveforms and outcomes (the caller is its only writer)."""
        rows = self.shard_rows(shard)
        region = slice(rows.start, rows.stop)
        self.waveform[region] = waves
        self.group["status"][region] = np.asarray(status)
        self.group["message"][region] = np.asarray(messages)
        self._columns.clear()

    def mark_done(self, shard: int) -> None:
        self.group["done"][shard] = True

    def done_shards(self) -> np.ndarray:
        return self.group["done"][:]

    # ------------------------------------------------------------ reading
    def column(self, name: str) -> np.ndarray:
        """A whole per-clip array: clip_id, split, labels, labelled, status or message. One-dimensional ones are
        read once per handle (a training start asks for `labelled` and `status` several times)."""
        if name == "labels":
            return read_rows(self.group[name], self.path)
        if name not in self._columns:
            column = read_rows(self.group[name], self.path)
            column.flags.writeable = False  # shared by every caller
            self._columns[name] = column
        return self._columns[name]

    def labels(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), C) bool labels of sorted store `rows`, reading only their chunks: an evaluation split
        needs its 20 k rows, not AudioSet's whole 1 GB label matrix."""
        return read_rows(self.group["labels"], self.path, rows=np.asarray(rows)).astype(bool)

    def labelled(self) -> np.ndarray:
        """(N,) bool: clips whose labels were given, as prepare recorded them. The others are unlabelled audio
        (a source with `labels: none`), which teaches a KD student through teacher targets only. A labelled
        clip with no positive class is a negative for every class, not unlabelled."""
        return self.column("labelled")

    def rows(self, split: str | None = None) -> np.ndarray:
        """Indices of the decoded (status ok) clips, optionally of one split."""
        keep = self.column("status") == OK
        if split is not None:
            keep &= self.column("split") == split
        return np.flatnonzero(keep)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """int16 waveforms of the given rows, in the given order.

        Rows are read in sorted order, each run of consecutive rows as one slice: zarr's
        orthogonal selection costs ~13 ms per clip from a shard, a slice ~0.5-1 ms.
        """
        rows = np.asarray(rows)
        order = np.argsort(rows, kind="stable")
        ranked = rows[order]
        breaks = np.flatnonzero(np.diff(ranked) != 1) + 1
        runs = zip(np.r_[0, breaks], np.r_[breaks, len(ranked)])
        out = np.empty((len(rows), self.clip_samples), dtype=np.int16)
        if len(rows):
            out[order] = np.concatenate([read_rows(self.waveform, self.path, int(ranked[a]), int(ranked[b - 1]) + 1)
                                         for a, b in runs])
        return out
