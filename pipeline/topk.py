"""Top-k storage of per-view teacher logits (issue 15), after CED.

With K views per clip the ensemble's targets grow K-fold: AudioSet's 2 M clips
x 40 views x 527 classes is 84 GB at float16. CED keeps the k = 20 largest
outputs of each view (float16 values, int16 class indexes) and rebuilds the
527-dim target from them when training; the other 507 classes of a confident
ensemble carry almost nothing. `storage_per_clip` gives the figures.

kdpipe stores logits where CED stores probabilities (its teachers end in a
sigmoid and the ensemble averages probabilities), so CED's fill rules, which
say what probability the classes that were not kept get, are applied here in
logit space. `expand_topk(fill=...)`:

- "zero" (default): probability ~0, CED's rule in practice: its training
  configs leave `label_type` at TrainConfig's default "zero" (targets.zeros,
  then the kept values scattered in; RicherMans/CED utils.py, dataset.py).
  A logit cannot be -inf here (kdpipe marks a row with a non-finite logit as
  having no teacher), so the fill is ABSENT_LOGIT = logit(1e-7) ~ -16.1 (the
  floor the probability-mode ensemble clips to), or the smallest kept logit if
  that is lower, so a class that was not kept never outranks one that was.
  With a KD temperature the fill follows the tempering (`expand_topk`), so the
  target stays ~1e-7 at any T.
- "last_mean": CED's LogitsReader default: the smallest kept probability,
  spread evenly over the C - k classes not kept, p = sigmoid(min) / (C - k),
  stored as its logit. It keeps some mass on the tail.
- "min": the smallest kept logit, an upper bound on every class not kept
  (a class not kept scored at most that), so a loose one.

With k = C nothing is filled and the round trip is exact at float32. A row
that holds any non-finite logit (NaN where the stores were never written) is
absent: kept as NaN values with index -1, expanded back to a NaN row.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

Fill = Literal["zero", "last_mean", "min"]

ABSENT_LOGIT = float(np.log(1e-7) - np.log1p(-1e-7))  # logit of probability 1e-7, ~ -16.118
INDEX_DTYPE = np.int16  # class indexes as CED stores them: up to 32768 classes
_VALUE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


class Storage(NamedTuple):
    """Bytes per clip of K views' targets, uncompressed."""

    full: int  # every class of every view
    topk: int  # k values and k int16 indexes per view


