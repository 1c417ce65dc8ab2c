"""Which clips train, which choose checkpoints, and that the evaluation split is neither."""

import numpy as np
import pytest

from kdpipe.classes import ClassList
from kdpipe.config import load_config
from kdpipe.errors import ConfigError
from kdpipe.splits import evaluation_rows, held_out, require_validation, training_splits
from kdpipe.waveform_store import WaveformStore


def _store(path, splits, labelled=None, failed=()):
    """A store of len(splits) decoded clips (one class each, no audio), `failed` rows not decoded."""
    n = len(splits)
    labelled = np.ones(n, bool) if labelled is None else np.asarray(labelled)
    labels = np.zeros((n, 2), np.uint8)
    labels[np.arange(n), np.arange(n) % 2] = labelled
    store = WaveformStore.create(path, clip_ids=[f"clip{i}" for i in range(n)], splits=splits, labels=labels,
                                 labelled=labelled, classes=ClassList(("a", "b"), ("a", "b")), sample_rate=16000,
                                 clip_samples=4, shard_clips=n)
    status = ["broken" if row in failed else "ok" for row in range(n)]
    store.write_shard(0, np.zeros((n, 4), np.int16), status, [""] * n)
    store.mark_done(0)
    return WaveformStore.open(path)


def test_the_manifest_s_own_validation_split_is_used_and_never_trained_on(tmp_path):
    store = _store(tmp_path / "s.zarr", ["train"] * 6 + ["val"] * 3 + ["eval"] * 3,
                   labelled=[1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1], failed=(2,))
    rows = training_splits(store, 0.0, "train-teacher/x")
    assert rows.train.tolist() == [0, 1, 3, 5]  # decoded, labelled train clips
    assert rows.validation.tolist() == [6, 8]  # the unlabelled val clip has nothing to be scored against
    assert rows.validation_name == "split 'val' (2 clips)"
    assert training_splits(store, 0.0, "train-student", unlabelled=True).train.tolist() == [0, 1, 3, 4, 5]
    assert evaluation_rows(store, "eval").tolist() == [9, 10, 11]
    with pytest.raises(ConfigError, match="data.validation_fraction: the data has its own 'val' split"):
        training_splits(store, 0.1, "train-teacher/x")


def test_a_held_out_fraction_is_chosen_by_clip_id_whatever_the_order(tmp_path):
    ids = np.array([f"YT{i:07d}" for i in range(20_000)])
    chosen = held_out(ids, 0.1)
    assert abs(chosen.mean() - 0.1) < 0.006  # 2,000 expected, sd ~42
    order = np.random.default_rng(0).permutation(len(ids))
    assert set(ids[order][held_out(ids[order], 0.1)]) == set(ids[chosen])  # a property of the id, not the row
    assert not held_out(ids, 0.0).any() and (chosen <= held_out(ids, 0.2)).all()  # growing it only adds clips
    store = _store(tmp_path / "s.zarr", ["train"] * 40 + ["eval"] * 10)
    rows = training_splits(store, 0.25, "train-student")
    assert set(rows.train.tolist()).isdisjoint(rows.validation.tolist())
    assert sorted([*rows.train.tolist(), *rows.validation.tolist()]) == list(range(40))
    expected = np.flatnonzero(held_out(np.array([f"clip{i}" for i in range(40)]), 0.25))
    assert rows.validation.tolist() == expected.tolist() and len(expected) > 0
    assert rows.validation_name == f"25% of the train clips, held out by clip id ({len(expected)} clips)"


def test_keep_best_without_a_validation_split_is_a_config_error(tmp_path):
    store = _store(tmp_path / "s.zarr", ["train"] * 4 + ["eval"] * 2)
    rows = training_splits(store, 0.0, "train-student")
    assert len(rows.validation) == 0 and rows.validation_name == ""
    require_validation(rows, "last", "student.keep")
    with pytest.raises(ConfigError, match="student.keep: 'best' chooses the epoch with the best validation mAP"):
        require_validation(rows, "best", "student.keep")
    both = _store(tmp_path / "b.zarr", ["train"] * 4 + ["val", "validation"])
    with pytest.raises(ConfigError, match="both a 'validation' and a 'val' split"):
        training_splits(both, 0.0, "train-student")


@pytest.mark.parametrize("split", ["train", "val", "validation"])
def test_the_evaluation_split_cannot_be_one_training_reads(split):
    with pytest.raises(ConfigError, match=f"evaluation.split: '{split}' is a split training reads"):
        load_config(None, [f"evaluation.split={split}"])
