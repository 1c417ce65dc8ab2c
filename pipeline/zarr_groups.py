"""Small pieces both Zarr stores share: a format check on open and per-unit completion flags."""

from __future__ import annotations

from pathlib import Path

import zarr

from kdpipe.integrity import array_settings


def open_group(path: Path, mode: str, expected_format: str) -> zarr.Group:
    """Open a kdpipe store, refusing a folder that holds something else."""
    group = zarr.open_group(path, mode=mode)
    if group.attrs.get("format") != expected_format:
        raise ValueError(f"{path} is not a {expected_format} store")
    return group


def create_done_flags(group: zarr.Group, units: int) -> None:
    """`done`: one flag per unit of writing (shard or chunk), set only after the unit's data is written."""
    group.create_array("done", shape=(units,), dtype=bool, chunks=(units,), fill_value=False, **array_settings())
