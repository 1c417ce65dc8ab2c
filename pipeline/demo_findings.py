"""What `kdpipe demo` concludes, and its evidence: the students over seeds, and what the teachers
say about the events the demo's train labels leave out.

The demo's generator knows every event it mixed into a clip, so, unlike on real data, the
labels that a weak-label annotator missed are known, and so is what each teacher predicts
for them: the targets a KD student learns from where the labels are silent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdpipe.compare import Scores
from kdpipe.logits_store import CombinedLogits
from kdpipe.waveform_store import WaveformStore


@dataclass(frozen=True)
class TeacherEvidence:
    name: str
    labelled: float  # mean probability on train events the labels name
    unlabelled: float  # ... on train events the labels leave out
    tagged_unlabelled: float  # share of those above 0.5
    absent: float  # mean probability on classes absent from a train clip
    eval_ece: float  # expected calibration error on the evaluation split, 10 probability bins


def calibration_error(targets: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over every (clip, class) pair: |mean probability - share positive| per
    probability bin, weighted by the bin's share of pairs."""
    p, t = probabilities.ravel(), targets.ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    gap = np.abs(np.bincount(which, p, bins) - np.bincount(which, t.astype(float), bins))
    return float(gap.sum() / p.size)


def teacher_evidence(store: WaveformStore, combined: CombinedLogits, complete: np.ndarray, eval_split: str
                     ) -> list[TeacherEvidence]:
    """Each teacher's (and the ensemble's) probabilities on the train events the labels name, those they miss
    and the absent classes; `complete` (N, C) bool is every event the clips really hold."""
    labels = store.column("labels").astype(bool)
    train, evaluation = store.rows("train"), store.rows(eval_split)
    names, missed = labels[train], complete[train] & ~labels[train]
    evidence = []
    for teacher in [*combined.teachers, None]:
        logits = combined.read(teacher).astype(np.float32)
        probabilities = 1 / (1 + np.exp(-logits))
        on_train = probabilities[train]
        evidence.append(TeacherEvidence(
            teacher or "ensemble", float(on_train[names].mean()), float(on_train[missed].mean()),
            float((on_train[missed] > 0.5).mean()), float(on_train[~complete[train]].mean()),
            calibration_error(labels[evaluation], probabilities[evaluation])))
    return evidence


@dataclass(frozen=True)
class Finding:
    differences: tuple[float, ...]  # KD - no KD, per seed
    text: str


def kd_finding(kd: Scores, baseline: Scores) -> Finding:
    """KD against its baseline, seed by seed (the same seeds), in one plain sentence."""
    assert kd.seeds == baseline.seeds, "both students over the same seeds"
    differences = tuple(a - b for a, b in zip(kd.mAP, baseline.mAP))
    mean, n = float(np.mean(differences)), len(differences)
    spread = f"per seed {', '.join(f'{d:+.3f}' for d in differences)}"
    seeds = f"all {n} seeds" if n > 1 else "its one seed"
    if all(d > 0 for d in differences):
        text = f"KD beat no KD on {seeds}: {mean:+.3f} mAP on average ({spread})."
    elif all(d < 0 for d in differences):
        text = f"KD lost to no KD on {seeds}: {mean:+.3f} mAP on average ({spread})."
    else:
        text = (f"No consistent effect of KD over {n} seeds: {mean:+.3f} mAP on average ({spread}); "
                "the seeds disagree on its sign.")
    if n < 3:
        text += f" {n} seed{'s are' if n > 1 else ' is'} too few to tell an effect from seed noise: run --seeds 3."
    return Finding(differences, text)


def spread(values: tuple[float, ...]) -> str:
    """mean ± sample standard deviation (the spread over seeds)."""
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
