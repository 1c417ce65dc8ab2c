"""The class list: AudioSet mids and display names, in output order.

Its own module, free of pydantic and h5py, because every loader worker imports the
waveform store, which stores the class list; manifests (config, HDF5) stays out of them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from kdpipe.errors import KdpipeError


@dataclass(frozen=True)
class ClassList:
    mids: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.mids)

    def lookup(self) -> dict[str, int]:
        """Label (mid or display name) -> class index."""
        table = {name: i for i, name in enumerate(self.names)}
        table.update({mid: i for i, mid in enumerate(self.mids)})
        return table


def read_class_list(path: Path) -> ClassList:
    """AudioSet's `class_labels_indices.csv`: index, mid, display_name."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise KdpipeError(f"{path}: expected a class list with columns index,mid,display_name")
    rows.sort(key=lambda row: int(row["index"]))
    if [int(row["index"]) for row in rows] != list(range(len(rows))):
        raise KdpipeError(f"{path}: class indices must run 0..{len(rows) - 1} without gaps")
    return ClassList(tuple(row["mid"] for row in rows), tuple(row["display_name"] for row in rows))
