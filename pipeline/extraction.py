"""Run one teacher over the waveform store, chunk by chunk, as fast as the device allows.

Batches are read by prefetching loader processes into pinned memory while the
model computes; features are computed on the device; inference runs under
`torch.inference_mode` with bf16 autocast on CUDA (`precision: auto`). A batch that runs out of
device memory is split in halves (and later batches with it). Batches never
straddle a chunk, so a chunk's logits do not depend on which chunks ran before:
a resumed or distributed extraction writes the same bytes as an uninterrupted one.

With views (`extract.views` = K > 0), each batch also runs K more times, once per view: the
same clips augmented in the waveform domain as kdpipe.views defines them, so stage two can
rebuild exactly the audio each stored view target was computed on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe import console
from kdpipe.devices import resolve_precision
from kdpipe.errors import KdpipeError
from kdpipe.frontends import build_frontend, int16_to_float
from kdpipe.loader import batch_loader, sequential_batches
from kdpipe.logits_store import TeacherLogits
from kdpipe.models.windowing import clip_forward
from kdpipe.teachers import CrossFitted, load_teacher, per_row
from kdpipe.view_plan import NO_VIEWS, ViewPlan
from kdpipe.views import CLEAN, apply_views, view_params
from kdpipe.waveform_store import WaveformStore

Block = tuple[np.ndarray, np.ndarray | None]
"""One chunk's logits (rows, C) and, with views, its view logits (rows, K, C)."""


@dataclass(frozen=True)
class TeacherSpec:
    """Everything a (possibly remote) worker needs to build one teacher; picklable."""

    name: str
    arch: str
    checkpoints: tuple[Path, ...]  # one, or one per fold of a cross-fitted teacher (kdpipe.teachers)
    options: dict[str, Any] = field(default_factory=dict)
    frontend: dict[str, Any] = field(default_factory=dict)
    precision: str = "auto"  # resolved on the device that runs it (kdpipe.devices)
    compile: bool = False
    views: ViewPlan = NO_VIEWS  # the augmented views of each clip it also labels
    unseen: Path | None = None  # a cross-fitted teacher's unseen_fold.npy: which model labels each row


