"""Shared fixtures: small generated datasets and the official AudioSet metadata."""

from pathlib import Path

import pytest

from pipeline.demo_data import DemoDataset, write_demo_dataset

AUDIOSET_METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "audioset"


@pytest.fixture(scope="session")
def audioset_metadata() -> Path:
    """The official AudioSet CSVs, read from ../shared (never copied into the repo)."""
    if not (AUDIOSET_METADATA / "class_labels_indices.csv").is_file():
        pytest.skip(f"official AudioSet metadata not found at {AUDIOSET_METADATA}")
    return AUDIOSET_METADATA


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> DemoDataset:
    """A 24-clip demo dataset of 1 s clips in mixed formats and sample rates."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=16, n_eval=8, clip_seconds=1.0)
