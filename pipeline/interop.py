"""EfficientAT's teacher-logit files: a .npy of logits and `fname_to_index.pkl` (YouTube id -> row).

Many users already have `passt_enemble_logits_mAP_495.npy`; importing it lets
them train students without running stage one. Exporting lets EfficientAT's
own training code read logits we extracted.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from kdpipe.errors import KdpipeError

# What a pickled {str: int} dict may reference: numpy scalars, nothing that runs code.
_SAFE_GLOBALS = {("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _DictUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in _SAFE_GLOBALS:
            raise KdpipeError(f"refusing to load {module}.{name} from a pickle: an index holds only ids and rows")
        return super().find_class(module, name)


def read_index(path: Path) -> dict[str, int]:
    """`fname_to_index.pkl`, read without executing anything but numpy scalar construction."""
    with open(path, "rb") as handle:
        try:
            index = _DictUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise KdpipeError(f"{path}: not a readable pickle ({exc})") from None
    if not isinstance(index, dict):
        raise KdpipeError(f"{path}: expected a dict of YouTube id -> row, got {type(index).__name__}")
    rows = {}
    for key, value in index.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise KdpipeError(f"{path}: the row of {key!r} is {value!r}, not an integer row number")
        rows[str(key)] = int(value)
    return rows


def import_logits(npy: Path, index_path: Path, clip_ids: np.ndarray, n_classes: int) -> tuple[np.ndarray, int]:
    """Logits aligned to `clip_ids` (NaN for clips the file lacks) and the number of clips found."""
    try:
        logits = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise KdpipeError(f"{npy}: not a readable .npy array of logits ({exc})") from None
    if not isinstance(logits, np.ndarray) or not np.issubdtype(logits.dtype, np.floating):
        raise KdpipeError(f"{npy}: expected float logits, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.ndim != 2 or logits.shape[1] != n_classes:
        raise KdpipeError(f"{npy}: shape {logits.shape}, expected (clips, {n_classes})")
    index = read_index(index_path)
    bad = [row for row in index.values() if not 0 <= row < len(logits)]
    if bad:
        raise KdpipeError(f"{index_path}: {len(bad)} row(s) outside the {len(logits)} rows of {npy.name}")
    aligned = np.full((len(clip_ids), n_classes), np.nan, dtype=np.float32)
    rows = np.array([index.get(str(clip_id), -1) for clip_id in clip_ids])
    found = rows >= 0
    aligned[found] = logits[rows[found]]
    return aligned, int(found.sum())


def export_logits(out_dir: Path, logits: np.ndarray, clip_ids: np.ndarray, name: str) -> tuple[Path, Path]:
    """Write `<name>.npy` (float16, as EfficientAT's release) and `fname_to_index.pkl` for these clips."""
    out_dir.mkdir(parents=True, exist_ok=True)
    npy, index = out_dir / f"{name}.npy", out_dir / "fname_to_index.pkl"
    np.save(npy, logits.astype(np.float16))
    with open(index, "wb") as handle:
        pickle.dump({str(clip_id): row for row, clip_id in enumerate(clip_ids)}, handle)
    return npy, index


def coverage_by_split(aligned: np.ndarray, splits: np.ndarray) -> dict[str, tuple[int, int]]:
    """(clips with logits, clips) per split of the store, for imported logits aligned to its rows."""
    covered = np.isfinite(aligned).all(axis=1)
    return {split: (int(covered[splits == split].sum()), int((splits == split).sum()))
            for split in sorted(set(splits.tolist()))}
