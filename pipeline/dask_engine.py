"""Extraction scaled out on dask.distributed: chunk-aligned blocks as futures, one teacher per worker.

Each worker loads the teacher once (a worker plugin) and owns whole chunks, so
every chunk has one writer. By default the cluster is local: one single-threaded
worker per GPU, pinned with CUDA_VISIBLE_DEVICES (or a few CPU workers when
there is no GPU); `extract.scheduler` connects to an existing cluster instead.
Failed blocks are retried; a chunk is marked done only once its future returned.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from distributed import (Client, LocalCluster, Nanny, NannyPlugin, Scheduler, SpecCluster, WorkerPlugin, as_completed,
                         get_worker)

from kdpipe import console
from kdpipe.extraction import Teacher, TeacherSpec, run_chunk, valid_clips
from kdpipe.logits_store import TeacherLogits
from kdpipe.processes import die_with_parent
from kdpipe.waveform_store import WaveformStore


class NannyDiesWithParent(NannyPlugin):
    """A local cluster's nannies die with kdpipe (kdpipe.processes)..."""

    name = "kdpipe-nanny-dies-with-parent"

    def setup(self, nanny) -> None:
        die_with_parent(os.getppid())


class WorkerDiesWithParent(WorkerPlugin):
    """... and their workers with the nannies."""

    name = "kdpipe-worker-dies-with-parent"

    def setup(self, worker) -> None:
        die_with_parent(os.getppid())


class TeacherPlugin(WorkerPlugin):
    """Loads the teacher once per worker process, on the worker's own device."""

    def __init__(self, spec: TeacherSpec, sample_rate: int, batch_size: int):
        self.spec = spec
        self.sample_rate = sample_rate
        self.batch_size = batch_size
        self.name = f"kdpipe-teacher-{spec.name}"
        self.teacher: Teacher | None = None

    def setup(self, worker) -> None:
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # one single-threaded worker per core
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher = Teacher(self.spec, self.sample_rate, device, self.batch_size)


def _extract_chunk(chunk: int, plugin_name: str, store_path: str, logits_path: str,
                   clips_per_batch: int) -> tuple[int, int, str, str]:
    """One chunk on a worker; returns (chunk, clips, device, precision) so the stage records what ran."""
    teacher = get_worker().plugins[plugin_name].teacher
    store = WaveformStore.open(Path(store_path))
    valid = store.column("status") == "ok"
    logits = TeacherLogits.open(Path(logits_path), mode="r+")
    clips = run_chunk(teacher, store, logits, chunk, valid, clips_per_batch)
    return chunk, clips, str(teacher.device), teacher.precision


@contextlib.contextmanager
def connect(scheduler: str | None, n_workers: int) -> Iterator[Client]:
    """A client of the given scheduler, or of a local cluster built for this machine."""
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    gpus = torch.cuda.device_count()
    if gpus:
        workers = {
            f"gpu-{i}": {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i)},
                                                   "resources": {"GPU": 1}}}
            for i in range(n_workers or gpus)
        }
        cluster = SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})
    else:
        cluster = LocalCluster(n_workers=n_workers or min(2, os.cpu_count() or 1), threads_per_worker=1,
                               processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        client.register_plugin(NannyDiesWithParent())
        client.register_plugin(WorkerDiesWithParent())
        yield client


def extract_dask(spec: TeacherSpec, store_path: Path, logits_path: Path, todo: list[int], batch_size: int,
                 scheduler: str | None, n_workers: int) -> tuple[float, set[tuple[str, str]]]:
    """Extract `todo` chunks on a dask cluster; marks each done as its future completes.

    Returns the seconds taken and the (device, precision) pairs the workers ran with: each
    worker resolves `precision: auto` on its own device (kdpipe.devices).
    """
    store = WaveformStore.open(store_path)
    logits = TeacherLogits.open(logits_path, mode="r+")
    valid = store.column("status") == "ok"
    with connect(scheduler, n_workers) as client:
        plugin = TeacherPlugin(spec, store.sample_rate, batch_size)
        client.register_plugin(plugin)
        resources = {"GPU": 1} if torch.cuda.device_count() and not scheduler else None
        started = time.perf_counter()
        futures = client.map(_extract_chunk, todo, plugin_name=plugin.name, store_path=str(store_path),
                             logits_path=str(logits_path), clips_per_batch=batch_size, retries=2, pure=False,
                             resources=resources)
        with console.progress() as bar:
            task = bar.add_task(f"extract {spec.name} (dask, {len(client.scheduler_info()['workers'])} workers)",
                                total=valid_clips(logits, todo, valid))
            ran = set()
            for future in as_completed(futures):
                chunk, clips, device, precision = future.result()
                logits.mark_done(chunk)
                ran.add((device, precision))
                bar.advance(task, clips)
        return time.perf_counter() - started, ran

