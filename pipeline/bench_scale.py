"""`kdpipe bench scale`: the real stages' host-side code at AudioSet's shape, each step timed with its peak memory.

Every figure kdpipe had came from runs of a few thousand clips; AudioSet has 2 M clips and 527 classes
(issue 22). This bench writes real cache entries at that shape and times what a user meets there.

What is real and what is not:
- The data: a class list, a CSV manifest of N clips (`--clips`) with the labels below, and a config
  (`kdpipe.yaml` in the workspace, which `--out` or `--keep` keeps: `kdpipe status -c` it).
- `prepare` is the stage as it is (manifest parsing, label matrix, store creation, shard by shard writes
  through `WaveformStore`, `skipped.csv`), with only the audio decoder replaced: each clip is 32 synthetic
  int16 samples (4 ms at 8 kHz, the config's `data.clip_seconds`), so the waveform store's disk is not
  AudioSet's 640 kB per clip.
- Each `extract/<teacher>` runs no model: a teacher's logit is 0.5 for a class of the clip and -5 for
  the others, plus Gaussian noise that every teacher shares (sd 1.8: how hard the clip is) and noise of
  its own (sd 0.6); each view adds shared noise (sd 0.5). At C = 527 a teacher scores an eval mAP of
  about 0.40 and the ensemble of three 0.43 (PaSST on AudioSet: 0.47). The logits go through
  `TeacherLogits` (create, write_chunk, mark_done, resume) as `run_teacher` sends them, and the stage's
  eval metrics are computed as it computes them. The teachers' checkpoints are placeholder files: only
  their fingerprints enter the keys.
- `extract-teachers` is the stage as it is. The runner (`Pipeline.ensure`) commits all of these entries,
  so keys, records, `status` and `verify` are a user's.

Label recipe (`class_probabilities`), AudioSet-like: class 0 is drawn with probability 0.5 (Speech, Music),
class 1 with 0.28; classes 2..C-1 fall log-linearly from a top value down to 3e-5 for the rarest (60 clips
per 2 M clips, 6 per 200 k), the top value solved so that a clip has 2.7 labels on average (AudioSet's
figure). Each clip draws every class independently; a clip that drew none (5.5 % at C = 527) gets one
class drawn in proportion to the probabilities, so every clip has a label and class c ends up on a share
p_c (1 + P0 / S) of clips (`expected_frequencies`; P0 the chance of no label, S the sum of p). At C = 527:
class 0 on 51.0 % of clips, class 1 on 28.6 %, class 2 on 2.4 %, the rarest on 3.06e-5 (61 per 2 M), and
2.70 labels per clip. With fewer than ~60 classes the top value is capped at class 1's and the mean is
lower. Labels are drawn in blocks of rows as uint8, never as an (N, C) float array.

Each step runs in a fresh child process forked from the bench's, which has only imported kdpipe (the writes
share one, as `kdpipe run` builds stages in one process); children die with the bench. Its peak RSS is reset after the step's setup
(Linux' /proc/self/clear_refs), so the peak is the step's own, and the child's RSS right after the imports
is reported beside it. Linux only.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from kdpipe import (console, devices, distill, evaluate, integrity, preparation, processes, splits, stage_names,
                    training)
from kdpipe.cache import StageCache
from kdpipe.config import Config, dump_yaml, load_config
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.logits_store import COMBINED_FILE, TEACHER_FILE, CombinedLogits, TeacherLogits, write_combined
from kdpipe.preparation import ShardJob, ShardResult
from kdpipe.runner import Pipeline
from kdpipe.stage import Stage, StageContext
from kdpipe.topk import expand_topk, keep_topk
from kdpipe.verify import verify_entry
from kdpipe.view_plan import ViewPlan
from kdpipe.waveform_store import OK, STORE_FILE, WaveformStore

HEAD = (0.5, 0.28)
"""Draw probabilities of classes 0 and 1 (module docstring)."""
RAREST = 3e-5
MEAN_LABELS = 2.7
LABEL_ROWS = 65536
"""Rows of labels drawn (and counted) at a time: (65536, 527) float32 draws are 138 MB."""
SAMPLE_RATE, CLIP_SAMPLES = 8000, 32
TEACHER_ARCH = "passt_s_s10"
"""The teachers' registered architecture: only the config's validation and `status`' coverage notes read it."""
POSITIVE, NEGATIVE, CLIP_NOISE, TEACHER_NOISE, VIEW_NOISE = 0.5, -5.0, 1.8, 0.6, 0.5


@dataclass(frozen=True)
class ScaleSettings:
    """The shape to measure: the command's options."""

    clips: int = 2_000_000
    classes: int = 527
    teachers: int = 3
    views: int = 0
    topk: int = 20
    eval_clips: int = 20_000
    draw: int = 100_000
    seed: int = 0

    def check(self) -> None:
        """Settings the bench cannot run with: a usage error naming the option."""
        if self.classes < 3:
            raise ConfigError("--classes: at least 3 (two head classes and a rarest one)")
        if not 0 < self.eval_clips < self.clips:
            raise ConfigError(f"--eval-clips: between 1 and --clips - 1 ({self.clips - 1}); got {self.eval_clips}")


# ----------------------------------------------------------------- labels
def class_probabilities(n_classes: int) -> np.ndarray:
    """Each class's draw probability (module docstring): the head, then log-linear down to RAREST, its top
    value bisected for MEAN_LABELS labels per clip (capped at class 1's)."""
    low, high = RAREST, HEAD[1]
    if _mean_labels(_with_top(n_classes, high)) > MEAN_LABELS:
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if _mean_labels(_with_top(n_classes, middle)) < MEAN_LABELS else (low, middle)
    return _with_top(n_classes, high)


