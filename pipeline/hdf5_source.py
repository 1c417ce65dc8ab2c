"""Read the PaSST/EfficientAT AudioSet HDF5 files many users already have.

Layout (one row per clip):
  audio_name  fixed-length bytes, b"Y<ytid>.mp3", in the unbalanced set
              possibly with a folder prefix, b"00/Y<ytid>.mp3"
  mp3         variable-length uint8, the raw bytes of an mp3 file
  target      uint8 (N, ceil(num_classes / 8)), np.packbits of the multi-hot labels

Files are opened read-only: they are shared, multi-GB inputs that kdpipe must never modify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from kdpipe.errors import KdpipeError

NAME_DATASET = "audio_name"
AUDIO_DATASET = "mp3"
TARGET_DATASET = "target"


class Hdf5FormatError(KdpipeError, ValueError):
    """The HDF5 file is not in the PaSST/EfficientAT layout (missing dataset, wrong target width)."""


@dataclass(frozen=True)
class Hdf5Clip:
    index: int
    clip_id: str
    target: np.ndarray  # bool (num_classes,)


def ytid_from_audio_name(name: bytes | str) -> str:
    """The YouTube id in an audio_name entry: b"00/Y--4gqARaEJE.mp3" -> "--4gqARaEJE"."""
    if isinstance(name, bytes):
        name = name.rstrip(b"\0").decode("ascii")
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if not stem.startswith("Y") or len(stem) < 2:
        raise ValueError(f"audio_name {name!r} is not of the form 'Y<youtube id>.mp3'")
    return stem[1:]  # only the one "Y" prefix: YouTube ids may themselves start with "Y"


def read_hdf5_index(path: Path, num_classes: int = 527) -> list[Hdf5Clip]:
    """Clip ids and unpacked targets of every row; no audio is read."""
    with _open(path) as f:
        names = _dataset(f, path, NAME_DATASET)[()]
        packed = _dataset(f, path, TARGET_DATASET)[()]
    _check_targets(packed, len(names), num_classes, path)
    targets = np.unpackbits(packed, axis=1, count=num_classes).astype(bool)
    return [Hdf5Clip(index=i, clip_id=ytid_from_audio_name(name), target=targets[i]) for i, name in enumerate(names)]


def read_hdf5_audio(path: Path, index: int) -> bytes:
    """The encoded mp3 bytes stored in row `index` (decode them with audio_io.load_clip)."""
    with _open(path) as f:
        audio = _dataset(f, path, AUDIO_DATASET)
        if not 0 <= index < len(audio):
            raise IndexError(f"{path}: row {index} out of range, the file has {len(audio)} rows")
        return audio[index].tobytes()


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Hdf5FormatError(f"{path}: not a readable HDF5 file ({exc})") from exc


def _dataset(f: h5py.File, path: Path, name: str) -> h5py.Dataset:
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise Hdf5FormatError(
            f"{path}: no '{name}' dataset (found: {', '.join(sorted(f.keys())) or 'nothing'}); "
            f"expected a PaSST/EfficientAT AudioSet file with "
            f"'{NAME_DATASET}', '{AUDIO_DATASET}' and '{TARGET_DATASET}'"
        )
    return f[name]


def _check_targets(packed: np.ndarray, rows: int, num_classes: int, path: Path) -> None:
    width = math.ceil(num_classes / 8)
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != width:
        raise Hdf5FormatError(
            f"{path}: '{TARGET_DATASET}' is {packed.dtype} {packed.shape}, expected uint8 (rows, {width}) "
            f"holding np.packbits of {num_classes} classes; is the class list the one the file was built with?"
        )
    if packed.shape[0] != rows:
        raise Hdf5FormatError(
            f"{path}: '{TARGET_DATASET}' has {packed.shape[0]} rows but '{NAME_DATASET}' has {rows}"
        )
