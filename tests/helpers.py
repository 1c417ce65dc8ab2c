"""Helpers several test files share; pytest puts tests/ on sys.path, so `from helpers import ...` works."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.config import load_config
from kdpipe.demo_data import DemoDataset
from kdpipe.runner import Pipeline
from kdpipe.stages import build_stages

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
