"""What the demo concludes: calibration error, and the KD finding over seeds, against computations by hand."""

import numpy as np
import pytest

from kdpipe.compare import Scores, Variant
from kdpipe.demo_findings import calibration_error, kd_finding, spread


def test_calibration_error_matches_a_loop_over_bins():
    rng = np.random.default_rng(0)
    probabilities = rng.uniform(size=(50, 7))
    targets = rng.uniform(size=(50, 7)) < probabilities ** 2  # overconfident: fewer positives than predicted
    expected = 0.0
    p, t = probabilities.ravel(), targets.ravel()
    for low in np.arange(10) / 10:
        inside = (p >= low) & (p < low + 0.1)
        if inside.any():
            expected += inside.mean() * abs(p[inside].mean() - t[inside].mean())
    assert calibration_error(targets, probabilities) == pytest.approx(expected)
    assert calibration_error(np.array([[True, False]]), np.array([[1.0, 0.0]])) == 0.0  # p = 1 is the top bin


def scores(name, values):
    return Scores(Variant(name, ()), (0, 1, 2), tuple(values))


def test_the_finding_states_the_sign_only_when_every_seed_agrees():
    win = kd_finding(scores("kd", (0.70, 0.72, 0.71)), scores("base", (0.65, 0.66, 0.70)))
    assert win.differences == pytest.approx((0.05, 0.06, 0.01))
    assert win.text.startswith("KD beat no KD on all 3 seeds: +0.040 mAP")
    loss = kd_finding(scores("kd", (0.60, 0.61, 0.62)), scores("base", (0.65, 0.66, 0.70)))
    assert loss.text.startswith("KD lost to no KD on all 3 seeds: -0.060")
    mixed = kd_finding(scores("kd", (0.70, 0.60, 0.71)), scores("base", (0.65, 0.66, 0.70)))
    assert mixed.text.startswith("No consistent effect of KD over 3 seeds") and "+0.050, -0.060, +0.010" in mixed.text
    assert spread((0.70, 0.72, 0.71)) == "0.7100 ± 0.0100"
    one = kd_finding(Scores(Variant("kd", ()), (0,), (0.7,)), Scores(Variant("base", ()), (0,), (0.6,)))
    assert one.text.startswith("KD beat no KD on its one seed: +0.100")
    assert one.text.endswith("1 seed is too few to tell an effect from seed noise: run --seeds 3.")
    assert "too few" not in win.text
