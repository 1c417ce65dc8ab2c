"""Extraction scaled out on dask.distributed: chunk-aligned blocks as futures, one teacher per worker.

Each worker loads the teacher once (a worker plugin) and owns whole chunks, so
every chunk has one writer at a time. By default the cluster is local: one
single-threaded worker per GPU, pinned with CUDA_VISIBLE_DEVICES (or a few CPU
workers when there is no GPU); `extract.scheduler` connects to an existing
cluster instead. Failed blocks are retried, and the blocks of a worker that dies
run again on the others; a chunk is marked done only once its future returned.

Before any block runs, every worker of an external cluster is checked: it must
run the same packages as this process (dask's own version check), the same kdpipe
sources and torch build (`environment`), and see the waveform store, the logits
store and the checkpoints at the paths this process sees (a cache on a shared
file system). A worker that fails is named with what differs, in seconds, rather
than found by failing blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from distributed import (Client, LocalCluster, Nanny, NannyPlugin, Scheduler, SpecCluster, WorkerPlugin, as_completed,
                         get_worker)
from distributed.comm import parse_address, parse_host_port

from kdpipe import console
from kdpipe.errors import KdpipeError
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
                   clips_per_batch: int) -> tuple[int, int, str, str, str]:
    """One chunk on a worker; returns (chunk, clips, device, precision, worker) so the stage records what ran
    and where."""
    worker = get_worker()
    teacher = worker.plugins[plugin_name].teacher
    store = WaveformStore.open(Path(store_path))
    valid = store.column("status") == "ok"
    logits = TeacherLogits.open(Path(logits_path), mode="r+")
    clips = run_chunk(teacher, store, logits, chunk, valid, clips_per_batch)
    return chunk, clips, str(teacher.device), teacher.precision, str(worker.name)


CONNECT_SECONDS = 20  # an address that answers nothing fails after this; a refused one at once


def environment() -> dict[str, str]:
    """What must be the same in this process and on every worker, beyond dask's own version check: kdpipe's
    sources (a hash of every module file of `kdpipe` and `kdpipe.stages`, read without importing them) and
    the torch stack's builds."""
    import importlib.util

    import torchaudio

    import kdpipe

    files = {}
    for package in ("kdpipe", "kdpipe.stages"):  # apart in an editable install, nested in a wheel's
        root = Path(importlib.util.find_spec(package).origin).parent  # type: ignore[arg-type, union-attr]
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join((package, *parts)).removesuffix(".__init__")] = path
    digest = hashlib.sha256()
    for name, path in sorted(files.items()):
        digest.update(f"{name}\0".encode() + path.read_bytes())
    return {"kdpipe sources": digest.hexdigest()[:16], "kdpipe": kdpipe.__version__, "torch": torch.__version__,
            "torchaudio": torchaudio.__version__, "python": platform.python_version()}


def unreadable(paths: list[str]) -> str | None:
    """On a worker: the first of `paths` it cannot read, with why (None: it reads them all)."""
    for path in paths:
        try:
            if Path(path).is_dir():
                os.listdir(path)
            else:
                with open(path, "rb") as handle:
                    handle.read(1)
        except OSError as exc:
            return f"{path} ({exc.strerror or exc})"
    return None


def check_workers(client: Client, paths: list[Path]) -> None:
    """Refuse a cluster whose workers differ from this process or cannot read the cache (module docstring)."""
    try:
        client.get_versions(check=True)
    except ValueError as exc:
        raise KdpipeError(f"dask workers run other package versions than this process: {exc}") from None
    mine = environment()
    for worker, theirs in client.run(environment).items():
        different = [f"{name} {theirs.get(name)} (here {value})" for name, value in mine.items()
                     if theirs.get(name) != value]
        if different:
            raise KdpipeError(f"dask worker {_worker_name(client, worker)} runs other code than this process: "
                              f"{'; '.join(different)}. Start every worker from the same kdpipe install")
    for worker, problem in client.run(unreadable, [str(path) for path in paths]).items():
        if problem is not None:
            raise KdpipeError(f"dask worker {_worker_name(client, worker)} cannot read {problem}: every worker "
                              "must see the cache (and the checkpoints) at the same path as this process")


def _worker_name(client: Client, address: str) -> str:
    name = client.scheduler_info()["workers"].get(address, {}).get("name", address)
    return address if str(name) == address else f"{name} ({address})"


def _reachable(scheduler: str) -> None:
    """A TCP scheduler address that refuses or does not answer is one line naming it (dask itself retries a
    refused address until its connect timeout, then raises a traceback)."""
    protocol, location = parse_address(scheduler)
    if protocol != "tcp":
        return
    host, port = parse_host_port(location)
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise KdpipeError(f"cannot reach the dask scheduler at {scheduler} (extract.scheduler): "
                          f"{exc.strerror or exc}") from None


@contextlib.contextmanager
def connect(scheduler: str | None, n_workers: int) -> Iterator[Client]:
    """A client of the given scheduler, or of a local cluster built for this machine."""
    if scheduler:
        _reachable(scheduler)
        try:
            client = Client(scheduler, timeout=CONNECT_SECONDS)
        except (OSError, TimeoutError) as exc:
            raise KdpipeError(f"cannot reach the dask scheduler at {scheduler} (extract.scheduler): {exc}") from None
        with client:
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
                 scheduler: str | None, n_workers: int) -> tuple[float, set[tuple[str, str]], dict[int, str]]:
    """Extract `todo` chunks on a dask cluster; marks each done as its future completes.

    Returns the seconds taken, the (device, precision) pairs the workers ran with (each worker
    resolves `precision: auto` on its own device, kdpipe.devices), and the worker whose block
    wrote each chunk (a block run again after its worker died counts once, where it finished).
    """
    store = WaveformStore.open(store_path)
    logits = TeacherLogits.open(logits_path, mode="r+")
    valid = store.column("status") == "ok"
    with connect(scheduler, n_workers) as client:
        if scheduler:
            check_workers(client, [store_path, logits_path, *spec.checkpoints])
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
            ran, writers = set(), {}
            for future in as_completed(futures):
                chunk, clips, device, precision, worker = future.result()
                logits.mark_done(chunk)
                ran.add((device, precision))
                writers[chunk] = worker
                bar.advance(task, clips)
        return time.perf_counter() - started, ran, writers

