"""Which clips a trained stage learns from and which it chooses checkpoints on; never the evaluation split.

A trained stage (train-teacher, train-student, its no-KD baseline) reads two sets of store rows:

- **train**: the decoded clips of split `train`, less those held out for validation;
- **validation**: the manifest's own `validation` or `val` split when it has one; otherwise, with
  `data.validation_fraction` > 0, that share of the train clips, chosen by a hash of the clip id
  (the same clips in every run and on every machine, whatever the order of the manifest, and a
  clip keeps its side when others are added). The held-out clips are never trained on: that is
  the cost, a fraction of the training data. Without either there is no validation split: a
  stage keeps its last epoch and measures nothing per epoch.

`evaluation.split` is not read here, nor anywhere in training: the config refuses to score on
`train`, `val` or `validation`, so no number evaluate reports was chosen on the clips it scores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kdpipe.config import VALIDATION_SPLITS
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.waveform_store import WaveformStore


@dataclass(frozen=True)
class TrainingSplits:
    train: np.ndarray
    """Store rows to draw training batches from."""
    validation: np.ndarray
    """Labelled store rows to measure each epoch on (empty: no validation split)."""
    validation_name: str
    """How the validation clips were chosen, for logs and reports ("" without)."""


def held_out(clip_ids: np.ndarray, fraction: float) -> np.ndarray:
    """(N,) bool: the clips whose id hashes into the first `fraction` of [0, 1) (blake2b, 64 bits)."""
    if fraction <= 0:
        return np.zeros(len(clip_ids), dtype=bool)
    limit = int(fraction * 2**64)
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(clip_id).encode(), digest_size=8).digest(), "little")
                        < limit for clip_id in clip_ids), dtype=bool, count=len(clip_ids))


def folds_of(clip_ids: np.ndarray, folds: int) -> np.ndarray:
    """(N,) int: each clip's cross-fitting fold in [0, folds), by a blake2b hash of its id (salted apart from
    `held_out`'s, so folds and the validation hold-out are independent)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(clip_id).encode(), digest_size=8, salt=b"fold").digest(),
                                       "little") % folds for clip_id in clip_ids), dtype=np.int64, count=len(clip_ids))


def training_splits(store: WaveformStore, validation_fraction: float, stage: str, unlabelled: bool = False
                    ) -> TrainingSplits:
    """The train and validation rows of a trained stage (module docstring).

    Unlabelled train clips are left out unless `unlabelled` (they teach through teacher targets
    only); validation keeps labelled clips only (an unlabelled clip has nothing to score against).
    """
    decoded = store.rows()
    split = store.column("split")[decoded]
    labelled = store.labelled()[decoded]
    named = [name for name in VALIDATION_SPLITS if (split == name).any()]
    if len(named) > 1:
        raise ConfigError(f"the data has both a 'validation' and a 'val' split; {stage} would not know which to "
                          "choose checkpoints on: name one of them otherwise")
    train = split == "train"
    if named:
        if validation_fraction > 0:
            raise ConfigError(f"data.validation_fraction: the data has its own '{named[0]}' split "
                              f"({int((split == named[0]).sum())} clips); set it to 0, or rename that split")
        validation, name = split == named[0], f"split '{named[0]}'"
    else:
        validation = train & held_out(store.column("clip_id")[decoded], validation_fraction)
        name = f"{validation_fraction:.0%} of the train clips, held out by clip id" if validation_fraction else ""
        train &= ~validation
    if not unlabelled:
        train &= labelled
    validation &= labelled
    if not train.any():
        raise KdpipeError(f"{stage} needs decoded, labelled clips in the 'train' split; the store has none"
                          + (" left after holding out the validation clips" if validation_fraction else ""))
    if name and not validation.any():
        raise KdpipeError(f"{stage}: the validation split ({name}) has no decoded, labelled clips")
    return TrainingSplits(decoded[train], decoded[validation], f"{name} ({int(validation.sum())} clips)"
                          if name else "")


def require_validation(splits: TrainingSplits, keep: str, key: str) -> None:
    """`keep: best` chooses an epoch on the validation split, so it needs one (exit 2 naming the key)."""
    if keep == "best" and not len(splits.validation):
        raise ConfigError(f"{key}: 'best' chooses the epoch with the best validation mAP, and this data has no "
                          f"validation split: add a 'validation' or 'val' split to the manifest, set "
                          f"data.validation_fraction (e.g. 0.1), or keep 'last'")


def evaluation_rows(store: WaveformStore, split: str) -> np.ndarray:
    """The decoded, labelled clips of the evaluation split: what evaluate (and compare) score, and nothing else."""
    rows = store.rows(split)
    rows = rows[store.labelled()[rows]]
    if len(rows) == 0:
        raise KdpipeError(f"evaluation.split: the store has no decoded, labelled clips in split '{split}'")
    return rows
