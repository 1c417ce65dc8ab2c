"""Waveform-domain views (kdpipe.views): reproducible parameters, exact application, independent checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdpipe.views import CLEAN, ViewAugment, apply_views, view_params

RATE = 16000
N = 16000  # one second: tiny tensors, and a length where torch's batched and per-thread FFTs differ
SEED = 20240101
# Every part on, scaled to one-second clips; the low-pass on every view so the FFT path always runs.
ALL_ON = ViewAugment(shift_s=0.2, roll=True, gain_db=6.0, time_masks=2, time_mask_s=0.05,
                     lowpass_p=1.0, lowpass_hz=(500.0, 3000.0))
OFF = ViewAugment(shift_s=0.0, gain_db=0.0, time_masks=0, time_mask_s=0.0, lowpass_p=0.0)


def clips(batch: int, seed: int = 0) -> torch.Tensor:
    """Noise plus tones in [-1, 1], no exact zeros (so zeroed spans are visible)."""
    rng = np.random.default_rng(seed)
    t = np.arange(N) / RATE
    x = 0.3 * rng.uniform(0.05, 1.0, (batch, N)) * rng.choice([-1, 1], (batch, N))
    x += 0.3 * np.sin(2 * np.pi * 250 * t) + 0.2 * np.sin(2 * np.pi * 3500 * t)
    return torch.from_numpy(x.astype(np.float32))


def as_lists(params) -> dict:
    return {name: getattr(params, name).tolist()
            for name in ("rows", "views", "shift", "gain_db", "cutoff_hz", "mask_start", "mask_length")}


def per_view(params) -> dict:
    """(row, view) -> that view's parameters, to compare batches given in different orders."""
    fields = as_lists(params)
    return {(r, v): tuple(json.dumps(fields[name][i]) for name in fields)
            for i, (r, v) in enumerate(zip(fields["rows"], fields["views"]))}


# ---- parameters -------------------------------------------------------------------------------

def test_parameters_identical_in_another_process():
    rows, views = [0, 7, 123456, 2 ** 32 - 1], [0, 39, 5, CLEAN]
    here = as_lists(view_params(rows, views, SEED, ALL_ON, RATE, N))
    code = ("import json; from kdpipe.views import ViewAugment, view_params; "
            f"a = ViewAugment(shift_s=0.2, gain_db=6.0, time_masks=2, time_mask_s=0.05, lowpass_p=1.0, "
            f"lowpass_hz=(500.0, 3000.0)); p = view_params({rows}, {views}, {SEED}, a, {RATE}, {N}); "
            "print(json.dumps({k: getattr(p, k).tolist() for k in "
            "('rows', 'views', 'shift', 'gain_db', 'cutoff_hz', 'mask_start', 'mask_length')}))")
    there = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                      text=True).stdout)
    assert there == here


def test_parameters_independent_of_order_and_batch():
    rows = np.array([3, 1, 7, 3, 9])
    views = np.array([0, 2, 5, 1, 0])
    batch = per_view(view_params(rows, views, SEED, ALL_ON, RATE, N))
    reordered = per_view(view_params(rows[::-1], views[::-1], SEED, ALL_ON, RATE, N))
    alone = {}
    for r, v in zip(rows, views):
        alone.update(per_view(view_params([r], [v], SEED, ALL_ON, RATE, N)))
    assert batch == reordered == alone


def test_parameters_depend_on_seed_row_and_view():
    base = view_params([4], [2], SEED, ALL_ON, RATE, N)
    for other in (view_params([4], [2], SEED + 1, ALL_ON, RATE, N), view_params([5], [2], SEED, ALL_ON, RATE, N),
                  view_params([4], [3], SEED, ALL_ON, RATE, N)):
        assert (other.shift[0], other.gain_db[0]) != (base.shift[0], base.gain_db[0])


def test_documented_definition_pinned():
    """The parameters are a stored contract (teachers' targets depend on them): pin the definition and values."""
    p = view_params([5] * 3, [0, 1, 3], 1234, ViewAugment(), 16000, 160000)
    assert p.shift.tolist() == [20173, -51095, -37993]
    np.testing.assert_array_equal(p.gain_db, [0.9054768107476265, 2.4882323453459967, 4.979900431822774])
    np.testing.assert_array_equal(p.cutoff_hz, [2059.8620671822764, np.inf, np.inf])
    assert p.mask_start.tolist() == [[122335], [122426], [65227]]
    assert p.mask_length.tolist() == [[12556], [9196], [28090]]
    # the module docstring's recipe, recomputed by hand for view 3
    words = np.random.Philox(key=np.array([1234, (5 << 32) | 3], dtype=np.uint64)).random_raw(6)
    u = [int(w >> 11) * 2.0 ** -53 for w in words]
    m = 5 * 16000
    assert int(np.floor(u[0] * (2 * m + 1))) - m == p.shift[2]
    assert (2 * u[1] - 1) * 6.0 == p.gain_db[2]
    assert not u[2] < 0.5
    length = int(np.floor(u[4] * (round(1.92 * 16000) + 1)))
    assert (length, int(np.floor(u[5] * (160000 - length + 1)))) == (p.mask_length[2, 0], p.mask_start[2, 0])


