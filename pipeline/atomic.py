"""Whole-file writes that a kill at any moment leaves either undone or complete, never half-written.

Each writes a temporary sibling (named by process, so concurrent writers do not share one)
and renames it over the target: a rename within one folder is atomic.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write(path: Path, writer: Callable[[Path], object]) -> None:
    """`writer(temporary_path)` writes the content, e.g. `lambda tmp: torch.save(state, tmp)`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: the temporary never outlives its write
        tmp.unlink(missing_ok=True)
        raise


def remove_leftovers(folder: Path) -> None:
    """Delete temporaries that a killed writer left (called before a stage commits its folder)."""
    for leftover in folder.rglob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write(path, lambda tmp: tmp.write_text(text))
