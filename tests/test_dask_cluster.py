"""Stage one on a dask cluster kdpipe did not start: `dask scheduler` and `dask worker` processes, as a user runs
them, each worker single-threaded in its own working and local directory, the cache on a path they all see.

One cluster serves the whole module (its workers pay for importing torch once); tests that need a worker of
their own (blind to the cache, or running other code) add it and remove it again.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.config import load_config
from kdpipe.logits_store import TOPK_INDEXES, TOPK_VALUES
from kdpipe.models import create_model
from kdpipe.processes import die_with_parent
from kdpipe.runner import Pipeline
from kdpipe.stages import build_stages

import helpers

CHUNKS = 16
RUN = ("teachers.0.arch=passt_tiny", "extract.chunk_clips=2", "extract.batch_size=2", "extract.num_workers=0",
       "extract.views=2", "extract.topk=4", "extract.precision=bf16", "student.num_workers=0")
DASK = Path(sys.executable).with_name("dask")
PASST = "extract/passt_tiny"


class Cluster:
    """A scheduler and its workers, each a `dask` command-line process that dies with this test process."""

    def __init__(self, root: Path):
        self.root = root
        self.workers: dict[str, subprocess.Popen] = {}
        scheduler_file = root / "scheduler.json"
        self.scheduler = self._start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                      "--scheduler-file", str(scheduler_file)], root)
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.address = json.loads(scheduler_file.read_text())["address"]
        self.client = Client(self.address, timeout=30)

    def _start(self, args: list[str], cwd: Path, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
               ) -> subprocess.Popen:
        log = open(cwd / f"{args[0]}.log", "w")
        parent = os.getpid()
        return subprocess.Popen([*prefix, str(DASK), *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                preexec_fn=lambda: die_with_parent(parent))

    def add_worker(self, name: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> None:
        """`dask worker ADDRESS --name NAME --nthreads 1 --no-nanny --local-directory DIR`, in its own folder."""
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        self.workers[name] = self._start(["worker", self.address, "--name", name, "--nthreads", "1", "--no-nanny",
                                          "--local-directory", str(folder / "dask")], folder, env, prefix)
        self._wait_for(lambda names: name in names, f"worker {name} to join")

    def kill_worker(self, name: str) -> None:
        process = self.workers.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait()
        self._wait_for(lambda names: name not in names, f"worker {name} to leave")

    def names(self) -> set[str]:
        return {str(info["name"]) for info in self.client.scheduler_info(n_workers=-1)["workers"].values()}

    def _wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition(self.names()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def close(self) -> None:
        self.client.close()
        for process in [*self.workers.values(), self.scheduler]:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        for name in ("w0", "w1"):
            cluster.add_worker(name)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def run(small_demo, prepared, tmp_path_factory):
    """The --set items of a one-teacher run (checkpoint given: no training), for a cache folder."""
    root = tmp_path_factory.mktemp("dask_run")
    torch.manual_seed(0)
    checkpoint = root / "passt_tiny.pt"
    torch.save(create_model("passt_tiny", num_classes=12).state_dict(), checkpoint)

    def items(cache: Path, *extra: str) -> list[str]:
        if not cache.exists():
            helpers.copy_cache(prepared, cache)
        return helpers.settings(RUN, small_demo, cache, f"teachers.0.checkpoint={checkpoint}", *extra)

    return items


def pipeline(items: list[str]) -> Pipeline:
    config = load_config(None, items)
    return Pipeline(build_stages(config), config)


@pytest.fixture(scope="module")
def local(run, tmp_path_factory):
    """The local engine's logits store: what every cluster run must equal bit for bit."""
    out = pipeline(run(tmp_path_factory.mktemp("local") / "cache")).ensure(PASST)
    return zarr.open_group(out / "logits.zarr", mode="r")


def assert_same_store(out: Path, local: zarr.Group) -> zarr.Group:
    group = zarr.open_group(out / "logits.zarr", mode="r")
    for name in ("logits", TOPK_VALUES, TOPK_INDEXES):
        np.testing.assert_array_equal(group[name][:], local[name][:], err_msg=name)
    assert group["done"][:].all() and group["done"].shape == (CHUNKS,)
    return group


def command(items: list[str], verb: str = "extract-teachers") -> list[str]:
    return [sys.executable, "-m", "kdpipe", verb, *[f"--set={item}" for item in items]]


def test_logits_views_and_topk_equal_the_local_engine(cluster, run, local, tmp_path):
    """Equality in the precision RUN asks for, bf16, which each worker resolves on its own device and records."""
    dask = pipeline(run(tmp_path / "cache", "extract.engine=dask", f"extract.scheduler={cluster.address}"))
    group = assert_same_store(dask.ensure(PASST), local)
    assert group.attrs["precision"] == local.attrs["precision"] == "bf16" and group.attrs["engine"] == "dask"
    writers = group.attrs["chunk_writers"]
    assert sorted(map(int, writers)) == list(range(CHUNKS)) and set(writers.values()) == {"w0", "w1"}
    assert [(v.action, v.problems) for v in dask.verify([PASST])] == [("ok", ())]


