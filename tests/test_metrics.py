"""Metrics against an independent implementation (scikit-learn) and known values."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, label_ranking_average_precision_score, roc_auc_score

from kdpipe.metrics import average_precision, d_prime, lwlrap, roc_auc, tagging_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_ap_and_auc_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    targets = rng.random((300, 20)) < 0.1
    targets[:, 3] = False  # a class without positives is left out
    scores = np.round(rng.random((300, 20)) + targets * 0.3, 2)  # rounding makes ties
    ap, auc = average_precision(targets, scores), roc_auc(targets, scores)
    assert np.isnan(ap[3]) and np.isnan(auc[3])
    for c in [c for c in range(20) if c != 3]:
        assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12)
        assert auc[c] == pytest.approx(roc_auc_score(targets[:, c], scores[:, c]), abs=1e-12)
    keep = targets.any(axis=0)
    expected = average_precision_score(targets[:, keep], scores[:, keep], average="macro")
    assert tagging_metrics(targets, scores)["mAP"] == pytest.approx(expected, abs=1e-12)


def test_perfect_and_chance_scores():
    targets = np.eye(4, dtype=bool).repeat(5, axis=0)
    metrics = tagging_metrics(targets, targets.astype(float))
    assert metrics["mAP"] == 1.0 and metrics["mAUC"] == 1.0
    assert tagging_metrics(targets, np.ones(targets.shape))["mAUC"] == 0.5


def test_d_prime_known_values():
    assert d_prime(0.5) == pytest.approx(0.0, abs=1e-12)
    assert d_prime(0.9) == pytest.approx(np.sqrt(2) * 1.2815515655446004)


def test_lwlrap_by_hand():
    targets = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=bool)  # the last clip has no positives
    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.8, 0.4], [0.3, 0.2, 0.1]])
    # clip 0: label 0 ranks 1st (1/1), label 2 ranks 3rd with 2 positives at or above (2/3); clip 1: 1/2
    assert lwlrap(targets, scores) == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    tied = np.array([[0.5, 0.5, 0.1]])
    assert lwlrap(np.array([[True, False, False]]), tied) == pytest.approx(1 / 2)  # a tie ranks above
    assert np.isnan(lwlrap(np.zeros((2, 3), bool), scores[:2]))


@pytest.mark.parametrize("seed", [0, 1])
def test_lwlrap_is_lrap_weighted_by_positives_per_clip(seed):
    rng = np.random.default_rng(seed)
    targets = rng.random((200, 15)) < 0.15
    targets[:5] = False  # clips without positives weigh nothing
    targets[5] = True  # nor does a clip with every label positive change anything (precision 1)
    scores = np.round(rng.random((200, 15)) + targets * 0.4, 1)  # coarse rounding: many ties
    expected = label_ranking_average_precision_score(targets, scores, sample_weight=targets.sum(axis=1))
    assert lwlrap(targets, scores) == pytest.approx(expected, abs=1e-12)
