"""The GPU-oriented loader and the training schedule pieces."""

import numpy as np
import pytest
import torch

from kdpipe.config import load_config
from kdpipe.loader import BatchLoader, batch_loader, class_balanced_weights, sequential_batches, weighted_batches
from kdpipe.runner import Pipeline
from kdpipe.training import Mixup, lr_multiplier
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
    np.testing.assert_allclose(class_balanced_weights(labels), expected)


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