class Teacher:
    """A loaded teacher and its frontend on one device."""

    def __init__(self, spec: TeacherSpec, store_sample_rate: int, device: torch.device, batch_size: int):
        self.spec = spec
        self.device = device
        self.precision = resolve_precision(spec.precision, device)  # what runs: 'bf16' or 'fp32'
        self.bf16 = self.precision == "bf16"
        model = load_teacher(spec.arch, spec.checkpoints, spec.options).eval().to(device)
        # NHWC suits the depthwise convolutions of CNN teachers on GPUs and CPUs alike (2x for mn10 on a CPU).
        self.model: nn.Module = model.to(memory_format=torch.channels_last)
        # Freezing (weights as constants: batch norm folded, oneDNN-packed weights) is inference-only, as
        # here; on a CPU it is what makes compiling pay (mn10: 1.4x over compiling without it).
        options = {"freezing": True} if device.type == "cpu" else None
        self.forward = torch.compile(self.model, dynamic=False, options=options) if spec.compile else self.model
        self.frontend = build_frontend({**self.model.frontend_config, **spec.frontend}, store_sample_rate)
        self.frontend.eval().to(device)
        self.sample_rate = store_sample_rate
        self.batch_size = batch_size
        self.unseen = None if spec.unseen is None else torch.from_numpy(
            np.load(spec.unseen, allow_pickle=False).astype(np.int64))

    @torch.inference_mode()
    def logits(self, waves: torch.Tensor, view: int = CLEAN, rows: np.ndarray | None = None) -> torch.Tensor:
        """float32 logits of an int16 batch, or of view `view` of its clips (`rows`: their store rows; a
        cross-fitted teacher needs them for clean clips too, else it gives its models' mean)."""
        floats = int16_to_float(waves.to(self.device, non_blocking=True))
        if view != CLEAN:
            assert rows is not None, "a view is a function of the clip's store row"
            plan = self.spec.views
            floats = apply_views(floats, view_params(rows, view, plan.seed, plan.augment, self.sample_rate,
                                                     floats.shape[1]))
        unseen = None if self.unseen is None or rows is None else self.unseen[torch.from_numpy(np.asarray(rows))]
        return self._batched(floats, unseen)

    def outputs(self, waves: torch.Tensor, rows: np.ndarray) -> Block:
        """A batch's clean logits and, with views, every view's: views are batched like clips."""
        clean = self.logits(waves, CLEAN, rows).cpu().numpy()
        if not self.spec.views.count:
            return clean, None
        return clean, np.stack([self.logits(waves, view, rows).cpu().numpy()
                                for view in range(self.spec.views.count)], axis=1)

    def _batched(self, floats: torch.Tensor, unseen: torch.Tensor | None) -> torch.Tensor:
        """Logits batch by batch; halves the batch on out-of-memory and remembers it."""
        if len(floats) > self.batch_size:
            parts = unseen.split(self.batch_size) if unseen is not None else [None] * -(-len(floats) // self.batch_size)
            return torch.cat([self._batched(part, fold) for part, fold in zip(floats.split(self.batch_size), parts)])
        try:
            return self._forward(floats, unseen)
        except torch.OutOfMemoryError:
            if self.batch_size == 1:
                raise
            self.batch_size = max(1, self.batch_size // 2)
            torch.cuda.empty_cache()
            console.info(f"{self.spec.name}: out of device memory, batch size now {self.batch_size}")
            return self._batched(floats, unseen)

    def _forward(self, floats: torch.Tensor, unseen: torch.Tensor | None) -> torch.Tensor:
        features = self.frontend(floats)
        features = features.contiguous(memory_format=torch.channels_last)
        max_frames = getattr(self.model, "max_frames", None)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if unseen is None or not isinstance(self.model, CrossFitted):
                return clip_forward(self.forward, features, max_frames).float()
            members = torch.stack([clip_forward(m, features, max_frames).float() for m in self.model.members])
        return per_row(members, unseen.to(members.device))


def chunk_batches(logits: TeacherLogits, chunk: int, valid: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The batches of one chunk's decodable rows; the same however the work is scheduled."""
    rows = np.asarray(logits.chunk_rows(chunk))
    return sequential_batches(rows[valid[rows]], batch_size)


def valid_clips(logits: TeacherLogits, chunks: Iterable[int], valid: np.ndarray) -> int:
    """The decodable clips (`valid` rows) in `chunks`: what computing them costs, for progress and clips/s."""
    return sum(int(valid[rows.start:rows.stop].sum()) for rows in map(logits.chunk_rows, chunks))


def run_chunk(teacher: Teacher, store: WaveformStore, logits: TeacherLogits, chunk: int, valid: np.ndarray,
              batch_size: int) -> int:
    """Compute and write one whole chunk (the dask task body); returns the clips computed."""
    rows = logits.chunk_rows(chunk)
    block = empty_block(logits, chunk)
    for batch in chunk_batches(logits, chunk, valid, batch_size):
        fill(block, batch - rows.start, teacher.outputs(torch.from_numpy(store.read(batch)), batch))
    check_finite(block, rows, valid, store, teacher.spec.name)
    logits.write_chunk(chunk, *block)
    return valid_clips(logits, [chunk], valid)


def empty_block(logits: TeacherLogits, chunk: int) -> Block:
    """A chunk's logits (and views) before any batch: NaN, the mark of a row without audio."""
    rows = len(logits.chunk_rows(chunk))
    n_classes = logits.logits.shape[1]
    views = np.full((rows, logits.n_views, n_classes), np.nan, np.float32) if logits.n_views else None
    return np.full((rows, n_classes), np.nan, np.float32), views


def fill(block: Block, positions: np.ndarray, outputs: Block) -> None:
    """Put one batch's outputs at its rows' positions in the chunk."""
    block[0][positions] = outputs[0]
    if block[1] is not None:
        block[1][positions] = outputs[1]


def extract_local(teacher: Teacher, store_path: Path, logits: TeacherLogits, todo: list[int], batch_size: int,
                  num_workers: int) -> float:
    """Extract `todo` chunks in this process, prefetching reads; marks each chunk done. Returns seconds spent."""
    store = WaveformStore.open(store_path)
    valid = store.column("status") == "ok"
    plan = [(chunk, batch) for chunk in todo for batch in chunk_batches(logits, chunk, valid, batch_size)]
    loader = batch_loader(store_path, [batch for _chunk, batch in plan], num_workers=num_workers,
                          pin_memory=teacher.device.type == "cuda")
    started = time.perf_counter()
    clips = valid_clips(logits, todo, valid)
    with console.progress() as bar:
        task = bar.add_task(f"extract {teacher.spec.name}", total=clips)
        for chunk, block in _chunks(teacher, logits, todo, plan, loader, bar, task):
            rows = logits.chunk_rows(chunk)
            check_finite(block, rows, valid, store, teacher.spec.name)
            logits.write_chunk(chunk, *block)
            logits.mark_done(chunk)
    return time.perf_counter() - started


def _chunks(teacher: Teacher, logits: TeacherLogits, todo: list[int], plan: list[tuple[int, np.ndarray]],
            loader, bar, task) -> Iterator[tuple[int, Block]]:
    """Assemble loader batches into whole chunks, yielding each chunk as soon as it is complete."""
    pending = {chunk: sum(1 for c, _ in plan if c == chunk) for chunk in todo}
    blocks = {chunk: empty_block(logits, chunk) for chunk in todo}
    for chunk in [c for c in todo if pending[c] == 0]:  # chunks with no decodable clip
        yield chunk, blocks.pop(chunk)
    for (chunk, _batch), (waves, rows) in zip(plan, loader):
        batch = rows.numpy()
        fill(blocks[chunk], batch - logits.chunk_rows(chunk).start, teacher.outputs(waves, batch))
        bar.advance(task, len(rows))
        pending[chunk] -= 1
        if pending[chunk] == 0:
            yield chunk, blocks.pop(chunk)


def check_finite(block: Block, rows: range, valid: np.ndarray, store: WaveformStore, name: str) -> None:
    """A teacher must never hand NaN or Inf targets to stage two: fail loudly, naming the clip."""
    logits, views = block
    bad = ~np.isfinite(logits).all(axis=1)
    if views is not None:
        bad |= ~np.isfinite(views).all(axis=(1, 2))
    bad &= valid[rows.start:rows.stop]
    if bad.any():
        row = rows.start + int(np.flatnonzero(bad)[0])
        clip_id = store.group["clip_id"][row]
        raise KdpipeError(f"teacher {name} produced NaN or Inf logits for clip {clip_id} (row {row}); "
                          f"{int(bad.sum())} clip(s) in this chunk")
