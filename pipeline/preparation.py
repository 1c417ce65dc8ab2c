"""Decode every clip of the manifests once into the int16 waveform store (what stage `prepare` does).

Shards are decoded in parallel processes, each shard by one process; a finished
shard is marked done, so a killed run resumes at the first unfinished shard.
Every clip left out is listed in `skipped.csv` with its reason.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe import audio_io, console, hdf5_source, integrity, manifests, processes
from kdpipe.audio_io import AudioError
from kdpipe.classes import ClassList
from kdpipe.config import Config, PrepareConfig
from kdpipe.errors import KdpipeError
from kdpipe.manifests import Clip
from kdpipe.waveform_store import OK, STORE_FILE, WaveformStore

UNKNOWN_LABEL = "unknown_label"
SKIPPED_FILE = "skipped.csv"


@dataclass(frozen=True)
class ShardJob:
    store: Path
    shard: int
    clips: tuple[Clip, ...]
    rejected: tuple[str | None, ...]
    """A message per clip rejected before decoding (unknown label), else None."""
    sample_rate: int
    clip_samples: int
    settings: PrepareConfig


@dataclass(frozen=True)
class ShardResult:
    shard: int
    failures: tuple[tuple[str, str, str], ...]
    """(clip_id, reason, message) for every clip left out."""


def decode_shard(job: ShardJob) -> ShardResult:
    """Decode one shard's clips and write them; runs in a worker process, the shard's only writer."""
    waves = np.zeros((len(job.clips), job.clip_samples), dtype=np.int16)
    status, messages, failures = [], [], []
    for i, (clip, rejected) in enumerate(zip(job.clips, job.rejected)):
        reason, message = (UNKNOWN_LABEL, rejected) if rejected is not None else (OK, "")
        if rejected is None:
            try:
                waves[i], _info = audio_io.load_clip(
                    _encoded(clip),
                    sample_rate=job.sample_rate,
                    clip_samples=job.clip_samples,
                    start=clip.start,
                    end=clip.end,
                    min_seconds=job.settings.min_seconds,
                    silence_threshold=job.settings.silence_threshold,
                )
            except AudioError as exc:
                reason, message = exc.reason, str(exc)
        status.append(reason)
        messages.append(message)
        if reason != OK:
            failures.append((clip.clip_id, reason, message))
    WaveformStore.open(job.store, mode="r+").write_shard(job.shard, waves, status, messages)
    return ShardResult(job.shard, tuple(failures))


def _encoded(clip: Clip) -> Path | bytes:
    if clip.hdf5_row is None:
        return clip.audio
    return hdf5_source.read_hdf5_audio(clip.audio, clip.hdf5_row)


def label_matrix(clips: list[Clip], classes: ClassList) -> tuple[np.ndarray, dict[int, str]]:
    """Multi-hot labels, and for clips naming a label outside the class list, why they are rejected."""
    lookup = classes.lookup()
    labels = np.zeros((len(clips), len(classes)), dtype=np.uint8)
    rejected = {}
    for row, clip in enumerate(clips):
        unknown = [label for label in clip.labels if label not in lookup]
        if unknown:
            rejected[row] = f"{clip.clip_id}: label(s) not in the class list: {', '.join(unknown)}"
            continue
        labels[row, [lookup[label] for label in clip.labels]] = 1
    return labels, rejected


def prepare_store(config: Config, out_dir: Path, input_hashes: dict[str, str]) -> dict[str, Any]:
    """Write (or resume) `out_dir/waveforms.zarr` and `out_dir/skipped.csv`; returns a summary of the clips."""
    settings = config.prepare
    out_dir.mkdir(parents=True, exist_ok=True)
    classes, clips = manifests.load_clips(config.data)
    labels, rejected = label_matrix(clips, classes)
    store = _open_or_create(config, out_dir / STORE_FILE, clips, labels, classes, input_hashes)
    done = store.done_shards()
    todo = [shard for shard in range(store.n_shards) if not done[shard]]
    if len(todo) < store.n_shards:
        console.info(f"prepare: {store.n_shards - len(todo)} of {store.n_shards} shards already written")
    jobs = (_job(store, out_dir / STORE_FILE, shard, clips, rejected, config) for shard in todo)
    with console.progress() as bar:
        task = bar.add_task("prepare: decoding", total=sum(len(store.shard_rows(s)) for s in todo))
        for result in _map(decode_shard, jobs, _worker_count(settings, len(todo))):
            if result.failures and settings.on_error == "fail":
                clip_id, reason, message = result.failures[0]
                raise KdpipeError(f"prepare.on_error is 'fail' and clip {clip_id} is bad ({reason}): {message}")
            store.mark_done(result.shard)
            bar.advance(task, len(store.shard_rows(result.shard)))
    return _finish(store, out_dir / SKIPPED_FILE, clips)


def _open_or_create(config: Config, path: Path, clips: list[Clip], labels: np.ndarray, classes: ClassList,
                    input_hashes: dict[str, str]) -> WaveformStore:
    if path.exists() and integrity.ready_to_resume(path):
        store = WaveformStore.open(path, mode="r+")
        if store.n_clips == len(clips):
            return store
    data = config.data
    return WaveformStore.create(
        path,
        clip_ids=[clip.clip_id for clip in clips],
        splits=[clip.split for clip in clips],
        labels=labels,
        labelled=np.array([clip.labelled for clip in clips], dtype=bool),
        classes=classes,
        sample_rate=data.sample_rate,
        clip_samples=round(data.clip_seconds * data.sample_rate),
        shard_clips=config.prepare.shard_clips,
        compression=config.prepare.compression,
        attributes={"inputs_sha256": input_hashes},
    )


def _job(store: WaveformStore, path: Path, shard: int, clips: list[Clip], rejected: dict[int, str],
         config: Config) -> ShardJob:
    rows = store.shard_rows(shard)
    return ShardJob(path, shard, tuple(clips[r] for r in rows), tuple(rejected.get(r) for r in rows),
                    store.sample_rate, store.clip_samples, config.prepare)


def _worker_count(settings: PrepareConfig, n_jobs: int) -> int:
    return max(1, min(settings.workers or os.cpu_count() or 1, n_jobs))


def _map(function, jobs, workers: int):
    """Results as they complete; in-process for one worker (no start-up cost), else spawned processes."""
    if workers == 1:
        yield from map(function, jobs)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=processes.die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(function, job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _finish(store: WaveformStore, skipped_csv: Path, clips: list[Clip]) -> dict[str, Any]:
    status = store.column("status")
    messages = store.column("message")
    skipped_rows = np.flatnonzero(status != OK)
    with open(skipped_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clip_id", "path", "reason", "message"])
        for row in skipped_rows:
            writer.writerow([clips[row].clip_id, clips[row].audio, status[row], messages[row]])
    reasons = Counter(status[skipped_rows].tolist())
    splits = Counter(store.column("split")[status == OK].tolist())
    decoded = len(status) - len(skipped_rows)
    if reasons:
        listed = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())
        console.info(f"prepare: {decoded} clips decoded, {len(skipped_rows)} skipped ({listed}); see {skipped_csv}")
    else:
        console.info(f"prepare: {decoded} clips decoded, none skipped")
    unlabelled = int(sum(not clip.labelled for clip in clips))
    if unlabelled:
        console.info(f"prepare: {unlabelled} clips have no labels: unlabelled audio, which teaches a KD student "
                     "through the teachers' targets only")
    return {"clips": len(status), "decoded": decoded, "skipped": dict(reasons), "splits": dict(splits),
            "unlabelled": unlabelled,
            "sample_rate": store.sample_rate, "clip_samples": store.clip_samples, "classes": len(store.classes)}
