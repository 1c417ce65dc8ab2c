"""Audio-tagging metrics as AudioSet papers report them: mAP, mAUC and d-prime; and DCASE's lwlrap.

Macro averages over the classes that have at least one positive (and, for
AUC, one negative) in the evaluated set, so a subset of AudioSet evaluates
the same way as the full eval split does.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def average_precision(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class AP (step-wise, ties broken by distinct score thresholds); NaN for classes without positives."""
    targets = np.asarray(targets, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    result = np.full(targets.shape[1], np.nan)
    for c in np.flatnonzero(targets.any(axis=0)):
        order = np.argsort(-scores[:, c], kind="mergesort")
        ranked_scores, ranked_targets = scores[order, c], targets[order, c]
        last_of_each_threshold = np.r_[np.flatnonzero(np.diff(ranked_scores)), len(ranked_scores) - 1]
        true_pos = np.cumsum(ranked_targets)[last_of_each_threshold]
        precision = true_pos / (last_of_each_threshold + 1)
        recall = true_pos / true_pos[-1]
        result[c] = np.sum(np.diff(np.r_[0.0, recall]) * precision)
    return result


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class ROC AUC by the rank-sum (Mann-Whitney) identity, ties counted half; NaN if undefined."""
    targets = np.asarray(targets, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    result = np.full(targets.shape[1], np.nan)
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    for c in np.flatnonzero((positives > 0) & (negatives > 0)):
        ranks = _average_ranks(scores[:, c])
        rank_sum = ranks[targets[:, c]].sum()
        result[c] = (rank_sum - positives[c] * (positives[c] + 1) / 2) / (positives[c] * negatives[c])
    return result


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
    scores = np.asarray(scores, dtype=np.float64)
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
    m_ap = float(np.nanmean(average_precision(targets, scores)))
    m_auc = float(np.nanmean(roc_auc(targets, scores)))
    return {"mAP": m_ap, "mAUC": m_auc, "d_prime": d_prime(m_auc)}


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks
