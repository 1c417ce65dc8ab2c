"""The GPU-oriented loader and the training schedule pieces."""

import numpy as np
import pytest
import torch

from kdpipe.config import load_config
from kdpipe.classes import ClassList
from kdpipe.config import TrainingConfig
from kdpipe.bench_scale import class_probabilities, draw_labels, expected_frequencies
from kdpipe.loader import (SAMPLING_OFFSET, BatchLoader, batch_loader, class_balanced_weights, class_weights, sequential_batches,
                           weighted_batches)
from kdpipe.runner import Pipeline
from kdpipe.training import Mixup, epoch_plan, lr_multiplier, sampling_weights
from kdpipe.waveform_store import WaveformStore
from kdpipe.stages import build_stages


@pytest.fixture(scope="module")
def store_path(small_demo, tmp_path_factory):
    config = load_config(None, [f"cache_dir={tmp_path_factory.mktemp('cache')}",
                                f"data.sources.0.path={small_demo.manifest}", f"data.class_list={small_demo.class_list}",
                                "data.clip_seconds=1.0", "prepare.workers=1", "prepare.shard_clips=5"])
    return Pipeline(build_stages(config), config).ensure("prepare") / "waveforms.zarr"


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_equal_direct_reads(store_path, workers):
    store = WaveformStore.open(store_path)
    rows = np.random.default_rng(0).permutation(store.rows())
    batches = sequential_batches(rows, 7)
    seen = []
    for waves, batch_rows in batch_loader(store_path, batches, num_workers=workers):
        assert waves.dtype == torch.int16 and list(batch_rows) == sorted(batch_rows.tolist())
        np.testing.assert_array_equal(waves.numpy(), store.read(batch_rows.numpy()))
        seen.extend(batch_rows.tolist())
    assert sorted(seen) == sorted(rows.tolist())


def test_one_loader_serves_every_pass_with_the_same_worker_processes(store_path):
    store = WaveformStore.open(store_path)
    loader = BatchLoader(store_path, num_workers=2)
    rng = np.random.default_rng(1)
    worker_pids = []
    for batch_size in (4, 9, 3):  # each pass its own batches, as epochs and evaluations have
        batches = sequential_batches(rng.permutation(store.rows()), batch_size)
        passed = loader(batches)
        got = [(waves, rows) for waves, rows in passed]
        assert [sorted(b.tolist()) for b in batches] == [rows.tolist() for _, rows in got]
        for waves, rows in got:
            np.testing.assert_array_equal(waves.numpy(), store.read(rows.numpy()))
        worker_pids.append(sorted(worker.pid for worker in passed._iterator._workers))
    assert len(worker_pids[0]) == 2 and worker_pids[0] == worker_pids[1] == worker_pids[2]


def test_class_balanced_weights_follow_efficientat():
    labels = np.array([[1, 0], [1, 0], [1, 1], [0, 1]], dtype=np.uint8)
    expected = [1000 / 103, 1000 / 103, 1000 / 103 + 1000 / 102, 1000 / 102]
    per_class = class_weights(labels, np.arange(4))
    np.testing.assert_allclose(per_class, [1000 / 103, 1000 / 102], rtol=1e-6)
    np.testing.assert_allclose(class_balanced_weights(labels, None, per_class), expected, rtol=1e-6)
    np.testing.assert_allclose(class_balanced_weights(labels, np.array([3, 0]), per_class), expected[::-3], rtol=1e-6)


def test_weighted_draws_of_tiny_weights_do_not_favour_low_rows():
    """Weights of AudioSet's common classes (~0.001): u ** (1 / w) would be 0 for most rows, and ties go to the
    lowest row indexes; log(u) / w keeps the draw uniform among equal weights."""
    rows = np.arange(10_000)
    weights = np.full(len(rows), 1000 / (1_000_000 + 100))  # a Speech-only clip
    drawn = np.concatenate([np.concatenate(weighted_batches(rows, weights, 200, 10, np.random.default_rng(seed)))
                            for seed in range(10)])
    assert abs(drawn.mean() - 5000) < 300  # 2,000 uniform draws: sd of the mean ~65


