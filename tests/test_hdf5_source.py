"""Reading PaSST/EfficientAT AudioSet HDF5 files (kdpipe.hdf5_source)."""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf

from kdpipe.audio_io import load_clip
from kdpipe.hdf5_source import Hdf5FormatError, read_hdf5_audio, read_hdf5_index, ytid_from_audio_name

SR = 32000
NAMES = [b"Y--4gqARaEJE.mp3", b"00/YYabcdefghij.mp3", b"Y_0123456789.mp3"]
FREQS = [440.0, 1000.0, 2500.0]


def mp3_bytes(freq: float) -> bytes:
    t = np.arange(2 * SR) / SR
    buffer = io.BytesIO()
    sf.write(buffer, (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR, format="MP3")
    return buffer.getvalue()


def random_targets(rows: int, num_classes: int = 527) -> np.ndarray:
    return np.random.default_rng(0).random((rows, num_classes)) < 0.02


def build_passt_file(path: Path, targets: np.ndarray, skip: str | None = None) -> Path:
    """An HDF5 file in the PaSST layout; `skip` leaves one dataset out."""
    with h5py.File(path, "w") as f:
        if skip != "audio_name":
            f.create_dataset("audio_name", data=np.array(NAMES, dtype="S20"))
        if skip != "mp3":
            audio = f.create_dataset("mp3", shape=(len(NAMES),), dtype=h5py.vlen_dtype(np.uint8))
            for i, freq in enumerate(FREQS):
                audio[i] = np.frombuffer(mp3_bytes(freq), dtype=np.uint8)
        if skip != "target":
            f.create_dataset("target", data=np.packbits(targets, axis=1))
    return path


@pytest.fixture
def targets() -> np.ndarray:
    return random_targets(len(NAMES))


@pytest.fixture
def passt_file(tmp_path, targets) -> Path:
    return build_passt_file(tmp_path / "balanced_train.h5", targets)


def test_ytid_from_audio_name():
    assert ytid_from_audio_name(b"Y--4gqARaEJE.mp3") == "--4gqARaEJE"
    assert ytid_from_audio_name("00/Y--4gqARaEJE.mp3") == "--4gqARaEJE"
    assert ytid_from_audio_name(b"YYabcdefghij.mp3\0\0") == "Yabcdefghij"  # ids may start with Y
    with pytest.raises(ValueError):
        ytid_from_audio_name("--4gqARaEJE.mp3")


def test_index_has_ids_and_unpacked_targets(passt_file, targets):
    index = read_hdf5_index(passt_file)
    assert [clip.index for clip in index] == [0, 1, 2]
    assert [clip.clip_id for clip in index] == ["--4gqARaEJE", "Yabcdefghij", "_0123456789"]
    for clip, expected in zip(index, targets):
        assert clip.target.dtype == bool and clip.target.shape == (527,)
        np.testing.assert_array_equal(clip.target, expected)


def test_stored_mp3_decodes_to_the_original_signal(passt_file):
    for row, freq in enumerate(FREQS):
        clip, info = load_clip(read_hdf5_audio(passt_file, row), sample_rate=SR, clip_samples=2 * SR)
        assert info["orig_sample_rate"] == SR
        t = np.arange(2 * SR) / SR
        original = 0.5 * np.sin(2 * np.pi * freq * t)
        assert np.corrcoef(clip / 32767, original)[0, 1] > 0.99


def test_row_out_of_range(passt_file):
    with pytest.raises(IndexError, match="row 3"):
        read_hdf5_audio(passt_file, 3)


def test_missing_target_dataset_is_a_clear_error(tmp_path, targets):
    path = build_passt_file(tmp_path / "no_target.h5", targets, skip="target")
    with pytest.raises(Hdf5FormatError) as caught:
        read_hdf5_index(path)
    assert isinstance(caught.value, ValueError)
    assert str(path) in str(caught.value) and "'target'" in str(caught.value)


def test_missing_mp3_dataset_is_a_clear_error(tmp_path, targets):
    path = build_passt_file(tmp_path / "no_mp3.h5", targets, skip="mp3")
    with pytest.raises(Hdf5FormatError, match="'mp3'"):
        read_hdf5_audio(path, 0)


def test_target_width_must_match_the_class_count(passt_file):
    with pytest.raises(Hdf5FormatError, match="200 classes"):
        read_hdf5_index(passt_file, num_classes=200)


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "fake.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(Hdf5FormatError, match="fake.h5"):
        read_hdf5_index(path)
