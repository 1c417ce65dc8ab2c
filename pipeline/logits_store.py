"""Teacher logits in Zarr: one store per teacher while extracting, one combined store for training.

Per teacher (`logits.zarr`, the unit of caching and resume):
  logits (N, C) float16|float32, NaN fill: a row never written reads as NaN
  views  (N, K, C) the same, for the K augmented views of each clip (extract.views > 0), or
  views_topk/values (N, K, k)   each view's k largest logits (extract.topk = k < C; kdpipe.topk)
  views_topk/indexes (N, K, k)  and their int16 class indexes; chunked one view at a time, so a
                                training epoch reads only its view
  done   (chunks,) bool: chunks completely written (logits and views), set after their data
  attribute view_plan: the recipe of the views (kdpipe.view_plan), which a student checks its config against
Combined (`teachers.zarr`, what stage two reads):
  clip_id (N,) str                        aligned with the waveform store
  teachers/<name>/...                     each teacher's arrays, hard links to its store's chunk files
                                          (a copy only across file systems): no second copy on disk
  ensemble/logits (N, C)                  weighted mean of the teachers' clean logits
  attribute view_plan                     the teachers' one view recipe
A view's ensemble target is computed when it is read (`CombinedLogits.read_view`), from every teacher's
stored view, in blocks of rows. Why views are stored per teacher as top-k, and what that costs the
ensemble, is docs/internals.md's "Storage: views at AudioSet scale": a teacher's full views are 84 GB at AudioSet's
2 M clips and K = 40, its top-20 6.4 GB, and adding a teacher computes that teacher alone.
Rows are the waveform store's rows, so no lookup by id is ever needed inside
kdpipe; `clip_id` is there for export and for humans.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdpipe.errors import KdpipeError
from kdpipe.integrity import array_settings, check_written, read_rows, row_blocks
from kdpipe.topk import INDEX_DTYPE, Fill, expand_topk, fill_unkept, keep_topk, kept_mask, mean_of_topk
from kdpipe.view_plan import NO_VIEWS, ViewPlan
from kdpipe.zarr_groups import create_done_flags, open_group

TEACHER_FORMAT = "kdpipe.teacher-logits/3"
COMBINED_FORMAT = "kdpipe.teachers/3"
TEACHER_FILE = "logits.zarr"  # in each extract/<name> output
COMBINED_FILE = "teachers.zarr"  # in the extract-teachers output
TOPK_VALUES, TOPK_INDEXES = "views_topk/values", "views_topk/indexes"
VIEW_PLAN = "view_plan"  # attribute: the ViewPlan the views were made by (kdpipe.view_plan)


class TeacherViews:
    """A teacher's stored views, whole or top-k (read-only; shared by the teacher's and the combined store)."""

    def __init__(self, group: zarr.Group, path: Path):
        self.path = path
        self.whole: zarr.Array | None = group["views"] if "views" in group else None
        self.topk: tuple[zarr.Array, zarr.Array] | None = (
            (group[TOPK_VALUES], group[TOPK_INDEXES]) if TOPK_VALUES in group else None)

    @property
    def n_views(self) -> int:
        arrays = (self.whole,) if self.whole is not None else self.topk or ()
        return arrays[0].shape[1] if arrays else 0

    def kept(self, view: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The top-k values and class indexes of view `view` of rows start:stop (None: stored whole)."""
        if self.topk is None:
            return None
        values, indexes = self.topk
        return (read_rows(values, self.path, start, stop, column=view),
                read_rows(indexes, self.path, start, stop, column=view))

    def every_class(self, view: int, start: int, stop: int) -> np.ndarray:
        """(rows, C) float32 logits of view `view` of rows start:stop, stored whole."""
        assert self.whole is not None, f"{self.path} has no views stored whole"
        return read_rows(self.whole, self.path, start, stop, column=view).astype(np.float32)