def test_an_epoch_at_audioset_imbalance_gives_every_class_its_share_and_ignores_row_order():
    """200 k clips drawn by `kdpipe bench scale`'s AudioSet-like recipe, weighted as EfficientAT weighs AudioSet's
    2 M clips (per-class weights 1000 / (count + 100) from the recipe's counts at 2 M: 0.001 for the two head
    classes).

    Shares: 20 epochs of 4,000 draws, 2 % of the clips, where the chance that weighted sampling without
    replacement picks clip i is n w_i / W to first order. Tolerance: each class's count is within 5 standard
    deviations (sqrt of its expected count) plus 3 % of what that predicts.
    Row order: a draw of all but 2,000 clips leaves out clips of the lowest keys, which must lie anywhere in
    the store. Keys u ** (1 / w) underflow to 0 for half of the head-only clips, and the stable sort then
    leaves out the 2,000 highest rows (measured: mean row 177 k, where 100 k is expected)."""
    labels = draw_labels(np.random.default_rng(0), class_probabilities(527), 200_000)
    per_class = (1000.0 / (expected_frequencies(527) * 2_000_000 + SAMPLING_OFFSET)).astype(np.float32)
    weights = class_balanced_weights(labels, None, per_class)
    rows, draws, epochs = np.arange(len(labels)), 4_000, 20
    included = np.minimum(1.0, draws * weights / weights.sum())  # first-order inclusion probabilities
    expected = epochs * (included @ labels.astype(np.float64))
    counts = np.zeros(labels.shape[1])
    for epoch in range(epochs):
        drawn = np.concatenate(weighted_batches(rows, weights, draws, 100, np.random.default_rng([7, epoch])))
        assert len(np.unique(drawn)) == draws
        counts += labels[drawn].sum(axis=0)
    deviation = np.abs(counts - expected)
    assert (deviation <= 5 * np.sqrt(expected) + 0.03 * expected).all(), np.argmax(deviation / np.sqrt(expected))
    kept = np.concatenate(weighted_batches(rows, weights, len(rows) - 2_000, 1_000, np.random.default_rng(1),
                                           drop_last=False))
    left_out = np.setdiff1d(rows, kept)
    assert len(left_out) == 2_000
    assert abs(left_out.mean() - rows.mean()) < 4 * rows.std() / np.sqrt(len(left_out))  # 4 sd: 5.2 k rows


def _audioset_like_store(path, n_labelled=16_000, n_unlabelled=4_000, n_classes=527, seed=0):
    """A store (labels only, no audio) with AudioSet's shape of imbalance: 527 classes whose frequencies fall as a
    power law (the first ~280 times as common as the last), 1-3 classes a clip; the unlabelled clips drawn from
    the same distribution. Returns the store, its rows, and each clip's true classes."""
    rng = np.random.default_rng(seed)
    n = n_labelled + n_unlabelled
    frequency = 1.0 / np.arange(1, n_classes + 1) ** 0.9
    truth = np.zeros((n, n_classes), dtype=np.uint8)
    for row in range(n):
        truth[row, rng.choice(n_classes, size=rng.integers(1, 4), replace=False, p=frequency / frequency.sum())] = 1
    labelled = np.arange(n) < n_labelled
    names = tuple(f"c{i}" for i in range(n_classes))
    store = WaveformStore.create(path, clip_ids=[f"clip{i}" for i in range(n)], splits=["train"] * n,
                                 labels=truth * labelled[:, None], labelled=labelled, classes=ClassList(names, names),
                                 sample_rate=16000, clip_samples=16, shard_clips=4096)
    return store, np.arange(n), truth


