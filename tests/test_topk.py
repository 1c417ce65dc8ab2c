"""Top-k storage of view logits (kdpipe.topk): round trips, fill rules, ties, absent rows, storage figures."""

from __future__ import annotations

import numpy as np
import pytest

from kdpipe.topk import ABSENT_LOGIT, Storage, expand_topk, keep_topk, storage_per_clip

C = 50
K = 7


@pytest.fixture
def logits() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((6, C)) * 4).astype(np.float32)


def reference_topk(row: np.ndarray, k: int) -> list[int]:
    """The k largest of one row, largest first, lower class index first among equals (plain Python)."""
    return sorted(range(len(row)), key=lambda c: (-float(row[c]), c))[:k]


def not_kept(indexes: np.ndarray) -> np.ndarray:
    mask = np.ones(indexes.shape[:-1] + (C,), dtype=bool)
    np.put_along_axis(mask, indexes.astype(np.intp), False, axis=-1)
    return mask


def test_keeps_the_largest_in_order(logits):
    values, indexes = keep_topk(logits, K)
    assert values.dtype == np.float16 and indexes.dtype == np.int16 and values.shape == (6, K)
    for row, got in zip(logits, indexes):
        assert got.tolist() == reference_topk(row, K)
    assert (np.diff(values.astype(np.float32), axis=-1) <= 0).all()


def test_round_trip_exact_on_kept_classes_at_float32(logits):
    values, indexes = keep_topk(logits, K, dtype=np.float32)
    dense = expand_topk(values, indexes, C)
    kept = ~not_kept(indexes)
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense[kept], logits[kept])


