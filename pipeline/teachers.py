"""Teachers as the library sees them: where a teacher's weights are, and its network for training."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kdpipe import stage_names
from kdpipe.config import TeacherConfig
from kdpipe.models import create_model, load_checkpoint
from kdpipe.training import MODEL


def checkpoint_path(teacher: TeacherConfig, upstream: dict[str, Path]) -> Path:
    """The teacher's own checkpoint, or the epoch its train-teacher stage kept (an upstream output)."""
    if teacher.checkpoint is not None:
        return teacher.checkpoint
    return upstream[stage_names.train_teacher(teacher.label)] / MODEL


def build_teacher(teacher: TeacherConfig, num_classes: int) -> nn.Module:
    """The teacher's architecture with the run's class count, started from `init` when given."""
    model = create_model(teacher.arch, **{"num_classes": num_classes, **teacher.options})
    if teacher.init is not None:
        load_checkpoint(model, teacher.init)
    return model
