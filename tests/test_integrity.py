"""Damaged data is found and named, only the damaged part is rebuilt, and nothing in use is deleted."""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import pytest
from typer.testing import CliRunner

from kdpipe import integrity
from kdpipe.cli import app
from kdpipe.errors import KdpipeError
from kdpipe.integrity import DamagedStore, find_damage
from kdpipe.logits_store import TeacherLogits, write_combined
from kdpipe.waveform_store import WaveformStore

import helpers

runner = CliRunner()


RUN = ("prepare.shard_clips=4", "teachers.0.arch=mn_tiny", "teacher_training.epochs=1",
       "teacher_training.batch_size=4", "teacher_training.num_workers=0", "extract.num_workers=0",
       "extract.chunk_clips=8", "student.arch=mobilenetv3", "student.width=0.2", "student.epochs=1",
       "student.epoch_samples=8", "student.batch_size=4", "student.num_workers=0")
settings = partial(helpers.settings, RUN)
make = partial(helpers.make, RUN)


@pytest.fixture(scope="module")
def prepared_here(small_demo, tmp_path_factory) -> Path:
    """RUN's prepare (4-clip shards) built once for this module; each test damages its own copy (helpers.copy_cache)."""
    cache = tmp_path_factory.mktemp("integrity") / "cache"
    make(small_demo, cache).ensure("prepare")
    return cache


