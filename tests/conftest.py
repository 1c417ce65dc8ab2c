"""Shared fixtures: small generated datasets, a tiny trained run, and the official AudioSet metadata."""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kdpipe.config import load_config
from kdpipe.demo_data import DemoDataset, write_demo_dataset
from kdpipe.models import create_model
from kdpipe.runner import Pipeline
from kdpipe.stages import build_stages

from helpers import STUDENT_RUN, copy_cache, make, settings

AUDIOSET_METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "audioset"


def pytest_configure(config):
    """Under pytest-xdist each worker gets one core's share: torch (and every process a test starts) runs one
    thread, so two workers on two cores do not oversubscribe them (spinning OpenMP threads slow both)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The files whose tests take longest (seconds on 2 cores, measured), scheduled first: each xdist worker takes
# whole files (--dist loadfile), and longest-first keeps both busy to the end instead of one finishing a long
# file alone. A file not listed here comes after them, in collection order.
LONGEST_FILES = {"test_multinode": 75, "test_train_student": 60, "test_dask_cluster": 45, "test_honest_numbers": 35,
                 "test_cli": 35, "test_export": 30, "test_extract": 30, "test_integrity": 30}


def pytest_collection_modifyitems(items):
    """The environment checks run first: a drifted torch stack fails there, readably, before anything else.
    Then the longest files (LONGEST_FILES); within a file the order is kept."""
    items.sort(key=lambda item: (item.module.__name__ != "test_torch_stack",
                                 -LONGEST_FILES.get(item.module.__name__, 0)))


@pytest.fixture(scope="session")
def audioset_metadata() -> Path:
    """The official AudioSet CSVs, read from ../shared (never copied into the repo)."""
    if not (AUDIOSET_METADATA / "class_labels_indices.csv").is_file():
        pytest.skip(f"official AudioSet metadata not found at {AUDIOSET_METADATA}")
    return AUDIOSET_METADATA


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> DemoDataset:
    """A 32-clip demo dataset (train 16, eval 8, val 8) of 1 s clips in mixed formats and sample rates."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=16, n_eval=8, n_val=8, clip_seconds=1.0)


@pytest.fixture(scope="session")
def prepared(small_demo, tmp_path_factory) -> Path:
    """A cache holding small_demo's prepare stage as helpers.settings configures it (the prepare of most tests):
    built once, copied by the fixtures and tests that build on it (helpers.copy_cache)."""
    cache = tmp_path_factory.mktemp("prepared") / "cache"
    make(STUDENT_RUN, small_demo, cache).ensure("prepare")
    return cache


@pytest.fixture(scope="session")
def student_upstream(prepared, small_demo, tmp_path_factory) -> Path:
    """A cache with STUDENT_RUN's teacher stages built (prepare, train-teacher/mn_tiny, extract/mn_tiny,
    extract-teachers): the upstream of most student tests, trained once. Tests copy it (helpers.copy_cache)."""
    cache = copy_cache(prepared, tmp_path_factory.mktemp("student_upstream") / "cache")
    make(STUDENT_RUN, small_demo, cache).ensure("extract-teachers")
    return cache


@dataclass(frozen=True)
class TrainedRun:
    settings: list[str]  # the --set items that describe the run
    pipeline: Pipeline
    teacher_checkpoint: Path  # the weights of teacher passt_tiny (untrained, seeded)


@pytest.fixture(scope="session")
def trained_run(prepared, small_demo, tmp_path_factory) -> TrainedRun:
    """small_demo with a one-epoch no-KD student built; teacher passt_tiny has a checkpoint file,
    teacher mn_tiny (trained by train-teacher) is never built."""
    root = tmp_path_factory.mktemp("trained_run")
    copy_cache(prepared, root / "cache")
    checkpoint = root / "passt_tiny.pt"
    torch.manual_seed(0)
    torch.save(create_model("passt_tiny", num_classes=12).state_dict(), checkpoint)
    items = settings(STUDENT_RUN, small_demo, root / "cache", "teachers.1.arch=passt_tiny", f"teachers.1.checkpoint={checkpoint}",
                     "student.kd.enabled=false", "student.epochs=1", "student.epoch_samples=8")
    config = load_config(None, items)
    pipeline = Pipeline(build_stages(config), config)
    pipeline.ensure("train-student/no-kd")
    return TrainedRun(items, pipeline, checkpoint)
