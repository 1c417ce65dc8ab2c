"""Audio-tagging metrics as AudioSet papers report them: mAP, mAUC and d-prime; and DCASE's lwlrap.

Macro averages over the classes that have at least one positive (and, for
AUC, one negative) in the evaluated set, so a subset of AudioSet evaluates
the same way as the full eval split does.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


CLASS_BLOCK = 64
"""Classes ranked at once: (64, N) temporaries, not (C, N) (AudioSet's eval split: 10 MB, not 85)."""


def average_precision(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class AP (step-wise, ties broken by distinct score thresholds); NaN for classes without positives."""
    return class_metrics(targets, scores)[0]


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class ROC AUC by the rank-sum (Mann-Whitney) identity, ties counted half; NaN if undefined."""
    return class_metrics(targets, scores)[1]


def class_metrics(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP and AUC from one stable sort of each class's scores, a block of classes at a time.

    After sorting a class's N scores in descending order, position i lies in a tie group [first_i, last_i].
    AP = sum over positives i of precision at last_i (true positives up to last_i / (last_i + 1)), over P;
    the ascending rank of i, ties averaged, is N - (first_i + last_i) / 2, and AUC is the rank sum of the
    positives less P (P + 1) / 2, over P x (N - P).
    """
    targets = np.asarray(targets, dtype=bool)
    scores = _floating(scores)
    n, n_classes = targets.shape
    ap, auc = np.full(n_classes, np.nan), np.full(n_classes, np.nan)
    positions = np.arange(n)
    for start in range(0, n_classes, CLASS_BLOCK):
        block = slice(start, min(start + CLASS_BLOCK, n_classes))
        column_scores = np.ascontiguousarray(scores[:, block].T)
        order = np.argsort(-column_scores, axis=1, kind="stable")
        ranked = np.take_along_axis(column_scores, order, axis=1)
        hits = np.take_along_axis(np.ascontiguousarray(targets[:, block].T), order, axis=1)
        new_value = np.diff(ranked, axis=1) != 0
        first = np.maximum.accumulate(np.where(np.c_[np.ones(len(ranked), bool), new_value], positions, 0), axis=1)
        last = np.minimum.accumulate(np.where(np.c_[new_value, np.ones(len(ranked), bool)], positions, n)[:, ::-1],
                                     axis=1)[:, ::-1]
        true_pos = np.take_along_axis(np.cumsum(hits, axis=1), last, axis=1)
        positives = hits.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[block] = np.where(hits, true_pos / (last + 1), 0.0).sum(axis=1) / positives
            rank_sum = np.where(hits, n - (first + last) / 2, 0.0).sum(axis=1)
            auc[block] = (rank_sum - positives * (positives + 1) / 2) / (positives * (n - positives))
    ap[~targets.any(axis=0)] = np.nan
    defined = targets.any(axis=0) & ~targets.all(axis=0)
    auc[~defined] = np.nan
    return ap, auc


def d_prime(auc: float) -> float:
    """Sensitivity index from AUC, as AudioSet papers report it: sqrt(2) * Phi^-1(AUC)."""
    auc = min(max(auc, 1e-12), 1 - 1e-12)
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def lwlrap(targets: np.ndarray, scores: np.ndarray) -> float:
    """Label-weighted label-ranking average precision (DCASE 2019 task 2): every positive label counts once.

    For each positive (clip, label): the share of positives among the labels its clip ranks at or above it.
    Ties count pessimistically (a tied label ranks above), as in scikit-learn's LRAP; lwlrap is LRAP with
    each clip weighted by its number of positives. NaN when there are no positives.
    """
    targets = np.asarray(targets, dtype=bool)
    scores = _floating(scores)
    if not targets.any():
        return math.nan
    order = np.argsort(-scores, axis=1, kind="mergesort")
    ranked_scores = np.take_along_axis(scores, order, axis=1)
    ranked_targets = np.take_along_axis(targets, order, axis=1)
    n_labels = scores.shape[1]
    # Each position takes the rank of the last label tied with it: the number of labels scored >= its score.
    last_of_tie = np.where(np.diff(ranked_scores, axis=1, append=-np.inf) != 0, np.arange(n_labels), n_labels)
    last_of_tie = np.minimum.accumulate(last_of_tie[:, ::-1], axis=1)[:, ::-1]
    hits = np.take_along_axis(np.cumsum(ranked_targets, axis=1), last_of_tie, axis=1)
    precision = hits / (last_of_tie + 1)
    return float(precision[ranked_targets].sum() / ranked_targets.sum())


def tagging_metrics(targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """mAP, mAUC and d-prime over the classes for which each is defined."""
    return summary(*class_metrics(targets, scores))


def summary(ap: np.ndarray, auc: np.ndarray) -> dict[str, float]:
    """mAP, mAUC and d-prime from per-class AP and AUC (`class_metrics`)."""
    m_ap, m_auc = float(np.nanmean(ap)), float(np.nanmean(auc))
    return {"mAP": m_ap, "mAUC": m_auc, "d_prime": d_prime(m_auc)}


def _floating(scores: np.ndarray) -> np.ndarray:
    """Scores as float32 or float64, never a float64 copy of float32 scores: a cast changes no order or tie."""
    scores = np.asarray(scores)
    return scores if scores.dtype in (np.float32, np.float64) else scores.astype(np.float64)