class TeacherLogits:
    """One teacher's logits for every clip of the waveform store, written chunk by chunk."""

    def __init__(self, group: zarr.Group, path: Path):
        self.group = group
        self.path = path
        self.logits: zarr.Array = group["logits"]
        self.views = TeacherViews(group, path)
        self.chunk_clips: int = self.logits.chunks[0]

    @classmethod
    def create(cls, path: Path, n_clips: int, n_classes: int, chunk_clips: int, dtype: str,
               attributes: dict[str, Any], plan: ViewPlan = NO_VIEWS, topk: int = 0) -> TeacherLogits:
        """A store for the clean clips and the views `plan` describes (recorded as attribute `view_plan`), each
        view kept whole or, with 0 < `topk` < `n_classes`, as its top-k."""
        chunk_clips = max(1, min(chunk_clips, n_clips))
        views = plan.count
        by_topk = views and 0 < topk < n_classes
        view_arrays = [TOPK_VALUES, TOPK_INDEXES] if by_topk else ["views"] if views else []
        group = zarr.open_group(path, mode="w", attributes={
            "format": TEACHER_FORMAT, "unit_arrays": ["logits", *view_arrays], VIEW_PLAN: plan.to_json(),
            **attributes})
        group.create_array("logits", shape=(n_clips, n_classes), dtype=dtype, chunks=(chunk_clips, n_classes),
                           fill_value=np.nan, dimension_names=("clip", "class"), **array_settings())
        names = ("clip", "view", "rank" if by_topk else "class")
        shape, chunks = (n_clips, views, topk if by_topk else n_classes), (chunk_clips, 1, topk if by_topk else n_classes)
        if by_topk:
            group.create_array(TOPK_VALUES, shape=shape, dtype=dtype, chunks=chunks, fill_value=np.nan,
                               dimension_names=names, **array_settings())
            group.create_array(TOPK_INDEXES, shape=shape, dtype=INDEX_DTYPE, chunks=chunks, fill_value=-1,
                               dimension_names=names, **array_settings())
        elif views:
            group.create_array("views", shape=shape, dtype=dtype, chunks=chunks, fill_value=np.nan,
                               dimension_names=names, **array_settings())
        create_done_flags(group, -(-n_clips // chunk_clips))
        return cls(group, path)

    @property
    def view_plan(self) -> ViewPlan:
        """The recipe of the views this store holds, as recorded when it was created."""
        return ViewPlan.from_json(self.group.attrs[VIEW_PLAN])

    @property
    def n_views(self) -> int:
        return self.views.n_views

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

    def read_at(self, rows: np.ndarray) -> np.ndarray:
        """The logits of sorted store `rows` alone, checksum-verified."""
        return read_rows(self.logits, self.path, rows=rows)

    @property
    def n_chunks(self) -> int:
        return self.group["done"].shape[0]

    def chunk_rows(self, chunk: int) -> range:
        start = chunk * self.chunk_clips
        return range(start, min(start + self.chunk_clips, self.logits.shape[0]))

    def write_chunk(self, chunk: int, logits: np.ndarray, views: np.ndarray | None = None) -> None:
        """Write one whole chunk: its (rows, C) logits and, when the store has views, its (rows, K, C) view
        logits, whole or as each view's top-k (rows without audio stay NaN); the caller is its only writer."""
        rows = self.chunk_rows(chunk)
        region = slice(rows.start, rows.stop)
        self.logits[region] = logits
        if not self.n_views:
            return
        assert views is not None, "a store with views needs every chunk's views"
        if self.views.topk is None:
            self.group["views"][region] = views
            return
        values, indexes = keep_topk(views, self.views.topk[0].shape[2], self.logits.dtype)
        self.group[TOPK_VALUES][region], self.group[TOPK_INDEXES][region] = values, indexes

    def mark_done(self, chunk: int) -> None:
        self.group["done"][chunk] = True

    def done_chunks(self) -> np.ndarray:
        return self.group["done"][:]


def link_array(source: Path, target: Path) -> None:
    """A copy of the Zarr array at `source` whose chunk files are hard links (copies across file systems);
    its metadata is a file of its own, so attributes set on the copy stay there."""
    for folder, _dirs, files in os.walk(source):
        into = target / Path(folder).relative_to(source)
        into.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name == "zarr.json":
                shutil.copyfile(Path(folder) / name, into / name)
                continue
            try:
                os.link(Path(folder) / name, into / name)
            except OSError:
                shutil.copyfile(Path(folder) / name, into / name)


def write_combined(path: Path, clip_ids: np.ndarray, teachers: dict[str, TeacherLogits], weights: dict[str, float],
                   ensemble: str, dtype: str, attributes: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    """Link each teacher's arrays in and write the weighted ensemble of their clean logits (mean of logits or
    of probabilities). Views are linked as stored; their ensemble is computed when read.

    `expected[name]` marks the rows that must have that teacher's logits (decoded clips; for imported
    logits, none): a NaN there is an error, never "no teacher", so a lost chunk cannot turn into
    clips without a KD target.
    """
    first = next(iter(teachers.values())).logits
    n_clips, n_classes = first.shape
    chunk = first.chunks[0]
    plans = {name: store.view_plan for name, store in teachers.items()}
    if len(set(plans.values())) != 1:
        raise KdpipeError("the teachers' views were made by different recipes: " +
                          "; ".join(f"{name}: {plan}" for name, plan in plans.items()))
    group = zarr.open_group(path, mode="w", attributes={
        "format": COMBINED_FORMAT, VIEW_PLAN: next(iter(plans.values())).to_json(), **attributes})
    group.create_array("clip_id", shape=(n_clips,), dtype=str, chunks=(chunk,), **array_settings())[:] = clip_ids
    for name, store in teachers.items():
        group.require_group(f"teachers/{name}")
        arrays = [member for member, value in store.group.members(max_depth=None)
                  if isinstance(value, zarr.Array) and member != "done"]
        for member in arrays:
            if "/" in member:
                group.require_group(f"teachers/{name}/{member.rsplit('/', 1)[0]}")
            link_array(store.path / member, path / "teachers" / name / member)
        group[f"teachers/{name}/logits"].attrs.update(dict(store.group.attrs))
    mean = group.create_array("ensemble/logits", shape=(n_clips, n_classes), dtype=dtype,
                              chunks=(chunk, n_classes), fill_value=np.nan, dimension_names=("clip", "class"),
                              attributes={"weights": weights, "mode": ensemble}, **array_settings())
    total = sum(weights.values())
    for start, stop in row_blocks(n_clips, chunk):
        block = {name: store.read(start, stop).astype(np.float32) for name, store in teachers.items()}
        for name, values in block.items():
            _check_present(values, expected[name][start:stop], start, teachers[name].path, name)
        mean[start:stop] = ensemble_of(block, weights, ensemble, total)


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

    @property
    def n_clips(self) -> int:
        return self.group["ensemble/logits"].shape[0]

    @property
    def n_classes(self) -> int:
        return self.group["ensemble/logits"].shape[1]

    def array(self, teacher: str | None = None) -> zarr.Array:
        """The ensemble's logits (teacher None) or one teacher's; an unknown name is an error naming the others."""
        if teacher is None:
            return self.group["ensemble/logits"]
        if teacher not in self.teachers:
            raise KdpipeError(f"no teacher named {teacher!r}; teachers: {', '.join(self.teachers)}")
        return self.group[f"teachers/{teacher}/logits"]

    def read(self, teacher: str | None = None, rows: np.ndarray | None = None, start: int = 0,
             stop: int | None = None) -> np.ndarray:
        """Logits of rows start:stop (every row by default), or of `rows` (sorted store rows), as stored."""
        return read_rows(self.array(teacher), self.path, start, stop, rows=rows)

    def attributes(self, teacher: str) -> dict[str, Any]:
        """What the teacher's extraction recorded (checkpoint, device, precision, metrics)."""
        return dict(self.array(teacher).attrs)

    def clip_ids(self) -> np.ndarray:
        return read_rows(self.group["clip_id"], self.path)

    @property
    def view_plan(self) -> ViewPlan:
        """The recipe of the views every teacher of this store heard (recorded at extraction)."""
        return ViewPlan.from_json(self.group.attrs[VIEW_PLAN])

    @property
    def n_views(self) -> int:
        """K, the augmented views per clip the ensemble has targets for (0: clean clips only)."""
        return self.view_plan.count

    def read_view(self, view: int, fill: Fill = "zero", temperature: float = 1.0, start: int = 0,
                  stop: int | None = None) -> np.ndarray:
        """(rows, C) float32 ensemble logits of view `view` of rows start:stop, divided by `temperature`.

        Each teacher's view comes from its store, whole or top-k. In the ensemble, a class a teacher did not
        keep counts at the smallest logit that teacher kept, an upper bound on its true value; a class no
        teacher kept follows `fill`, applied after the division (kdpipe.topk), so it keeps the fill's
        probability at any T. With one teacher this is that teacher's top-k exactly. Only that view's
        chunks of those rows are read.
        """
        if not 0 <= view < self.n_views:
            raise KdpipeError(f"{self.path}: no view {view}; the ensemble has {self.n_views} views")
        stop = self.n_clips if stop is None else stop
        mean = self.group["ensemble/logits"].attrs
        weights, mode = mean["weights"], mean["mode"]
        views = {name: TeacherViews(self.group[f"teachers/{name}"], self.path) for name in weights}
        kept = {name: teacher.kept(view, start, stop) for name, teacher in views.items()}
        if mode == "logits" and all(part is not None for part in kept.values()):
            logits = mean_of_topk([(*kept[name], weights[name]) for name in views], self.n_classes)
        else:
            dense = {name: (expand_topk(*kept[name], self.n_classes, "min") if kept[name] is not None else
                            teacher.every_class(view, start, stop))
                     for name, teacher in views.items()}
            logits = ensemble_of(dense, weights, mode, sum(weights.values())).astype(np.float32)
        if temperature != 1.0:
            logits /= np.float32(temperature)
        if any(part is None for part in kept.values()):
            return logits  # a teacher stored every class: nothing was left out
        return fill_unkept(logits, kept_mask([index for _values, index in kept.values()], self.n_classes), fill)


def ensemble_of(block: dict[str, np.ndarray], weights: dict[str, float], mode: str, total: float) -> np.ndarray:
    """Weighted mean of logits, or the logit of the weighted mean probability."""
    if mode == "logits":
        return sum(weights[name] * values for name, values in block.items()) / total
    probability = sum(weights[name] / (1.0 + np.exp(-values)) for name, values in block.items()) / total
    probability = np.clip(probability, 1e-7, 1 - 1e-7)
    return np.log(probability) - np.log1p(-probability)
