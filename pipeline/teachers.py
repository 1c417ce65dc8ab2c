"""Teachers as the library sees them: where a teacher's weights are, and its network for training.

A teacher trained with `teacher_training.folds` = k > 1 is k models (cross-fitting): the model of
fold f learnt from every train clip outside fold f, in `fold<f>/` of its train-teacher output, and
`unseen_fold.npy` records, for every store row, the fold of the one model that never trained on it
(-1: none of them did, so all k are). Extraction labels each row with the models that never saw
it; anything else (predict, sizes) runs the mean of the k.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdpipe import stage_names
from kdpipe.config import TeacherConfig
from kdpipe.models import create_model
from kdpipe.training import MODEL, at_kept_epoch

UNSEEN = "unseen_fold.npy"
"""(N,) int8 in a cross-fitted teacher's output: per store row, the fold whose model never trained on it, or -1."""


def fold_dir(fold: int) -> str:
    """Where the model of one fold is trained, inside the teacher's train-teacher output."""
    return f"fold{fold}"


def checkpoint_paths(teacher: TeacherConfig, upstream: dict[str, Path]) -> tuple[Path, ...]:
    """The teacher's own checkpoint, or the epoch(s) its train-teacher stage kept: one per fold when cross-fitted."""
    if teacher.checkpoint is not None:
        return (teacher.checkpoint,)
    folder = upstream[stage_names.train_teacher(teacher.label)]
    if not (folder / UNSEEN).is_file():
        return (folder / MODEL,)
    folds = sum(1 for _ in folder.glob("fold*/" + MODEL))
    return tuple(folder / fold_dir(f) / MODEL for f in range(folds))


def unseen_folds(teacher: TeacherConfig, upstream: dict[str, Path]) -> Path | None:
    """The cross-fitted teacher's `unseen_fold.npy` (None for a teacher of one model)."""
    if teacher.checkpoint is not None:
        return None
    path = upstream[stage_names.train_teacher(teacher.label)] / UNSEEN
    return path if path.is_file() else None


class CrossFitted(nn.Module):
    """The k models of a cross-fitted teacher: `forward` is their mean logit, `per_row` picks the model
    that never saw each row (module docstring)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.frontend_config = members[0].frontend_config
        if hasattr(members[0], "max_frames"):  # transformers: the longest input they take (kdpipe.models.windowing)
            self.max_frames = members[0].max_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def per_row(member_logits: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """(k, B, C) logits of every member -> (B, C): the member `unseen[b]` for each row, the mean where it is -1."""
    picked = member_logits[unseen.clamp(min=0), torch.arange(member_logits.shape[1])]
    return torch.where((unseen >= 0)[:, None], picked, member_logits.mean(dim=0))


def load_teacher(arch: str, checkpoints: tuple[Path, ...], options: dict) -> nn.Module:
    """A teacher's network from its checkpoint(s), strictly: one model, or CrossFitted for several."""
    members = [at_kept_epoch(create_model(arch, checkpoint=path, **options), path.parent) for path in checkpoints]
    return members[0] if len(members) == 1 else CrossFitted(members)


def build_teacher(teacher: TeacherConfig, num_classes: int) -> nn.Module:
    """The teacher's architecture with the run's class count (train-teacher starts it from `init`)."""
    return create_model(teacher.arch, **{"num_classes": num_classes, **teacher.options})