def _with_top(n_classes: int, top: float) -> np.ndarray:
    """HEAD, then the other classes log-linear from `top` down to RAREST (RAREST alone for one)."""
    body = n_classes - 2
    if body == 1:
        return np.r_[HEAD, RAREST]
    return np.r_[HEAD, top * (RAREST / top) ** (np.arange(body) / (body - 1))]


def _mean_labels(p: np.ndarray) -> float:
    """Labels per clip after a clip with none gets one: S + P0."""
    return float(p.sum() + np.prod(1 - p))


def expected_frequencies(n_classes: int) -> np.ndarray:
    """The share of clips that carry each class: p_c (1 + P0 / S), the fill of label-less clips included."""
    p = class_probabilities(n_classes)
    return p * (1 + np.prod(1 - p) / p.sum())


def draw_labels(rng: np.random.Generator, p: np.ndarray, rows: int) -> np.ndarray:
    """(rows, C) uint8 multi-hot labels: each class with its probability, one drawn by p for a clip with none."""
    labels = (rng.random((rows, len(p)), dtype=np.float32) < p.astype(np.float32)).view(np.uint8)
    empty = np.flatnonzero(~labels.any(axis=1))
    labels[empty, rng.choice(len(p), size=len(empty), p=p / p.sum())] = 1
    return labels


def label_blocks(settings: ScaleSettings) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, labels) of every block of LABEL_ROWS clips, each block seeded by (seed, block)."""
    p = class_probabilities(settings.classes)
    for block, start in enumerate(range(0, settings.clips, LABEL_ROWS)):
        rng = np.random.default_rng([settings.seed, block])
        yield start, draw_labels(rng, p, min(LABEL_ROWS, settings.clips - start))


# -------------------------------------------------------------- workspace
@dataclass(frozen=True)
class RunCode:
    """The code above the library that the bench runs, handed in by its caller (the library sits under
    kdpipe.stages and the CLI): module-level functions, so a child process receives them by name."""

    build_stages: Callable[[Config], list[Stage]]
    """kdpipe.stages.build_stages"""
    eval_metrics: Callable[[Callable[[np.ndarray], np.ndarray], WaveformStore, str], dict[str, float]]
    """kdpipe.stages.extract_teachers.eval_metrics: what each teacher's stage measures"""
    status: Callable[..., None]
    """kdpipe.cli.state.status: the `kdpipe status` command"""


@dataclass(frozen=True)
class Workspace:
    """The bench's folder: inputs, config and the cache its entries are committed to; and the code it runs."""

    settings: ScaleSettings
    root: Path
    code: RunCode

    @property
    def config_path(self) -> Path:
        return self.root / "kdpipe.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def class_list(self) -> Path:
        return self.root / "classes.csv"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    @property
    def cache(self) -> StageCache:
        return StageCache(self.root / "cache")

    def config(self) -> Config:
        return load_config(self.config_path)

    def entry(self, stage: str) -> Path:
        """The folder of `stage`'s last committed build, found without computing keys (seconds of source
        hashing in a fresh process, which the key and status steps time)."""
        record = self.cache.latest_record(stage)
        if record is None:
            raise KdpipeError(f"bench scale: {stage} has no committed build in {self.cache.root}")
        return self.cache.entry_dir(stage, record["key"])

    @property
    def store_path(self) -> Path:
        return self.entry(stage_names.PREPARE) / STORE_FILE

    def pipeline(self) -> Pipeline:
        """The run's pipeline with decoding and inference replaced (`bench_stages`): its keys are the real ones."""
        config = self.config()
        return Pipeline(bench_stages(config, self.code), config)


def mids(n_classes: int) -> list[str]:
    return [f"c{c:03d}" for c in range(n_classes)]


def write_inputs(ws: Workspace) -> int:
    """Class list, manifest, placeholder checkpoints and config; returns the bytes of the first two."""
    settings = ws.settings
    ws.root.mkdir(parents=True, exist_ok=True)
    with open(ws.class_list, "w", newline="") as handle:
        csv.writer(handle).writerows([("index", "mid", "display_name"),
                                      *((c, mid, f"class {c}") for c, mid in enumerate(mids(settings.classes)))])
    write_manifest(ws)
    checkpoints = [ws.root / "teachers" / f"t{t}.pt" for t in range(settings.teachers)]
    checkpoints[0].parent.mkdir(exist_ok=True)
    for path in checkpoints:
        path.write_text(f"kdpipe bench scale: stands for teacher {path.stem}'s weights; its logits are synthetic\n")
    ws.config_path.write_text(dump_yaml(bench_config(ws, checkpoints)))
    ws.config()  # a config the bench cannot load fails here, before any store is written
    return ws.class_list.stat().st_size + ws.manifest.stat().st_size