def test_a_worker_that_cannot_see_the_cache_is_named_with_the_path(cluster, run, tmp_path):
    """A worker whose machine lacks the shared file system: here one in a mount namespace where the cache's folder
    is an empty tmpfs. The command fails in bounded time, naming that worker and the path it cannot read."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs mount namespaces (unshare -m) to hide the cache from one worker")
    hidden = tmp_path / "shared"
    items = run(hidden / "cache", "extract.engine=dask", f"extract.scheduler={cluster.address}")
    mount = f"mount -t tmpfs none {hidden} && exec \"$0\" \"$@\""
    cluster.add_worker("blind", prefix=("unshare", "-m", "sh", "-c", mount))
    try:
        started = time.monotonic()
        result = CliRunner().invoke(app, ["extract-teachers", *[f"--set={item}" for item in items]])
        assert result.exit_code == 1, result.output
        assert time.monotonic() - started < 60
        assert "dask worker blind" in result.output and str(hidden / "cache") in result.output, result.output
        assert "Traceback" not in result.output
    finally:
        cluster.kill_worker("blind")


def test_a_worker_running_other_kdpipe_code_is_refused(cluster, run, tmp_path):
    """A worker started from another kdpipe install (one edited line) is refused before any block runs, naming
    the worker and what differs."""
    package = tmp_path / "site" / "kdpipe"
    shutil.copytree(Path(__file__).resolve().parents[1] / "pipeline", package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(__file__).resolve().parents[1] / "stages", package / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    views = package / "views.py"
    views.write_text(views.read_text().replace("out.mul_(", "out = out.mul_("))
    cluster.add_worker("other", env={"PYTHONPATH": str(tmp_path / "site")})
    items = run(tmp_path / "cache", "extract.engine=dask", f"extract.scheduler={cluster.address}")
    try:
        result = CliRunner().invoke(app, ["extract-teachers", *[f"--set={item}" for item in items]])
        assert result.exit_code == 1, result.output
        assert "dask worker other" in result.output and "kdpipe sources" in result.output, result.output
        assert pipeline(items).status(PASST).state == "missing"
    finally:
        cluster.kill_worker("other")


def test_an_unreachable_scheduler_is_one_line_naming_its_address(run, tmp_path):
    items = run(tmp_path / "cache", "extract.engine=dask", "extract.scheduler=tcp://127.0.0.1:1")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["extract-teachers", *[f"--set={item}" for item in items]])
    assert result.exit_code == 1 and time.monotonic() - started < 30
    assert "cannot reach the dask scheduler at tcp://127.0.0.1:1" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_second_client_waits_on_the_stage_lock_and_writes_nothing(cluster, run, local, tmp_path):
    """Two `kdpipe extract-teachers` on one config and cluster (another process, and this one): one builds, the
    other waits for its lock and then finds the teacher built; no chunk is written twice."""
    items = run(tmp_path / "cache", "extract.engine=dask", f"extract.scheduler={cluster.address}")
    lock = pipeline(items).cache.lock_path(PASST, pipeline(items).key(PASST))
    other = subprocess.Popen(command(items), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().startswith(f"pid {other.pid} ")):
        assert time.monotonic() < deadline and other.poll() is None, "the other process never took the lock"
        time.sleep(0.01)
    here = CliRunner().invoke(app, ["extract-teachers", *[f"--set={item}" for item in items]])
    _, there = other.communicate(timeout=180)
    assert here.exit_code == 0 and other.returncode == 0, (here.output, there[-3000:])
    assert f"{PASST}: building" in there
    assert f"{PASST}: waiting for pid {other.pid}" in here.output and f"{PASST}: building" not in here.output
    assert f"{PASST}: cached" in here.output and "built by another process" in here.output
    for stage in (PASST, "extract-teachers"):  # each built once, by whichever process came first
        assert (there + here.output).count(f"{stage}: building") == 1
    group = assert_same_store(pipeline(items).built(PASST), local)
    assert sorted(map(int, group.attrs["chunk_writers"])) == list(range(CHUNKS))


def test_a_worker_killed_mid_teacher_leaves_a_bit_identical_result(cluster, run, local, tmp_path):
    """kill -9 of one worker while the teacher runs: its blocks run again on the survivor, every chunk is written
    by one block's writer, and the store equals the local engine's and verifies. (Last: it leaves one worker.)"""
    items = run(tmp_path / "cache", "extract.engine=dask", f"extract.scheduler={cluster.address}")
    built: list[Path] = []
    extraction = threading.Thread(target=lambda: built.append(pipeline(items).ensure(PASST)))
    extraction.start()
    done, deadline = 0, time.monotonic() + 120
    while done < 2 and extraction.is_alive() and time.monotonic() < deadline:
        for path in (tmp_path / "cache").glob(f"{PASST}/*/logits.zarr/done"):
            try:
                done = int(zarr.open_array(path, mode="r")[:].sum())
            except Exception:  # being created
                pass
        time.sleep(0.01)
    cluster.kill_worker("w1")
    extraction.join(timeout=180)
    assert built, "the extraction did not finish"
    assert 2 <= done < CHUNKS, f"the kill landed after {done} of {CHUNKS} chunks"
    writers = assert_same_store(built[0], local).attrs["chunk_writers"]
    assert sorted(map(int, writers)) == list(range(CHUNKS)) and "w0" in writers.values()
    assert [(v.action, v.problems) for v in pipeline(items).verify([PASST])] == [("ok", ())]
