"""The names of the pipeline's stages: how the library finds a stage's output in the cache.

The stages themselves (kdpipe.stages) are built from these names; library code that reads a
stage's output (a teacher's checkpoint, the trained student) looks it up by name through the
runner, never by importing the stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdpipe.config import Config

PREPARE = "prepare"
ENSEMBLE = "extract-teachers"
STUDENT = "train-student"
BASELINE = "train-student/no-kd"
EVALUATE = "evaluate"
TRAIN_TEACHER_PREFIX = "train-teacher/"
EXTRACT_PREFIX = "extract/"


def train_teacher(label: str) -> str:
    """The stage that trains teacher `label` (a teacher entry without a checkpoint)."""
    return TRAIN_TEACHER_PREFIX + label


def extract(label: str) -> str:
    """The stage that runs teacher `label` over every clip."""
    return EXTRACT_PREFIX + label


def student(kd: bool) -> str:
    """The student trained with KD, or without it (the baseline)."""
    return STUDENT if kd else BASELINE


def students(config: Config) -> list[str]:
    """The student stages a config has: the KD student when it has teachers to learn from; the baseline
    when KD is off (then it is the run's student) or `evaluation.baseline` asks for it."""
    kd = config.student.kd.enabled
    return [*([STUDENT] if kd and config.teachers else []),
            *([BASELINE] if not kd or config.evaluation.baseline else [])]