def write_manifest(ws: Workspace) -> None:
    """The manifest of every clip, its labels as mids; the last `eval_clips` clips are the eval split."""
    settings, names = ws.settings, np.array(mids(ws.settings.classes))
    first_eval = settings.clips - settings.eval_clips
    blocks = console.track(label_blocks(settings), -(-settings.clips // LABEL_ROWS), "bench scale: manifest")
    with open(ws.manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clip_id", "path", "labels", "split"])
        for start, labels in blocks:
            rows, classes = np.nonzero(labels)
            bounds = np.searchsorted(rows, np.arange(len(labels) + 1))
            writer.writerows((f"clip{row:08d}", f"audio/clip{row:08d}.wav",
                              ";".join(names[classes[bounds[i]:bounds[i + 1]]]),
                              "eval" if row >= first_eval else "train")
                             for i, row in enumerate(range(start, start + len(labels))))


def bench_config(ws: Workspace, checkpoints: list[Path]) -> dict[str, Any]:
    """The run's config: kdpipe's defaults but for the data, the teachers, the views and the epoch's draw.
    `prepare.workers: 1` (unkeyed) keeps the synthetic decoding in the measured process."""
    settings = ws.settings
    return {
        "cache_dir": str(ws.root / "cache"), "device": "cpu", "seed": settings.seed,
        "data": {"class_list": str(ws.class_list), "sources": [{"format": "csv", "path": str(ws.manifest)}],
                 "sample_rate": SAMPLE_RATE, "clip_seconds": CLIP_SAMPLES / SAMPLE_RATE},
        "prepare": {"workers": 1},
        "teachers": [{"name": path.stem, "arch": TEACHER_ARCH, "checkpoint": str(path)} for path in checkpoints],
        "extract": {"views": settings.views, "topk": settings.topk},
        "student": {"epoch_samples": settings.draw},
    }


# --------------------------------------------- the stages, decoding and inference replaced
def bench_stages(config: Config, code: RunCode) -> list[Stage]:
    """`build_stages(config)` with prepare's audio decoder and each teacher's model replaced; a stage's key
    comes from its declared code and parameters, not from `run`, so every key is the real one."""
    teachers = {stage_names.extract(teacher.label): synthetic_teacher(index, teacher.label, code.eval_metrics)
                for index, teacher in enumerate(config.teachers)}
    return [replace(stage, run=synthetic_decoding(stage.run)) if stage.name == stage_names.PREPARE else
            replace(stage, run=teachers[stage.name]) if stage.name in teachers else stage
            for stage in code.build_stages(config)]


def synthetic_decoding(run: Callable[[StageContext], dict[str, Any]]) -> Callable[[StageContext], dict[str, Any]]:
    """prepare's run as it is, with `preparation.decode_shard` writing synthetic clips instead of decoding."""
    def prepare(ctx: StageContext) -> dict[str, Any]:
        with mock.patch.object(preparation, "decode_shard", synthetic_shard):
            return run(ctx)

    return prepare


def synthetic_shard(job: ShardJob) -> ShardResult:
    """`decode_shard` without audio: noise clips, written to the shard as it writes decoded ones."""
    waves = np.random.default_rng(job.shard).integers(-3000, 3000, (len(job.clips), job.clip_samples), np.int16)
    status = [OK if rejected is None else preparation.UNKNOWN_LABEL for rejected in job.rejected]
    WaveformStore.open(job.store, mode="r+").write_shard(job.shard, waves, status,
                                                         [rejected or "" for rejected in job.rejected])
    return ShardResult(job.shard, tuple((clip.clip_id, preparation.UNKNOWN_LABEL, rejected)
                                        for clip, rejected in zip(job.clips, job.rejected) if rejected))


def synthetic_logits(labels: np.ndarray, seed: int, teacher: int, chunk: int, views: int
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """One chunk of a teacher: (rows, C) float32 logits and (rows, K, C) views (None without), from the labels,
    noise all teachers share and noise of its own (module docstring): teachers that err alike, mostly, as
    teachers trained on the same data do, so their ensemble is better than each but not by much."""
    shared, own = np.random.default_rng([seed, chunk]), np.random.default_rng([seed, chunk, 1 + teacher])
    clean = np.where(labels.astype(bool), np.float32(POSITIVE), np.float32(NEGATIVE))
    clean += shared.standard_normal(labels.shape, dtype=np.float32) * np.float32(CLIP_NOISE)
    clean += own.standard_normal(labels.shape, dtype=np.float32) * np.float32(TEACHER_NOISE)
    if not views:
        return clean, None
    view_logits = shared.standard_normal((len(labels), views, labels.shape[1]), dtype=np.float32)
    view_logits *= np.float32(VIEW_NOISE)
    view_logits += clean[:, None, :]
    return clean, view_logits


def synthetic_teacher(index: int, label: str, eval_metrics: Callable[..., dict[str, float]]
                      ) -> Callable[[StageContext], dict[str, Any]]:
    """extract/<label> with `synthetic_logits` for the model; the store's creation or resume, its chunk writes
    and its eval metrics are `run_teacher`'s (stages/extract_teachers.py)."""

    def run(ctx: StageContext) -> dict[str, Any]:
        settings = ctx.config.extract
        store = WaveformStore.open(ctx.upstream[stage_names.PREPARE] / STORE_FILE)
        path = ctx.out_dir / TEACHER_FILE
        resume = path.exists() and integrity.ready_to_resume(path)
        logits = (TeacherLogits.open(path, mode="r+") if resume else TeacherLogits.create(
            path, store.n_clips, len(store.classes), settings.chunk_clips, settings.dtype, {"teacher": label},
            ViewPlan.from_config(settings), settings.topk))
        todo = [chunk for chunk, done in enumerate(logits.done_chunks()) if not done]
        for chunk in console.track(todo, len(todo), f"{label}: synthetic logits"):
            rows = logits.chunk_rows(chunk)
            labels = store.labels(np.arange(rows.start, rows.stop))
            logits.write_chunk(chunk, *synthetic_logits(labels, ctx.config.seed, index, chunk, settings.views))
            logits.mark_done(chunk)
        metrics = eval_metrics(logits.read_at, store, ctx.config.evaluation.split)
        attributes = {"teacher": label, "arch": "synthetic (kdpipe bench scale)",
                      "chunks_written": len(todo), **metrics}
        logits.group.attrs.update(attributes)
        return attributes

    return run


# ------------------------------------------------------------------ steps
@dataclass
class Prepared:
    """A step after its setup: `action` is timed; `report` then says its bytes on disk and notes."""

    action: Callable[[], object]
    report: Callable[[], dict[str, Any]] = dict


@dataclass(frozen=True)
class Step:
    key: str
    label: str
    kind: str  # "write": generating a store; "step": a step the issue asks to time
    per_clip: bool = True
    """Its work grows with the clips (extrapolated linearly); False: it does not (a key, the eval split's
    metrics), so its extrapolation is the measured figure."""


def steps(settings: ScaleSettings) -> list[Step]:
    """The steps a run measures, in order (the views' steps only with views)."""
    teachers = [Step(f"build:{stage_names.extract(f't{t}')}", f"write teacher t{t} (extract/t{t}, synthetic "
                     "logits)", "write") for t in range(settings.teachers)]
    views = [Step("topk", f"top-{settings.topk} of one chunk's views (keep_topk), per chunk", "step",
                  per_clip=False),
             Step("first_view", "top-k targets of view 0 (ViewTargets.start_epoch(0))", "step"),
             Step("view_change", "view change (ViewTargets.start_epoch(1))", "step")]
    views = views if settings.views and settings.topk else views[1:1 + min(settings.views, 2)]
    return [
        Step("inputs", "write labels, manifest, class list", "write"),
        Step(f"build:{stage_names.PREPARE}", "write waveform store (prepare, synthetic decoding)", "write"),
        *teachers,
        Step(f"build:{stage_names.ENSEMBLE}", "write ensemble (extract-teachers, as is)", "write"),
        Step("open_waveforms", "open waveform store (WaveformStore.open)", "step"),
        Step("open_logits", "open every logits store (TeacherLogits.open, CombinedLogits)", "step"),
        Step("key", "one stage key (config, stages, Pipeline.key)", "step", per_clip=False),
        Step("status", "status, every stage (kdpipe status)", "step"),
        Step("combine", "ensemble combine (write_combined)", "step"),
        Step("naive_read", "naive read of the logits entries' files", "step"),
        Step("verify", "verify the logits entries (verify_entry)", "step"),
        Step("student_start", "student start (targets, sampling weights, labels to the device)", "step"),
        Step("draw", f"sampler draw, one epoch of {settings.draw} clips", "step"),
        *views,
        Step("resume", "resume one chunk of extract/t0 (Pipeline.ensure)", "step"),
        Step("evaluate", f"evaluate metrics ({settings.eval_clips} clips, evaluate.score)", "step",
             per_clip=False),
    ]


def prepare_step(key: str, ws: Workspace) -> Prepared:
    """The setup of step `key` (see `steps`), in the child that times it."""
    if key.startswith("build:"):
        return _build(ws, key.removeprefix("build:"))
    return STEPS[key](ws)


def _inputs(ws: Workspace) -> Prepared:
    written: list[int] = []
    return Prepared(lambda: written.append(write_inputs(ws)), lambda: {"disk_bytes": written[0]})


def _build(ws: Workspace, name: str) -> Prepared:
    """The runner builds and commits the entry, as `kdpipe run` would."""
    pipeline = ws.pipeline()
    upstream = [ws.entry(up) for up in pipeline.stage(name).upstream]
    folder: list[Path] = []

    def report() -> dict[str, Any]:
        maps = pipeline.cache.record(name, folder[0].name)["summary"].get("mAP")
        maps = maps if isinstance(maps, dict) else {name: maps}  # the ensemble's: every teacher's and its own
        note = ", ".join(f"{who} eval mAP {value:.3f}" for who, value in maps.items() if value is not None)
        return {"disk_bytes": new_bytes(folder[0], upstream), "note": note}

    return Prepared(lambda: folder.append(pipeline.ensure(name)), report)


def _open_waveforms(ws: Workspace) -> Prepared:
    path = ws.store_path
    return Prepared(lambda: WaveformStore.open(path), lambda: {"disk_bytes": disk_bytes([path])})


def _open_logits(ws: Workspace) -> Prepared:
    teachers = [ws.entry(name) / TEACHER_FILE for name in _extract_stages(ws.config())]
    ensemble = ws.entry(stage_names.ENSEMBLE)

    def action() -> None:
        for path in teachers:
            TeacherLogits.open(path)
        CombinedLogits.in_folder(ensemble)

    return Prepared(action, lambda: {"disk_bytes": disk_bytes([*teachers, ensemble])})


def _key(ws: Workspace) -> Prepared:
    keys: list[str] = []

    def action() -> None:
        config = load_config(ws.config_path)
        pipeline = Pipeline(ws.code.build_stages(config), config)
        last = list(pipeline.stages)[-1]
        keys.append(f"{last} {pipeline.key(last)}")

    return Prepared(action, lambda: {"note": f"{keys[0]}, chaining every upstream key"})


def _status(ws: Workspace) -> Prepared:
    printed: list[str] = []
    imports = "" if "timm" in sys.modules else "; includes importing timm (coverage notes)"

    def action() -> None:
        with console.out.capture() as captured:
            ws.code.status(config=ws.config_path, set_=None, verify_=False)
        printed.append(captured.get())

    def report() -> dict[str, Any]:
        states = [line.split("│")[2].strip() for line in printed[0].splitlines() if line.count("│") >= 4]
        return {"note": ", ".join(f"{states.count(state)} {state}" for state in ("fresh", "stale", "missing"))
                + imports}

    return Prepared(action, report)


def _combine(ws: Workspace) -> Prepared:
    """write_combined with the arguments `run_ensemble` gives it, into a scratch folder."""
    config = ws.config()
    store = WaveformStore.open(ws.store_path)
    teachers = {t.label: TeacherLogits.open(ws.entry(stage_names.extract(t.label)) / TEACHER_FILE)
                for t in config.teachers}
    decoded = store.column("status") == OK
    expected = {name: decoded & ("imported_from" not in logits.group.attrs) for name, logits in teachers.items()}
    clip_ids, path = store.column("clip_id"), ws.scratch / COMBINED_FILE
    shutil.rmtree(ws.scratch, ignore_errors=True)

    def action() -> None:
        write_combined(path, clip_ids, teachers, {t.label: t.weight for t in config.teachers},
                       config.extract.ensemble, config.extract.dtype, {"n_classes": len(store.classes)}, expected)

    return Prepared(action, lambda: {"disk_bytes": new_bytes(path, [logits.path for logits in teachers.values()]),
                                     "note": "new bytes; the teachers' arrays are hard links"})


def _logit_stages(ws: Workspace) -> list[str]:
    return [*_extract_stages(ws.config()), stage_names.ENSEMBLE]


def _entry_files(ws: Workspace) -> list[Path]:
    """Every file of the logits entries, as verify reads them: a file linked into two entries, once."""
    files: dict[tuple[int, int], Path] = {}
    for name in _logit_stages(ws):
        for path in sorted(ws.entry(name).rglob("*")):
            if path.is_file():
                stat = path.stat()
                files.setdefault((stat.st_dev, stat.st_ino), path)
    return list(files.values())


def _naive_read(ws: Workspace) -> Prepared:
    files = _entry_files(ws)
    return Prepared(lambda: read_files(files), lambda: {"disk_bytes": sum(path.stat().st_size for path in files)})


def _verify(ws: Workspace) -> Prepared:
    """What `kdpipe verify` does for the logits entries (`Pipeline.verify`), their keys known (the key step
    times keys): a chunk file the combined store hard-links is decoded once."""
    entries = {name: ws.entry(name).name for name in _logit_stages(ws)}
    files = _entry_files(ws)
    verdicts: list[Any] = []

    def action() -> None:
        verified: set[integrity.FileId] = set()
        verdicts.extend(verify_entry(ws.cache, name, key, mark=False, verified=verified)
                        for name, key in entries.items())

    def report() -> dict[str, Any]:
        damaged = [f"{v.stage}: {v.action} {'; '.join(v.problems[:3])}" for v in verdicts if v.action != "ok"]
        if damaged:
            raise KdpipeError(f"bench scale: verify found damage in stores it wrote: {'; '.join(damaged)}")
        return {"disk_bytes": sum(path.stat().st_size for path in files)}

    return Prepared(action, report)


def _student_start(ws: Workspace) -> Prepared:
    """train_student's KD start (stages/train_student.py) up to `fit`, and the first epoch's targets."""
    config = ws.config()
    store_path, ensemble = ws.store_path, ws.entry(stage_names.ENSEMBLE)
    held: list[Any] = []

    def action() -> None:
        store = WaveformStore.open(store_path)
        combined = CombinedLogits.in_folder(ensemble)
        targets = kd_targets(config, store, combined)
        device = devices.resolve_device(config.device)
        labelled = torch.from_numpy(store.labelled().astype(np.float32)).to(device)
        rows = student_rows(config, store)
        plan = epoch_plan(config, store, rows, distill.confident_classes(combined,
                                                                         config.student.kd.unlabelled_threshold))
        targets.start_epoch(0)
        labels = training.labels_on_device(WaveformStore.open(store_path), rows.validation, device)  # fit's start
        held.append((targets, labelled, plan, labels))

    return Prepared(action)


def kd_targets(config: Config, store: WaveformStore, combined: CombinedLogits) -> distill.Targets:
    return distill.student_targets(combined, config, store.n_clips, store.sample_rate, store.clip_samples,
                                   devices.resolve_device(config.device))


def student_rows(config: Config, store: WaveformStore) -> splits.TrainingSplits:
    return splits.training_splits(store, config.data.validation_fraction, stage_names.STUDENT, unlabelled=True)


def epoch_plan(config: Config, store: WaveformStore, rows: splits.TrainingSplits,
               heard: Callable[[np.ndarray], np.ndarray]) -> Callable[[int], list[np.ndarray]]:
    """The KD student's epochs, as train_student plans them."""
    seed = config.seed if config.student.seed is None else config.student.seed
    return training.epoch_plan(store, rows.train, config.student, seed, heard)


def _draw(ws: Workspace) -> Prepared:
    config = ws.config()
    store = WaveformStore.open(ws.store_path)
    combined = CombinedLogits.in_folder(ws.entry(stage_names.ENSEMBLE))
    plan = epoch_plan(config, store, student_rows(config, store),
                      distill.confident_classes(combined, config.student.kd.unlabelled_threshold))
    batches: list[np.ndarray] = []

    def report() -> dict[str, Any]:
        return {"note": f"{len(batches)} batches, {sum(map(len, batches))} clips"}

    return Prepared(lambda: batches.extend(plan(0)), report)


def _topk(ws: Workspace) -> Prepared:
    """What write_chunk adds to each chunk of a teacher with views: its views' top-k (a teacher at 2 M clips has
    -(-2 M // chunk_clips) chunks)."""
    config, store = ws.config(), WaveformStore.open(ws.store_path)
    rows = np.arange(min(config.extract.chunk_clips, store.n_clips))
    views = synthetic_logits(store.labels(rows), config.seed, 0, 0, ws.settings.views)[1]
    return Prepared(lambda: keep_topk(views, ws.settings.topk, config.extract.dtype),
                    lambda: {"note": f"{len(rows)} clips x {ws.settings.views} views x {views.shape[2]} classes"})


def _view_targets(ws: Workspace) -> distill.Targets:
    store = WaveformStore.open(ws.store_path)
    return kd_targets(ws.config(), store, CombinedLogits.in_folder(ws.entry(stage_names.ENSEMBLE)))


def _first_view(ws: Workspace) -> Prepared:
    targets = _view_targets(ws)
    return Prepared(lambda: targets.start_epoch(0))


def _view_change(ws: Workspace) -> Prepared:
    targets = _view_targets(ws)
    targets.start_epoch(0)
    return Prepared(lambda: targets.start_epoch(1))


def _resume(ws: Workspace) -> Prepared:
    """extract/t0 as a kill during one chunk leaves it (uncommitted, that chunk not done), then resumed by
    the runner: ready_to_resume, the chunk rewritten, the stage's eval metrics, the commit."""
    pipeline = ws.pipeline()
    name = _extract_stages(pipeline.config)[0]
    folder = ws.entry(name)
    pipeline.cache.uncommit(name, folder.name)
    logits = TeacherLogits.open(folder / TEACHER_FILE, mode="r+")
    chunk = logits.n_chunks // 2
    logits.group["done"][chunk] = False

    def report() -> dict[str, Any]:
        if pipeline.cache.record(name, folder.name) is None or not logits.done_chunks().all():
            raise KdpipeError(f"bench scale: the resumed {name} is not committed whole")
        return {"disk_bytes": disk_bytes([folder]), "note": f"chunk {chunk} of {logits.n_chunks}"}

    return Prepared(lambda: pipeline.ensure(name), report)


def _evaluate(ws: Workspace) -> Prepared:
    """The ensemble scored as the evaluate stage scores each model."""
    store = WaveformStore.open(ws.store_path)
    rows = splits.evaluation_rows(store, ws.config().evaluation.split)
    targets = store.labels(rows)
    logits = CombinedLogits.in_folder(ws.entry(stage_names.ENSEMBLE)).read(rows=rows)
    scored: list[evaluate.ModelResult] = []

    def action() -> None:
        scored.append(evaluate.score("ensemble", "teacher ensemble", "ensemble", "synthetic", targets, logits))

    return Prepared(action, lambda: {"note": f"{len(rows)} x {targets.shape[1]}, mAP {scored[0].metrics['mAP']:.3f}"})


def _label_counts(ws: Workspace) -> Prepared:
    """Not timed for the table: the store's labels counted, to compare with the recipe."""
    store = WaveformStore.open(ws.store_path)
    counts = np.zeros(len(store.classes), dtype=np.int64)
    per_clip = np.zeros(2, dtype=np.int64)  # total labels, clips without one

    def action() -> None:
        for start in range(0, store.n_clips, LABEL_ROWS):
            block = store.labels(np.arange(start, min(start + LABEL_ROWS, store.n_clips)))
            counts[:] += block.sum(axis=0)
            per_clip[:] += (int(block.sum()), int((~block.any(axis=1)).sum()))

    return Prepared(action, lambda: {"counts": counts.tolist(), "labels": int(per_clip[0]),
                                     "unlabelled_clips": int(per_clip[1])})


def _topk_loss(ws: Workspace) -> Prepared:
    """Not timed for the table: what the targets read from per-teacher top-k views lose against the ensemble of
    the full views, recomputed for the first chunk's clips; and what CED's top-k of that ensemble loses."""
    config, settings = ws.config(), ws.settings
    store = WaveformStore.open(ws.store_path)
    combined = CombinedLogits.in_folder(ws.entry(stage_names.ENSEMBLE))
    rows = np.arange(min(config.extract.chunk_clips, store.n_clips))
    labels = store.labels(rows)
    losses: dict[str, list[np.ndarray]] = {"per-teacher top-k": [], "CED's ensemble top-k": []}

    def action() -> None:
        full = [synthetic_logits(labels, config.seed, t, 0, settings.views)[1] for t in range(settings.teachers)]
        for view in range(settings.views):
            exact = sum(teacher[:, view] for teacher in full) / settings.teachers  # equal weights, mode logits
            stored = combined.read_view(view, start=0, stop=len(rows))
            ced = expand_topk(*keep_topk(exact, settings.topk, config.extract.dtype), exact.shape[1], "zero")
            top = np.argsort(-exact, axis=1, kind="stable")[:, :settings.topk]
            for name, read in (("per-teacher top-k", stored), ("CED's ensemble top-k", ced)):
                error = np.abs(_sigmoid(read) - _sigmoid(exact))
                losses[name].append(np.array([error.mean(), error.max(), np.take_along_axis(error, top, 1).mean()]))

    def report() -> dict[str, Any]:
        return {name: dict(zip(("mean_abs_dp", "max_abs_dp", "mean_abs_dp_exact_topk"),
                               np.mean(values, axis=0).tolist() if values else []))
                for name, values in losses.items()} | {"clips": len(rows)}

    return Prepared(action, report)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


STEPS: dict[str, Callable[[Workspace], Prepared]] = {
    "inputs": _inputs, "open_waveforms": _open_waveforms, "open_logits": _open_logits, "key": _key,
    "status": _status, "combine": _combine, "naive_read": _naive_read, "verify": _verify,
    "student_start": _student_start, "draw": _draw, "topk": _topk, "first_view": _first_view,
    "view_change": _view_change, "resume": _resume, "evaluate": _evaluate, "labels": _label_counts,
    "topk_loss": _topk_loss,
}


def _extract_stages(config: Config) -> list[str]:
    return [stage_names.extract(teacher.label) for teacher in config.teachers]


# ------------------------------------------------------------------- disk
def _inodes(paths: list[Path]) -> dict[tuple[int, int], int]:
    """Size of every file under `paths`, by inode: a hard-linked file once."""
    found = {}
    for root in paths:
        for path in (root.rglob("*") if root.is_dir() else [root]):
            if path.is_file():
                stat = path.stat()
                found[stat.st_dev, stat.st_ino] = stat.st_size
    return found


def disk_bytes(paths: list[Path]) -> int:
    """Bytes on disk under `paths`, each file once however many links it has."""
    return sum(_inodes(paths).values())


def new_bytes(folder: Path, upstream: list[Path]) -> int:
    """Bytes under `folder` that are not links to files under `upstream`."""
    shared = _inodes(upstream)
    return sum(size for inode, size in _inodes([folder]).items() if inode not in shared)


def read_files(files: list[Path]) -> None:
    """The naive baseline: read each file whole, 1 MiB at a time."""
    buffer = bytearray(1 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


# ------------------------------------------------------------- processes
def _resident_bytes() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


def _reset_peak() -> bool:
    """Start the peak RSS afresh at the current RSS (Linux >= 4.0); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure(keys: list[str], ws: Workspace, level: int) -> list[dict[str, Any]]:
    """In a fresh child: each step of `keys` in turn, set up, then timed from a reset peak RSS."""
    console.LOGGER.setLevel(level)
    baseline = _resident_bytes()
    return [_measure_step(key, ws, baseline) for key in keys]


def _measure_step(key: str, ws: Workspace, baseline: int) -> dict[str, Any]:
    prepared = prepare_step(key, ws)
    reset = _reset_peak()
    started = time.perf_counter()
    prepared.action()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline, "peak_is_the_steps": reset,
            **prepared.report()}


def in_child(keys: list[str], ws: Workspace) -> list[dict[str, Any]]:
    """`measure(keys)` in a fresh child forked from this process, which has imported kdpipe once (a spawned
    child would spend seconds importing torch for every step) and touched no store or thread pool yet.
    The child dies with this process (kdpipe.processes)."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=context, initializer=processes.die_with_parent,
                             initargs=(os.getpid(),)) as child:
        return child.submit(measure, keys, ws, console.LOGGER.level).result()


# ------------------------------------------------------------------ the run
@dataclass
class ScaleResult:
    """The table's rows (step, seconds, peak and baseline RSS, bytes on disk, extrapolations), the label
    counts beside the recipe's, and what the figures are; written as JSON."""

    settings: ScaleSettings
    rows: list[dict[str, Any]]
    labels: dict[str, Any]
    notes: list[str]
    workspace: str
    json_path: str
    extrapolate_to: int | None
    cache_bytes: int


def bench_scale(settings: ScaleSettings, code: RunCode, out: Path | None = None, keep: bool = False,
                json_path: Path | None = None, extrapolate_to: int | None = None) -> ScaleResult:
    """Write the stores, time every step in a child of its own, write the table as JSON; returns it.

    `out`: an empty folder for the workspace (kept); default a temporary one under the current directory,
    removed at the end unless `keep`. The JSON goes to `json_path`, default `bench-scale.json` beside it.
    """
    settings.check()
    root = _workspace(out)
    json_path = json_path or root.resolve().parent / "bench-scale.json"
    try:
        rows, labels = _run_steps(Workspace(settings, root, code))
        result = ScaleResult(settings, rows, labels, notes(settings, rows, labels, extrapolate_to), str(root),
                             str(json_path), extrapolate_to, disk_bytes([root / "cache"]))
        if extrapolate_to:
            _extrapolate(result, extrapolate_to)
        json_path.write_text(json.dumps(asdict(result), indent=2) + "\n")
        return result
    finally:
        if out is None and not keep:
            shutil.rmtree(root, ignore_errors=True)


def _workspace(out: Path | None) -> Path:
    if out is None:
        return Path(tempfile.mkdtemp(prefix="bench-scale-", dir=Path.cwd()))
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} is not empty; give an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run_steps(ws: Workspace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The writes in one child, as `kdpipe run` builds stages in one process; every other step in its own."""
    every = steps(ws.settings)
    groups = [[step for step in every if step.kind == "write"], *([step] for step in every if step.kind != "write")]
    rows = []
    for group in groups:
        console.info(f"bench scale: {'; '.join(step.label for step in group)}")
        measured = in_child([step.key for step in group], ws)
        for step, row in zip(group, measured):
            rows.append({"step": step.label, "key": step.key, "kind": step.kind, "per_clip": step.per_clip, **row})
            console.info(f"  {step.key}: {row['seconds']:.2f} s, peak RSS {row['peak_rss'] / 1e9:.2f} GB")
        shutil.rmtree(ws.scratch, ignore_errors=True)
    summary = _label_summary(ws.settings, in_child(["labels"], ws)[0])
    if ws.settings.views and ws.settings.topk:
        summary["topk_loss"] = in_child(["topk_loss"], ws)[0]
    return rows, summary


def _label_summary(settings: ScaleSettings, counted: dict[str, Any]) -> dict[str, Any]:
    """The store's label counts beside what the recipe promises."""
    expected = expected_frequencies(settings.classes)
    counts = np.asarray(counted["counts"])
    rarest = np.argsort(expected)[:10]
    return {
        "class_0": counts[0] / settings.clips, "class_0_expected": expected[0],
        "class_1": counts[1] / settings.clips, "class_1_expected": expected[1],
        "rarest_10_mean_clips": float(counts[rarest].mean()),
        "rarest_10_expected_clips": float(expected[rarest].mean() * settings.clips),
        "labels_per_clip": counted["labels"] / settings.clips, "labels_per_clip_expected": float(expected.sum()),
        "clips_without_labels": counted["unlabelled_clips"], "counts": counted["counts"],
    }


def _extrapolate(result: ScaleResult, clips: int) -> None:
    """Time and disk of every row scaled linearly to `clips`, but for the steps whose work does not grow with
    the clips (`Step.per_clip`). Linear overstates steps with a fixed part (status, resume, the ensemble's
    eval metrics)."""
    for row in result.rows:
        factor = clips / result.settings.clips if row["per_clip"] else 1.0
        row["extrapolated_seconds"] = row["seconds"] * factor
        if row.get("disk_bytes") is not None:
            row["extrapolated_disk_bytes"] = row["disk_bytes"] * factor


def notes(settings: ScaleSettings, rows: list[dict[str, Any]], labels: dict[str, Any],
          extrapolate_to: int | None) -> list[str]:
    """What the table's figures are, and are not."""
    by_key = {row["key"]: row for row in rows}
    verify, naive = by_key["verify"], by_key["naive_read"]
    found = [
        f"waveforms: synthetic clips of {CLIP_SAMPLES} samples ({1000 * CLIP_SAMPLES / SAMPLE_RATE:g} ms at "
        f"{SAMPLE_RATE} Hz), not 10 s: the waveform store's disk is not AudioSet's (640 kB per clip at 32 kHz); "
        "prepare ran as is but for the audio decoder",
        "teachers: no model ran; synthetic logits (from the labels, with noise the teachers share and their own) "
        "through TeacherLogits, committed as extract/<teacher> by the runner; extract-teachers ran as is",
        f"labels: class 0 on {labels['class_0']:.1%} of clips (recipe {labels['class_0_expected']:.1%}), "
        f"class 1 on {labels['class_1']:.1%} ({labels['class_1_expected']:.1%}), the 10 rarest classes on "
        f"{labels['rarest_10_mean_clips']:.1f} clips each ({labels['rarest_10_expected_clips']:.1f}), "
        f"{labels['labels_per_clip']:.2f} labels per clip ({labels['labels_per_clip_expected']:.2f}), "
        f"{labels['clips_without_labels']} clips without one",
        f"verify: {verify['disk_bytes'] / verify['seconds'] / 1e9:.2f} GB/s against a naive read of the same "
        f"files at {naive['disk_bytes'] / naive['seconds'] / 1e9:.2f} GB/s: "
        f"{verify['seconds'] / naive['seconds']:.2f}x the naive time; both read files written minutes before "
        "(likely from the page cache)",
        "peak RSS: the step's own, reset after its setup (the memory the process already held counts); "
        "baseline: the fresh child after imports. The writes ran in one process, as `kdpipe run` builds stages; "
        "every other step in a fresh one",
    ]
    if not all(row["peak_is_the_steps"] for row in rows):
        found.append("peak RSS could not be reset here (/proc/self/clear_refs): peaks include each step's setup")
    if not settings.views:
        found.append("no views (--views 0): no top-k or view-change step")
    elif "topk_loss" in labels:
        loss = labels["topk_loss"]
        ours, ced = loss["per-teacher top-k"], loss["CED's ensemble top-k"]
        found.append(f"top-{settings.topk} targets against the ensemble of full views ({loss['clips']} clips, every "
                     f"view): |dp| mean {ours['mean_abs_dp']:.5f}, max {ours['max_abs_dp']:.4f}, on the exact "
                     f"top-{settings.topk} classes {ours['mean_abs_dp_exact_topk']:.5f} (CED's top-{settings.topk} of "
                     f"the ensemble: {ced['mean_abs_dp']:.5f}, {ced['max_abs_dp']:.4f}, "
                     f"{ced['mean_abs_dp_exact_topk']:.5f})")
    if extrapolate_to:
        found.append(f"extrapolated to {extrapolate_to:,} clips: linearly, but for the key and the eval metrics "
                     "(not per clip: as measured); linear overstates the steps with a fixed part (status, resume, "
                     "the ensemble's eval metrics)")
    return found