def test_switching_one_part_off_keeps_the_others():
    rows, views = np.arange(6), np.arange(6)
    full = view_params(rows, views, SEED, ALL_ON, RATE, N)
    no_gain = view_params(rows, views, SEED, ViewAugment(**{**ALL_ON.__dict__, "gain_db": 0.0}), RATE, N)
    more_masks = view_params(rows, views, SEED, ViewAugment(**{**ALL_ON.__dict__, "time_masks": 3}), RATE, N)
    assert (no_gain.gain_db == 0).all()
    for other in (no_gain, more_masks):
        np.testing.assert_array_equal(other.shift, full.shift)
        np.testing.assert_array_equal(other.cutoff_hz, full.cutoff_hz)
        np.testing.assert_array_equal(other.mask_length[:, :2], full.mask_length)
        np.testing.assert_array_equal(other.mask_start[:, :2], full.mask_start)


def test_parameters_within_bounds():
    augment = ViewAugment(shift_s=0.1, gain_db=9.0, time_masks=2, time_mask_s=0.2, lowpass_p=0.3,
                          lowpass_hz=(1000.0, 2000.0))
    p = view_params(np.arange(400), np.arange(400) % 40, SEED, augment, RATE, N)
    assert np.abs(p.shift).max() <= round(0.1 * RATE) and len(np.unique(p.shift)) > 300
    assert np.abs(p.gain_db).max() <= 9.0
    limited = np.isfinite(p.cutoff_hz)
    assert 0.2 < limited.mean() < 0.4
    assert ((p.cutoff_hz[limited] >= 1000.0) & (p.cutoff_hz[limited] <= 2000.0)).all()
    assert p.mask_length.min() >= 0 and p.mask_length.max() <= round(0.2 * RATE)
    assert p.mask_start.min() >= 0 and (p.mask_start + p.mask_length).max() <= N