def _value_dtype(dtype: np.dtype | type | str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in _VALUE_DTYPES:
        raise ValueError(f"values are stored as float16 or float32, not {dtype}")
    return dtype


def keep_topk(logits: np.ndarray, k: int, dtype: np.dtype | type | str = np.float16
              ) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits of each (..., C) row, largest first, and their int16 class indexes.

    Equal logits are kept lowest class index first, so ties are decided the
    same way everywhere. Values are cast to `dtype` (float16, CED's choice, or
    float32) after choosing; a kept logit beyond its range is an error.
    """
    logits = np.asarray(logits)
    dtype = _value_dtype(dtype)
    n_classes = logits.shape[-1]
    if n_classes > np.iinfo(INDEX_DTYPE).max + 1:
        raise ValueError(f"{n_classes} classes do not fit int16 indexes")
    if not 1 <= k <= n_classes:
        raise ValueError(f"k must be in [1, {n_classes}], got {k}")
    absent = ~np.isfinite(logits).all(axis=-1)
    flat = logits.reshape(-1, n_classes)
    order = np.concatenate([_largest(np.where(absent.reshape(-1)[start:start + TOPK_ROWS, None], 0,
                                              flat[start:start + TOPK_ROWS]), k)
                            for start in range(0, len(flat), TOPK_ROWS)] or [np.empty((0, k), np.intp)])
    order = order.reshape(*logits.shape[:-1], k)
    with np.errstate(over="ignore"):  # an overflow is reported below, for present rows only
        values = np.take_along_axis(logits, order, axis=-1).astype(dtype)
    indexes = order.astype(INDEX_DTYPE)
    if not np.isfinite(values[~absent]).all():
        raise ValueError(f"a kept logit does not fit {dtype}")
    values[absent] = np.nan
    indexes[absent] = -1
    return values, indexes


TOPK_ROWS = 16384
"""Rows chosen from at a time: (16384, C) temporaries, where a chunk of K = 40 views has 160 k rows."""


def _largest(rows: np.ndarray, k: int) -> np.ndarray:
    """The class indexes of each finite (R, C) row's k largest values, largest first, ties lowest index first.

    A partial sort finds each row's k-th largest value; the classes above it, and as many of those equal to
    it as are still needed (lowest index first), are then sorted among themselves: AudioSet's 527 classes
    cost a fifth of a full sort.
    """
    n_classes = rows.shape[1]
    kth = np.partition(rows, n_classes - k, axis=1)[:, n_classes - k, None]
    chosen = rows > kth
    ties = rows == kth
    room = k - chosen.sum(axis=1)
    crowded = np.flatnonzero(ties.sum(axis=1) > room)  # more equal to the k-th than places left: rare
    ties[crowded] &= np.cumsum(ties[crowded], axis=1) <= room[crowded, None]
    chosen |= ties
    candidates = np.nonzero(chosen)[1].reshape(len(rows), k)  # ascending class index within each row
    ranked = np.argsort(-np.take_along_axis(rows, candidates, axis=1), axis=1, kind="stable")
    return np.take_along_axis(candidates, ranked, axis=1)


def expand_topk(values: np.ndarray, indexes: np.ndarray, n_classes: int, fill: Fill = "zero",
                temperature: float = 1.0) -> np.ndarray:
    """Dense (..., n_classes) float32 logits: the kept values at their indexes, `fill`'s rule elsewhere.

    With a KD `temperature` T the kept values are divided by T first and the fill is applied to
    the tempered values, so sigmoid of the result is the target: the classes not kept get the
    fill's probability (~1e-7 for `zero`) at any T, where tempering a filled logit would lift
    `zero` to 1.8 % at T = 4. The rules are in the module docstring; a row with a non-finite
    value is absent and comes back as NaN.
    """
    values = np.asarray(values, dtype=np.float32) / np.float32(temperature)
    indexes = np.asarray(indexes)
    if values.shape != indexes.shape:
        raise ValueError(f"values {values.shape} and indexes {indexes.shape} differ in shape")
    k = values.shape[-1]
    if not 1 <= k <= n_classes:
        raise ValueError(f"{k} kept classes do not fit {n_classes} classes")
    present = np.isfinite(values).all(axis=-1)
    kept = indexes[present]
    if kept.size and (kept.min() < 0 or kept.max() >= n_classes):
        raise ValueError(f"class indexes must be in [0, {n_classes})")

    out = np.empty(values.shape[:-1] + (n_classes,), dtype=np.float32)
    out[...] = _fill_value(values.min(axis=-1), n_classes - k, fill)[..., None]
    targets = np.where(present[..., None], indexes, np.arange(k)).astype(np.intp)
    np.put_along_axis(out, targets, values, axis=-1)
    out[~present] = np.nan
    return out


def mean_of_topk(parts: list[tuple[np.ndarray, np.ndarray, float]], n_classes: int) -> np.ndarray:
    """(..., C) float32 weighted mean of several top-k rows ((values, indexes, weight) each), a class a part did
    not keep counted at the smallest value that part kept: the smallest values' mean everywhere, plus each
    part's excess over its smallest at its kept classes. A row absent in any part is NaN."""
    total = sum(weight for _values, _indexes, weight in parts)
    values = [np.asarray(v, dtype=np.float32) for v, _indexes, _weight in parts]
    smallest = [v.min(axis=-1, keepdims=True) for v in values]
    base = sum(np.float32(w / total) * low for (_v, _i, w), low in zip(parts, smallest))
    out = np.empty(values[0].shape[:-1] + (n_classes,), dtype=np.float32)
    out[...] = base
    flat = out.reshape(-1, n_classes)
    rows = np.arange(len(flat))[:, None]
    for (_v, indexes, weight), value, low in zip(parts, values, smallest):
        index = np.maximum(indexes, 0).reshape(len(flat), -1)  # an absent row (-1) is NaN through `base`
        flat[rows, index] += (np.float32(weight / total) * (value - low)).reshape(len(flat), -1)
    return out


def kept_mask(indexes: list[np.ndarray], n_classes: int) -> np.ndarray:
    """(..., C) bool: the classes any of several top-k index arrays (..., k) kept (-1, an absent row: none)."""
    kept = np.zeros(indexes[0].shape[:-1] + (n_classes + 1,), dtype=bool)  # the last column takes the -1s
    for index in indexes:
        np.put_along_axis(kept, np.where(index < 0, n_classes, index).astype(np.intp), True, axis=-1)
    return kept[..., :n_classes]


def fill_unkept(logits: np.ndarray, kept: np.ndarray, fill: Fill = "zero") -> np.ndarray:
    """`logits` (..., C) with the classes not `kept` set by `fill`'s rule on each row's kept values, in place:
    for an ensemble of top-k teachers, where each row keeps the union of the teachers' classes. A row with
    a non-finite logit is absent and stays NaN."""
    absent = ~np.isfinite(logits).all(axis=-1)
    smallest = np.where(kept, logits, np.inf).min(axis=-1)
    with np.errstate(invalid="ignore"):
        value = _fill_value(smallest, kept.shape[-1] - kept.sum(axis=-1), fill).astype(np.float32)
    np.copyto(logits, np.broadcast_to(value[..., None], logits.shape), where=~kept)
    logits[absent] = np.nan
    return logits


def _fill_value(smallest: np.ndarray, spread: np.ndarray | int, fill: Fill) -> np.ndarray:
    """The logit `fill` gives every class not kept, from the smallest kept logit and how many were not kept."""
    smallest = np.asarray(smallest, dtype=np.float64)
    if fill == "zero":
        return np.minimum(smallest, ABSENT_LOGIT)
    if fill == "min":
        return smallest
    if fill != "last_mean":
        raise ValueError(f"unknown fill rule {fill!r}; one of zero, last_mean, min")
    # logit(sigmoid(m) / D) = log sigmoid(m) - log(D - sigmoid(m)), stable for any m; with D <= 1, m itself
    log_sigmoid = -np.logaddexp(0.0, -smallest)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread_mean = log_sigmoid - np.log(np.maximum(spread, 1) - np.exp(log_sigmoid))
    return np.where(np.asarray(spread) > 1, spread_mean, smallest)


def storage_per_clip(views: int, classes: int, k: int, dtype: np.dtype | type | str = np.float16) -> Storage:
    """Bytes per clip for K views of C classes: all of them, or the top k with int16 indexes.

    Nothing else is stored per view: a view's augmentation follows from its row,
    index and view_seed (kdpipe.views), where CED stores a 4-byte seed per view.
    """
    value_bytes = _value_dtype(dtype).itemsize
    index_bytes = np.dtype(INDEX_DTYPE).itemsize
    return Storage(full=views * classes * value_bytes, topk=views * k * (value_bytes + index_bytes))