def test_round_trip_at_float16_within_its_rounding(logits):
    values, indexes = keep_topk(logits, K)
    dense = expand_topk(values, indexes, C)
    kept = ~not_kept(indexes)
    np.testing.assert_array_equal(dense[kept], logits[kept].astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(dense[kept], logits[kept], rtol=2.0 ** -11)


def test_zero_fill_is_probability_about_zero(logits):
    values, indexes = keep_topk(logits, K)
    dense = expand_topk(values, indexes, C)  # the default rule
    rest = not_kept(indexes)
    assert 1.0 / (1.0 + np.exp(-ABSENT_LOGIT)) == pytest.approx(1e-7)
    for row, mask, vals in zip(dense, rest, values):
        expected = np.float32(min(ABSENT_LOGIT, float(vals.astype(np.float32).min())))
        assert (row[mask] == expected).all()


@pytest.mark.parametrize("fill", ["zero", "last_mean", "min"])
def test_the_fill_follows_the_temperature(logits, fill):
    """At T = 4 the kept classes are tempered and the rest get the fill rule of the tempered values: `zero` stays
    ~1e-7 (tempering a filled logit would make it sigmoid(-16.1 / 4), 1.8 %)."""
    values, indexes = keep_topk(logits, K, dtype=np.float32)
    tempered = expand_topk(values, indexes, C, fill, temperature=4.0)
    np.testing.assert_array_equal(tempered, expand_topk(values / np.float32(4.0), indexes, C, fill))
    kept = ~not_kept(indexes)
    np.testing.assert_allclose(tempered[kept], logits[kept] / 4.0, rtol=1e-6)
    if fill == "zero":
        probabilities = 1.0 / (1.0 + np.exp(-tempered[~kept].astype(np.float64)))
        assert probabilities.max() <= 1.01e-7


def test_zero_fill_never_outranks_a_kept_class():
    row = np.full(C, -40.0, dtype=np.float32)
    row[:K] = np.linspace(-20.0, -30.0, K)  # every kept logit below ABSENT_LOGIT
    values, indexes = keep_topk(row, K, dtype=np.float32)
    dense = expand_topk(values, indexes, C)
    assert (dense[K:] == np.float32(-30.0)).all()


def test_last_mean_spreads_the_smallest_kept_probability(logits):
    values, indexes = keep_topk(logits, K)
    dense = expand_topk(values, indexes, C, fill="last_mean")
    rest = not_kept(indexes)
    for row, mask, vals in zip(dense, rest, values):
        smallest = float(vals.astype(np.float64).min())
        expected = 1.0 / (1.0 + np.exp(-smallest)) / (C - K)
        probabilities = 1.0 / (1.0 + np.exp(-row[mask].astype(np.float64)))
        np.testing.assert_allclose(probabilities, expected, rtol=1e-6)


def test_last_mean_stays_finite_for_extreme_logits():
    row = np.full(C, -60000.0, dtype=np.float32)
    row[:K] = 60000.0
    for k in (K, C - 1):
        values, indexes = keep_topk(row, k)
        assert np.isfinite(expand_topk(values, indexes, C, fill="last_mean")).all()


def test_min_fill_is_the_smallest_kept(logits):
    values, indexes = keep_topk(logits, K)
    dense = expand_topk(values, indexes, C, fill="min")
    for row, mask, vals in zip(dense, not_kept(indexes), values):
        assert (row[mask] == vals.astype(np.float32).min()).all()


def test_ties_kept_lowest_index_first():
    row = np.array([1.0, 3.0, 3.0, 0.0, 3.0, 3.0, 2.0], dtype=np.float32)
    values, indexes = keep_topk(row, 3)
    assert indexes.tolist() == [1, 2, 4]
    assert keep_topk(np.zeros((2, 9), np.float32), 4)[1].tolist() == [[0, 1, 2, 3]] * 2
    again = keep_topk(row[None].repeat(5, axis=0), 3)[1]
    assert (again == indexes).all()


@pytest.mark.parametrize("fill", ["zero", "last_mean", "min"])
def test_k_equal_classes_is_lossless(logits, fill):
    values, indexes = keep_topk(logits, C, dtype=np.float32)
    np.testing.assert_array_equal(expand_topk(values, indexes, C, fill=fill), logits)


def test_leading_dimensions(logits):
    views = logits.reshape(2, 3, C)  # (clips, views, classes)
    values, indexes = keep_topk(views, K)
    assert values.shape == indexes.shape == (2, 3, K)
    np.testing.assert_array_equal(expand_topk(values, indexes, C),
                                  expand_topk(*keep_topk(logits, K), C).reshape(2, 3, C))


def test_absent_rows_stay_absent(logits):
    logits = logits.copy()
    logits[2, 5] = np.nan  # a row never written
    values, indexes = keep_topk(logits, K)
    assert np.isnan(values[2]).all() and (indexes[2] == -1).all()
    dense = expand_topk(values, indexes, C)
    assert np.isnan(dense[2]).all()
    others = np.delete(np.arange(6), 2)
    np.testing.assert_array_equal(dense[others], expand_topk(*keep_topk(logits[others], K), C))


def test_errors():
    row = np.zeros((1, C), np.float32)
    with pytest.raises(ValueError):
        keep_topk(row, 0)
    with pytest.raises(ValueError):
        keep_topk(row, C + 1)
    with pytest.raises(ValueError, match="int16"):
        keep_topk(np.zeros((1, 40000), np.float32), 3)
    with pytest.raises(ValueError, match="fit"):
        keep_topk(np.full((1, C), 1e6, np.float32), 3)  # beyond float16
    with pytest.raises(ValueError, match="float16 or float32"):
        keep_topk(row, 3, dtype=np.float64)
    values, indexes = keep_topk(row, 3)
    with pytest.raises(ValueError, match="indexes"):
        expand_topk(values, indexes + C, C)
    with pytest.raises(ValueError, match="fill"):
        expand_topk(values, indexes, C, fill="half")


def test_storage_by_hand():
    # AudioSet: 40 views of 527 classes; float16 values, int16 indexes
    assert storage_per_clip(40, 527, 20) == Storage(full=40 * 527 * 2, topk=40 * 20 * (2 + 2))
    assert storage_per_clip(40, 527, 20) == (42_160, 3_200)
    assert storage_per_clip(40, 527, 20, np.float32) == (84_320, 4_800)
    assert storage_per_clip(1, 10, 10, "float32").full == 40


def test_the_partial_sort_keeps_what_a_full_stable_sort_keeps():
    """Many ties (values rounded to a coarse grid), rows wholly tied and an absent row, over more rows than one
    block: the indexes equal a full stable argsort's first k, independently computed."""
    rng = np.random.default_rng(3)
    logits = np.round(rng.normal(size=(3, 7000, 50)), 1).astype(np.float32)
    logits[0, 11] = 2.0
    logits[1, 5, 7] = np.nan
    values, indexes = keep_topk(logits, 6, np.float32)
    expected = np.argsort(-logits, axis=-1, kind="stable")[..., :6]
    expected[1, 5] = -1
    np.testing.assert_array_equal(indexes, expected)
    np.testing.assert_array_equal(values[0], np.take_along_axis(logits[0], expected[0], axis=-1))
