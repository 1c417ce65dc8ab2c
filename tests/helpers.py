"""Helpers several test files share; pytest puts tests/ on sys.path, so `from helpers import ...` works."""

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.config import load_config
from kdpipe.demo_data import DemoDataset
from kdpipe.runner import Pipeline
from kdpipe.stages import build_stages

ROOT = Path(__file__).resolve().parents[1]
"""The checkout: its configs/ are the shipped configs."""

# The student run: one mn_tiny teacher and a width-0.2 student, small enough for many tests.
STUDENT_RUN = ("teachers.0.arch=mn_tiny", "teacher_training.epochs=1", "teacher_training.batch_size=4",
               "teacher_training.num_workers=0", "extract.num_workers=0", "student.arch=mobilenetv3",
               "student.width=0.2", "student.epochs=2", "student.epoch_samples=16", "student.batch_size=4",
               "student.num_workers=0")


def settings(run: Sequence[str], small_demo: DemoDataset, cache: Path, *extra: str) -> list[str]:
    """--set items for `run` (a test file's stages and sizes) on small_demo, cached in `cache`; `extra` last, so it wins."""
    return [f"cache_dir={cache}", f"data.sources.0.path={small_demo.manifest}",
            f"data.class_list={small_demo.class_list}", "data.clip_seconds=1.0", "prepare.workers=1", *run, *extra]


def make(run: Sequence[str], small_demo: DemoDataset, cache: Path, *extra: str) -> Pipeline:
    """The pipeline of `settings(run, small_demo, cache, *extra)`."""
    config = load_config(None, settings(run, small_demo, cache, *extra))
    return Pipeline(build_stages(config), config)


def invoke(*args: str) -> str:
    """Run the CLI in-process; its output, asserting it exited 0."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def tone(freq: float, seconds: float, sr: int = 16000, amp: float = 0.5) -> np.ndarray:
    """A float32 sine: one frequency, so a resampling or decoding error shows up as energy elsewhere."""
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def kill_after_chunks(command: list[str], cache: Path, minimum: int, total: int) -> None:
    """Start `command` (an extraction), SIGKILL it once `minimum` of the `total` logits chunks under `cache` are
    done, and check the kill landed mid-way."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done, deadline = 0, time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and done < minimum:
        done = 0
        for path in cache.glob("extract/*/*/logits.zarr"):
            try:
                done += int(zarr.open_group(path, mode="r")["done"][:].sum())
            except Exception:  # being created
                pass
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert minimum <= done < total, f"kill landed after {done} of {total} chunks: {process.returncode}"


def resume_and_run_clean(command: list[str], killed: Path, clean: Path) -> None:
    """Rerun the killed `command` (it must resume) and run it uninterrupted in `clean`; both must succeed.

    Both run in this process (the CLI, in-process): only the run that is killed needs a process of its own, a
    rerun reads nothing but the cache, and each `python -m kdpipe` costs seconds of imports."""
    args = command[3:]  # after `python -m kdpipe`
    resumed = CliRunner().invoke(app, args)
    assert resumed.exit_code == 0 and "chunks already done" in resumed.output, resumed.output
    invoke(*[c.replace(str(killed), str(clean)) for c in args])


def copy_cache(source: Path, target: Path) -> Path:
    """Copy a cache built once by a session fixture (conftest: `prepared`, `student_upstream`) into `target`, so a
    test builds on its own copy and never pays for the shared upstream stages again. Returns `target`."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target