def flip_bytes(path: Path, offset: int = 200, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def test_damaged_and_missing_chunks_are_named_and_only_they_are_rebuilt(small_demo, prepared_here, tmp_path):
    helpers.copy_cache(prepared_here, tmp_path)
    pipeline = make(small_demo, tmp_path)
    store_path = pipeline.ensure("prepare") / "waveforms.zarr"
    original = WaveformStore.open(store_path).read(np.arange(small_demo.n_clips))
    shard_files = sorted((store_path / "waveform" / "c").rglob("*"))
    shard_files = [p for p in shard_files if p.is_file()]
    assert len(shard_files) == 8  # 32 clips, 4 per shard

    shard_files[1].unlink()  # rows 4-7
    with pytest.raises(DamagedStore, match=r"waveform rows 4-7 are missing.*kdpipe verify"):
        WaveformStore.open(store_path)
    flip_bytes(shard_files[3])  # rows 12-15: the bytes change, the file stays
    damage = {(d.array, d.start, d.stop, d.reason.split(" (")[0]) for d in find_damage(store_path)}
    assert damage == {("waveform", 4, 8, "are missing"), ("waveform", 12, 16, "do not decode")}

    before = {p: p.stat().st_mtime_ns for p in shard_files if p.exists()}
    result = runner.invoke(app, ["verify", "prepare", *[f"--set={s}" for s in settings(small_demo, tmp_path)]])
    assert result.exit_code == 0, result.output
    assert "marked: 2 damaged unit(s)" in " ".join(result.output.split())
    assert pipeline.status("prepare").state != "fresh"
    rebuilt = make(small_demo, tmp_path)
    rebuilt.ensure("prepare")
    np.testing.assert_array_equal(WaveformStore.open(store_path).read(np.arange(small_demo.n_clips)), original)
    touched = {p for p, mtime in before.items() if p.stat().st_mtime_ns != mtime}
    assert touched == {shard_files[3]}  # the intact shards were not rewritten (and the missing one came back)
    assert shard_files[1].is_file() and find_damage(store_path) == []
    (store_path / "status" / "c" / "1").unlink()  # a lost status chunk no longer drops clips silently
    with pytest.raises(DamagedStore, match="status rows 4-7 are missing"):
        WaveformStore.open(store_path)


@pytest.mark.parametrize("workers", [0, 1])  # read in this process, or in a loader worker that re-raises
def test_training_refuses_a_corrupt_shard_and_a_missing_label_chunk(small_demo, prepared_here, tmp_path, workers):
    helpers.copy_cache(prepared_here, tmp_path)
    pipeline = make(small_demo, tmp_path, "student.kd.enabled=false", f"student.num_workers={workers}")
    store_path = pipeline.ensure("prepare") / "waveforms.zarr"
    shards = sorted(p for p in (store_path / "waveform" / "c").rglob("*") if p.is_file())
    flip_bytes(shards[0], offset=100, count=4000)
    with pytest.raises(KdpipeError, match=r"^damaged data: \S+waveforms.zarr: waveform rows \d+-\d+ fail their "
                       r"checksum\. Run `kdpipe verify`"):  # one line, also from a worker
        pipeline.ensure("train-student/no-kd")
    (store_path / "labels" / "c" / "0" / "0").unlink()  # written whole at creation: one chunk of 16,384 rows
    with pytest.raises(DamagedStore, match=r"labels rows 0-\d+ are missing"):
        make(small_demo, tmp_path, "student.kd.enabled=false", f"student.num_workers={workers}",
             "student.seed=5").ensure("train-student/no-kd")


def test_an_ensemble_never_takes_a_lost_teacher_chunk_for_no_teacher(small_demo, prepared_here, tmp_path):
    helpers.copy_cache(prepared_here, tmp_path)
    pipeline = make(small_demo, tmp_path)
    combined = pipeline.ensure("extract-teachers") / "teachers.zarr"
    (combined / "ensemble" / "logits" / "c" / "2" / "0").unlink()  # rows 16-23 of the ensemble
    with pytest.raises(DamagedStore, match=r"ensemble/logits rows 16-23 are missing"):
        pipeline.ensure("train-student")
    logits_path = pipeline.ensure("extract/mn_tiny") / "logits.zarr"
    (logits_path / "logits" / "c" / "1" / "0").unlink()  # rows 8-15 of the teacher
    with pytest.raises(DamagedStore, match=r"logits rows 8-15 are missing"):
        pipeline.ensure("extract-teachers", force=True)
    teacher = TeacherLogits.create(tmp_path / "t.zarr", 4, 3, 4, "float32", {})
    teacher.write_chunk(0, np.array([[1, 2, 3], [np.nan] * 3, [1, 1, 1], [0, 0, 0]], dtype=np.float32))
    decoded = np.array([True, True, True, False])
    with pytest.raises(KdpipeError, match="rows 1 should have teacher t's logits"):
        write_combined(tmp_path / "c.zarr", np.array(list("abcd")), {"t": teacher}, {"t": 1.0}, "logits",
                       "float32", {}, {"t": decoded})
    write_combined(tmp_path / "c.zarr", np.array(list("abcd")), {"t": teacher}, {"t": 1.0}, "logits", "float32", {},
                   {"t": decoded & [True, False, True, True]})  # an imported teacher's gap is allowed


@pytest.mark.parametrize("garbage", ["{not json", "{}", "[1, 2]", '{"stage": "prepare"}'])
def test_an_unreadable_record_means_not_built(small_demo, prepared_here, tmp_path, garbage):
    helpers.copy_cache(prepared_here, tmp_path)
    pipeline = make(small_demo, tmp_path)
    entry = pipeline.ensure("prepare")
    (entry / "record.json").write_text(garbage)
    fresh = make(small_demo, tmp_path)
    assert fresh.status("prepare").state != "fresh"
    result = runner.invoke(app, ["status", *[f"--set={s}" for s in settings(small_demo, tmp_path)]])
    assert result.exit_code == 0 and "Traceback" not in result.output
    fresh.ensure("prepare")
    assert json.loads((entry / "record.json").read_text())["stage"] == "prepare"


def test_gc_skips_entries_being_built_or_read(small_demo, prepared_here, tmp_path):
    helpers.copy_cache(prepared_here, tmp_path)
    pipeline = make(small_demo, tmp_path)
    pipeline.ensure("prepare")
    other = make(small_demo, tmp_path, "prepare.min_seconds=0.9")  # prepare's entry is unreferenced there
    key = pipeline.key("prepare")
    gc = ["cache", "gc", *[f"--set={s}" for s in settings(small_demo, tmp_path, "prepare.min_seconds=0.9")]]
    with pipeline.cache.reading("prepare", key):
        result = runner.invoke(app, [*gc])
        assert f"skipped prepare/{key}: in use" in result.output
        assert pipeline.cache.record("prepare", key) is not None
    with pipeline.cache.lock("prepare", key):
        assert "skipped" in runner.invoke(app, [*gc, "--dry-run"]).output
    result = runner.invoke(app, gc)
    assert f"removed prepare/{key}" in result.output and not pipeline.cache.entry_dir("prepare", key).exists()
    assert other.status("prepare").state == "missing"


def command_line(process: psutil.Process) -> str:
    """A process's command line; "" once it has exited (a zombie has none to read)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def test_workers_die_with_a_killed_parent(small_demo, tmp_path):
    command = [sys.executable, "-m", "kdpipe", "prepare", *[f"--set={s}" for s in settings(
        small_demo, tmp_path, "prepare.workers=2", "prepare.shard_clips=1")]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 120
    children: list[psutil.Process] = []
    while time.monotonic() < deadline and process.poll() is None:
        children = [c for c in parent.children(recursive=True) if "resource_tracker" not in command_line(c)]
        if len(children) >= 2 and list(tmp_path.glob("prepare/*/waveforms.zarr/done")):
            break
        time.sleep(0.05)
    assert len(children) >= 2, "the decode workers never started"
    everyone = parent.children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    gone, alive = psutil.wait_procs(everyone, timeout=10)
    assert not alive, f"survived their parent: {[command_line(p) for p in alive]}"


def test_die_with_parent_kills_a_busy_child_at_once():
    """The mechanism alone: a child that would sleep a minute goes when its parent is killed."""
    child_code = ("import os, sys, time; from kdpipe.processes import die_with_parent; "
                  "die_with_parent(int(sys.argv[1])); print('armed', flush=True); time.sleep(60)")
    parent_code = ("import os, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', sys.argv[1], "
                   "str(os.getpid())], stdout=sys.stdout); print(child.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code, child_code], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    assert parent.stdout.readline().strip() == "armed"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    child.wait(timeout=5)  # raises psutil.TimeoutExpired if the child outlived its parent


def test_a_full_disk_or_a_file_in_the_cache_path_is_one_message(small_demo, tmp_path):
    import resource

    (tmp_path / "a_file").write_text("")
    for unusable in (tmp_path / "a_file" / "cache", Path("/proc/kdpipe-cache")):
        result = runner.invoke(app, ["prepare", *[f"--set={s}" for s in settings(small_demo, unusable)]])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert f"cache_dir:{unusable}cannotbeused" in "".join(result.output.split())  # wrapped anywhere

    def small_files() -> None:  # EFBIG past 200 kB, as a full disk fails a write
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    command = [sys.executable, "-m", "kdpipe", "prepare",
               *[f"--set={s}" for s in settings(small_demo, tmp_path / "limited", "prepare.workers=0")]]
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=small_files, timeout=300,
                            env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1, result.stderr
    assert "file larger than this process may write" in result.stderr
    assert "rerun the same command to resume" in result.stderr
    assert not list((tmp_path / "limited").glob("prepare/*/record.json"))  # nothing taken as done


def test_verify_decodes_a_chunk_two_stores_hard_link_once(tmp_path, monkeypatch):
    """teachers.zarr hard-links its teachers' chunks: verified through the teacher's store, they are not decoded
    again through the combined one; without that record, they are."""
    teacher = TeacherLogits.create(tmp_path / "t.zarr", 4, 3, 2, "float32", {})
    for chunk in range(2):
        teacher.write_chunk(chunk, np.zeros((2, 3), np.float32))
        teacher.mark_done(chunk)
    write_combined(tmp_path / "c.zarr", np.array(list("abcd")), {"t": TeacherLogits.open(tmp_path / "t.zarr")},
                   {"t": 1.0}, "logits", "float32", {}, {"t": np.ones(4, bool)})
    decoded = []
    check = integrity._unit_problem
    monkeypatch.setattr(integrity, "_unit_problem",
                        lambda array, *where: decoded.append(array.path) or check(array, *where))
    verified = set()
    assert find_damage(tmp_path / "t.zarr", verified=verified) == []
    assert decoded.count("logits") == 2
    decoded.clear()
    assert find_damage(tmp_path / "c.zarr", verified=verified) == []
    assert "teachers/t/logits" not in decoded and decoded.count("ensemble/logits") == 2
    decoded.clear()
    assert find_damage(tmp_path / "c.zarr") == []
    assert decoded.count("teachers/t/logits") == 2
    flip_bytes(tmp_path / "t.zarr" / "logits" / "c" / "1" / "0", offset=8, count=4)  # rows 2-3, through both links
    verified = set()
    for store, array in (("t.zarr", "logits"), ("c.zarr", "teachers/t/logits")):
        damage = find_damage(tmp_path / store, verified=verified)
        assert [(d.array, d.start, d.stop, d.reason) for d in damage] == [(array, 2, 4, "fail their checksum")]
