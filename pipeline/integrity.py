"""Every array kdpipe writes can be verified, and damage fails loudly instead of reading as fill values.

- Each chunk ends with a crc32c checksum (zarr's Crc32cCodec, the last codec of every array we
  create): a chunk whose bytes changed fails to decode.
- Every chunk is written even when it holds only the fill value (`write_empty_chunks`), so a chunk
  file missing where data was written is damage, never "all zeros" or "all NaN".
- Stores written unit by unit (waveform shards, logits chunks) name their unit-written arrays in
  the `unit_arrays` attribute; a unit counts as written once its `done` flag is set. Their other
  arrays, and every array of a store without units, are written whole when the store is made.

`find_damage` lists what is missing or does not decode; `repair` clears the `done` flags of the
damaged units, so the resumable stage that wrote them rebuilds those units and nothing else.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from kdpipe.errors import KdpipeError

DONE = "done"

# Not a per-array setting in Zarr 3 (an array reopened later would forget it): every kdpipe
# process writes all chunks, so "no file" can only mean "never written" or "lost".
zarr.config.set({"array.write_empty_chunks": True})


def array_settings(compress: bool = True) -> dict[str, Any]:
    """`create_array` keywords that make an array verifiable: crc32c last in its codec chain."""
    codecs = [ZstdCodec(level=3), Crc32cCodec()] if compress else [Crc32cCodec()]
    return {"compressors": codecs}


@dataclass(frozen=True)
class Damage:
    store: Path
    array: str
    start: int  # first row
    stop: int  # one past the last row
    reason: str

    def __str__(self) -> str:
        return f"{self.store}: {self.array} rows {self.start}-{self.stop - 1} {self.reason}"


class DamagedStore(KdpipeError):
    """A store kdpipe wrote has missing or corrupt chunks."""

    def __init__(self, damage: list[Damage] | str):
        if isinstance(damage, str):  # re-raised from a loader worker: keep the worker's own message
            lines = [line for line in damage.splitlines() if "DamagedStore: " in line]
            super().__init__(lines[-1].split("DamagedStore: ", 1)[1] if lines else damage)
            self.damage: list[Damage] = []
            return
        shown = "; ".join(str(d) for d in damage[:3]) + (f"; and {len(damage) - 3} more" if len(damage) > 3 else "")
        super().__init__(f"damaged data: {shown}. Run `kdpipe verify` to mark it, then `kdpipe run` to rebuild "
                         "only the damaged parts")
        self.damage = damage


def _row_unit(array: zarr.Array) -> int:
    """Rows per chunk file: a shard when the array is sharded."""
    return (array.shards or array.chunks)[0]


def _chunk_suffixes(array: zarr.Array) -> list[str]:
    """The key suffixes after `c/<unit>` of one row unit's chunk (or shard) files, in zarr 3's default key
    encoding (c/i/j...); plain strings, as AudioSet's 2 M clips give a waveform store 55 k files to check
    (pathlib: 2 s, strings: 0.1)."""
    grid = [range(math.ceil(size / chunk)) for size, chunk in zip(array.shape[1:], (array.shards or array.chunks)[1:])]
    return ["".join(f"/{index}" for index in rest) for rest in itertools.product(*grid)]


FileId = tuple[int, int]
"""(device, inode): a file however many hard links name it."""


def find_damage(path: Path, decode: bool = True, verified: set[FileId] | None = None) -> list[Damage]:
    """Missing chunk files where data was written, and (with `decode`) chunks failing their checksum.

    `verified` holds the files already decoded without fault (a combined teachers.zarr hard-links its
    teachers' chunks): a unit made only of such files is not decoded again, and the files of every unit
    that decodes are added to it.
    """
    group = zarr.open_group(path, mode="r")
    unit_arrays = set(group.attrs.get("unit_arrays", ()))
    found: list[Damage] = []
    flags = None  # which units of the unit-written arrays hold data; None: unknown, check them all
    if unit_arrays:
        try:
            flags = np.asarray(group[DONE][:], dtype=bool)
        except Exception as exc:  # noqa: BLE001 - the flags themselves are damaged
            found.append(Damage(path, DONE, 0, group[DONE].shape[0], f"do not decode ({exc})"))
    verified = set() if verified is None else verified
    for name, array in sorted((name, member) for name, member in group.members(max_depth=None)
                              if isinstance(member, zarr.Array)):
        if name == DONE and found:
            continue  # already reported
        unit = _row_unit(array)
        units = math.ceil(array.shape[0] / unit)
        written = flags[:units] if name in unit_arrays and flags is not None else np.ones(units, dtype=bool)
        suffixes = _chunk_suffixes(array)
        for index in np.flatnonzero(written):
            start, stop = int(index) * unit, min((int(index) + 1) * unit, array.shape[0])
            unit_files = [f"{path}/{name}/c/{index}{suffix}" for suffix in suffixes]
            try:
                stats = [os.stat(file) for file in unit_files]
            except FileNotFoundError:
                found.append(Damage(path, name, start, stop, "are missing"))
                continue
            files = {(stat.st_dev, stat.st_ino) for stat in stats}
            if not decode or files <= verified:
                continue
            problem = _unit_problem(array, unit_files, start, stop)
            if problem:
                found.append(Damage(path, name, start, stop, problem))
            else:
                verified |= files
    return found


def _unit_problem(array: zarr.Array, files: list[str], start: int, stop: int) -> str | None:
    """Why rows start:stop of `array` are damaged, or None. An unsharded array's chunk files end with the crc32c
    of the bytes before it (array_settings), which is checked on the bytes as stored, at the speed of reading
    them (decoding zstd first ran at 0.22 GB/s on the development VM); a sharded one is decoded."""
    if array.shards is not None or not isinstance(array.metadata.codecs[-1], Crc32cCodec):
        try:
            array[start:stop]
        except Exception as exc:  # noqa: BLE001 - any decode failure is damage to report
            return f"do not decode ({exc})"
        return None
    for file in files:
        with open(file, "rb") as handle:
            data = handle.read()
        if len(data) < 4 or np.uint32(google_crc32c.value(np.frombuffer(data, np.uint8)[:-4])).tobytes() != data[-4:]:
            return "fail their checksum"
    return None


def check_written(path: Path) -> None:
    """Raise DamagedStore if a chunk file is missing where data was written (a listing, not a read)."""
    damage = find_damage(path, decode=False)
    if damage:
        raise DamagedStore(damage)


def repair(path: Path, damage: list[Damage]) -> bool:
    """Clear the done flags of damaged units; False when the damage is not confined to such units."""
    group = zarr.open_group(path, mode="r+")
    unit_arrays = set(group.attrs.get("unit_arrays", ()))
    if any(d.array not in unit_arrays for d in damage):
        return False
    flags = np.asarray(group[DONE][:], dtype=bool)
    for d in damage:
        unit = _row_unit(group[d.array])
        flags[d.start // unit] = False
    group[DONE][:] = flags
    return True


def read_rows(array: zarr.Array, store: Path, start: int = 0, stop: int | None = None,
              rows: np.ndarray | None = None, column: int | None = None) -> np.ndarray:
    """`array[start:stop]` (or the listed `rows`, reading only their chunks; with `column`, only that index
    of the second axis), with a chunk that fails its checksum reported as damage of `store`."""
    stop = array.shape[0] if stop is None else stop
    column_index = () if column is None else (column,)
    try:
        if rows is not None:
            start, stop = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
            return array.oindex[(rows, *column_index)]
        return array[(slice(start, stop), *column_index)]
    except ValueError as exc:
        if "checksum" not in str(exc).lower():
            raise
        raise DamagedStore([Damage(store, array.path, start, stop, "fail their checksum")]) from None


BLOCK_ROWS = 16384
"""Rows per block when a whole (N, C) array is streamed: (16384, 527) float32 temporaries are 35 MB."""


def row_blocks(n_rows: int, block: int = BLOCK_ROWS) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive blocks of rows."""
    for start in range(0, n_rows, block):
        yield start, min(start + block, n_rows)


def ready_to_resume(path: Path) -> bool:
    """Before a build resumes in `path`: clear the done flags of units with missing chunk files.

    False when the damage lies outside the unit-written arrays: the store must be made anew.
    """
    damage = find_damage(path, decode=False)
    return not damage or repair(path, damage)