def test_unlabelled_clips_take_their_share_of_an_epoch_and_leave_the_labelled_balance_alone(tmp_path):
    """20 % of the clips are unlabelled, distributed like the labelled ones; the teachers hear each one's classes
    at 0.9 and every other class at 0.01 (AudioSet's tail of small probabilities)."""
    store, rows, truth = _audioset_like_store(tmp_path / "store.zarr")
    unlabelled = ~store.labelled()
    probabilities = np.where(truth > 0, 0.9, 0.01).astype(np.float32)
    heard = lambda picked: probabilities[picked] >= 0.5  # noqa: E731 - confident_classes on these probabilities
    weights = sampling_weights(store, rows, True, heard)
    alone = sampling_weights(store, rows[~unlabelled], True)
    np.testing.assert_array_equal(weights[~unlabelled], alone)  # the labelled clips' balance is unchanged
    settings = TrainingConfig(epoch_samples=2000, batch_size=50)
    drawn = np.concatenate([np.concatenate(epoch_plan(store, rows, settings, 0, heard)(epoch)) for epoch in range(5)])
    assert len(drawn) == 5 * 2000  # an epoch stays epoch_samples draws: unlabelled clips take, not add
    share = unlabelled[drawn].mean()
    assert abs(share - 0.2) < 0.03, share  # tracks their share of the data (0.2) within 0.03
    # what the soft probabilities did instead: every small probability times a rare class's weight
    per_class = class_weights(store.column("labels"), rows[~unlabelled])
    soft = class_balanced_weights(probabilities[unlabelled], None, per_class)
    assert soft.sum() / (soft.sum() + weights[~unlabelled].sum()) > 0.5  # measured: 0.58 of the draws
    everyone = TrainingConfig(epoch_samples=0, batch_size=50)
    assert sum(map(len, epoch_plan(store, rows, everyone, 0, heard)(0))) == len(rows)  # epoch_samples 0: one each


def test_weighted_batches_are_distinct_and_follow_weights():
    rows = np.arange(1000)
    weights = np.where(rows < 100, 10.0, 1.0)
    counts = np.zeros(1000)
    for seed in range(200):
        batches = weighted_batches(rows, weights, 100, 10, np.random.default_rng(seed))
        drawn = np.concatenate(batches)
        assert len(drawn) == 100 and len(np.unique(drawn)) == 100
        counts[drawn] += 1
    heavy, light = counts[:100].mean(), counts[100:].mean()
    assert heavy / light > 5  # without replacement the ratio is below 10, but far above 1
    zero = weighted_batches(rows, np.where(rows < 5, 1.0, 0.0), 50, 4, np.random.default_rng(0), drop_last=False)
    assert sorted(np.concatenate(zero).tolist()) == [0, 1, 2, 3, 4]


def test_lr_schedule_matches_efficientat_values():
    schedule = [lr_multiplier(e, 8, 80, 95, 0.01) for e in range(200)]
    assert schedule[0] == pytest.approx(np.exp(-5 * (1 - 0.5 / 8) ** 2))
    assert schedule[4] == pytest.approx(0.2865, abs=1e-3) and schedule[7] == pytest.approx(0.9251, abs=1e-3)
    assert schedule[8:81] == [1.0] * 73
    assert schedule[175] == pytest.approx(0.01) and schedule[199] == pytest.approx(0.01)
    assert schedule[127] == pytest.approx(1 - 47 / 95 * 0.99)


def test_mixup_keeps_the_original_dominant_and_mixes_targets_alike():
    mixup = Mixup.draw(64, 0.3, np.random.default_rng(0), torch.device("cpu"))
    assert (mixup.lam >= 0.5).all() and sorted(mixup.perm.tolist()) == list(range(64))
    x = torch.randn(64, 1, 8, 10)
    y = torch.rand(64, 5)
    mixed = mixup.mix(x)
    i = 3
    lam = mixup.lam[i]
    torch.testing.assert_close(mixed[i], lam * x[i] + (1 - lam) * x[mixup.perm[i]])
    torch.testing.assert_close(mixup.mix(y)[i], lam * y[i] + (1 - lam) * y[mixup.perm[i]])