def test_clean_views_draw_nothing():
    p = view_params([1, 2], CLEAN, SEED, ALL_ON, RATE, N)
    assert (p.shift == 0).all() and (p.gain == 1.0).all() and (p.mask_length == 0).all()
    assert np.isinf(p.cutoff_hz).all() and (p.kept_bins == N // 2 + 1).all()


@pytest.mark.parametrize("bad", [dict(rows=[-1], views=[0]), dict(rows=[0], views=[-2]),
                                 dict(rows=[2 ** 32], views=[0])])
def test_parameters_reject_out_of_range(bad):
    with pytest.raises(ValueError):
        view_params(bad["rows"], bad["views"], SEED, ALL_ON, RATE, N)


def test_settings_validated():
    for bad in (dict(gain_db=-1.0), dict(lowpass_p=1.5), dict(lowpass_hz=(3000.0, 1000.0)), dict(time_masks=-1)):
        with pytest.raises(ValueError):
            ViewAugment(**bad)


# ---- application ------------------------------------------------------------------------------

def test_view_alone_equals_view_in_a_batch():
    waves = clips(5)
    rows, views = np.array([10, 11, 12, 13, 14]), np.array([0, 3, CLEAN, 7, 1])
    batch = apply_views(waves, view_params(rows, views, SEED, ALL_ON, RATE, N))
    for i in range(5):
        alone = apply_views(waves[i:i + 1].clone(), view_params(rows[i:i + 1], views[i:i + 1], SEED, ALL_ON,
                                                                 RATE, N))
        assert torch.equal(alone[0], batch[i])
    # the same clip among other clips, at another position
    other = clips(3, seed=1)
    mixed = torch.stack([other[0], waves[3], other[1]])
    again = apply_views(mixed, view_params([99, 13, 98], [2, 7, 2], SEED, ALL_ON, RATE, N))
    assert torch.equal(again[1], batch[3])
    assert torch.equal(apply_views(waves, view_params(rows, views, SEED, ALL_ON, RATE, N)), batch)


def test_output_float32_and_input_untouched():
    waves = clips(3)
    before = waves.clone()
    out = apply_views(waves, view_params([0, 1, 2], 0, SEED, ALL_ON, RATE, N))
    assert out.dtype == torch.float32 and out.shape == waves.shape
    assert torch.equal(waves, before) and not torch.equal(out, waves)


def test_clean_sentinel_returns_the_input():
    waves = clips(4)
    out = apply_views(waves, view_params([0, 1, 2, 3], [CLEAN, 4, CLEAN, 5], SEED, ALL_ON, RATE, N))
    assert torch.equal(out[0], waves[0]) and torch.equal(out[2], waves[2])
    assert not torch.equal(out[1], waves[1])


def test_everything_off_is_the_identity():
    waves = clips(3)
    assert torch.equal(apply_views(waves, view_params([0, 1, 2], [0, 1, 2], SEED, OFF, RATE, N)), waves)


def only(**settings) -> ViewAugment:
    return ViewAugment(**{**OFF.__dict__, **settings})


def test_roll_matches_numpy_and_keeps_the_samples():
    waves = clips(4)
    p = view_params([0, 1, 2, 3], 0, SEED, only(shift_s=0.3), RATE, N)
    assert (p.shift != 0).all()
    out = apply_views(waves, p).numpy()
    for i in range(4):
        np.testing.assert_array_equal(out[i], np.roll(waves[i].numpy(), p.shift[i]))
        np.testing.assert_array_equal(np.sort(out[i]), np.sort(waves[i].numpy()))


def test_shift_with_zero_fill_matches_numpy():
    waves = clips(4)
    p = view_params([0, 1, 2, 3], 0, SEED, only(shift_s=0.3, roll=False), RATE, N)
    out = apply_views(waves, p).numpy()
    for i, s in enumerate(p.shift):
        expected = np.zeros(N, dtype=np.float32)
        x = waves[i].numpy()
        if s >= 0:
            expected[s:] = x[:N - s]
        else:
            expected[:N + s] = x[-s:]
        np.testing.assert_array_equal(out[i], expected)


def test_gain_matches_decibels_computed_in_numpy():
    waves = clips(4)
    p = view_params([0, 1, 2, 3], 2, SEED, only(gain_db=12.0), RATE, N)
    assert np.abs(p.gain_db).max() <= 12.0 and (p.gain_db != 0).all()
    out = apply_views(waves, p).numpy()
    for i in range(4):
        factor = np.float32(10.0 ** (p.gain_db[i] / 20.0))
        np.testing.assert_array_equal(out[i], waves[i].numpy() * factor)


def test_masked_spans_are_zero_and_within_bounds():
    waves = clips(6)
    p = view_params(np.arange(6), 1, SEED, only(time_masks=3, time_mask_s=0.1), RATE, N)
    out = apply_views(waves, p).numpy()
    longest = round(0.1 * RATE)
    assert p.mask_length.max() <= longest and (p.mask_length > 0).any()
    for i in range(6):
        zeroed = np.zeros(N, dtype=bool)
        for start, length in zip(p.mask_start[i], p.mask_length[i]):
            assert 0 <= start and start + length <= N
            zeroed[start:start + length] = True
        assert (out[i][zeroed] == 0).all()
        np.testing.assert_array_equal(out[i][~zeroed], waves[i].numpy()[~zeroed])


def test_band_limiting_removes_energy_above_the_cutoff():
    waves = clips(4)
    p = view_params(np.arange(4), 0, SEED, only(lowpass_p=1.0, lowpass_hz=(1000.0, 3000.0)), RATE, N)
    out = apply_views(waves, p).numpy().astype(np.float64)
    freqs = np.fft.rfftfreq(N, 1 / RATE)
    for i in range(4):
        cutoff = p.cutoff_hz[i]
        assert 1000.0 <= cutoff <= 3000.0
        before = np.abs(np.fft.rfft(waves[i].numpy().astype(np.float64))) ** 2
        after = np.abs(np.fft.rfft(out[i])) ** 2
        assert after[freqs >= cutoff].sum() < 1e-9 * after.sum()
        assert before[freqs >= cutoff].sum() > 0.2 * before.sum()  # there was energy to remove
        well_below = freqs < 0.9 * cutoff
        np.testing.assert_allclose(after[well_below], before[well_below], rtol=1e-3, atol=1e-6 * before.max())


def test_band_limiting_does_not_depend_on_torch_threads():
    """torch's CPU FFT changes its last bits with the thread count; the views must not."""
    waves = clips(3)
    p = view_params(np.arange(3), 0, SEED, ALL_ON, RATE, N)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = apply_views(waves, p)
        torch.set_num_threads(2)
        two = apply_views(waves, p)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_cutoff_above_nyquist_leaves_the_clip_alone():
    waves = clips(2)
    p = view_params([0, 1], 0, SEED, only(lowpass_p=1.0, lowpass_hz=(9000.0, 10000.0)), RATE, N)
    assert (p.kept_bins == N // 2 + 1).all()
    assert torch.equal(apply_views(waves, p), waves)


def test_apply_rejects_mismatched_input():
    p = view_params([0, 1], 0, SEED, ALL_ON, RATE, N)
    with pytest.raises(ValueError, match="float32"):
        apply_views(clips(2).double(), p)
    with pytest.raises(ValueError, match="shape"):
        apply_views(clips(3), p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_independent_and_close_to_cpu():
    waves = clips(5)
    rows, views = np.arange(5), np.array([0, 3, CLEAN, 7, 1])
    p = view_params(rows, views, SEED, ALL_ON, RATE, N)
    on_gpu = apply_views(waves.cuda(), p)
    for i in range(5):
        alone = apply_views(waves[i:i + 1].cuda(), view_params(rows[i:i + 1], views[i:i + 1], SEED, ALL_ON,
                                                                RATE, N))
        assert torch.equal(alone[0], on_gpu[i])
    torch.testing.assert_close(on_gpu.cpu(), apply_views(waves, p), rtol=0, atol=1e-5)
