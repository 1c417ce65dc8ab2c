"""Multi-representation collaborative students (after Wang et al., "Multi-Representation KD").

One student per input representation (mel, MFCC, linear STFT) trains alongside the
others: each learns from the labels and teacher targets as a single student would,
and also from its peers' current predictions (mutual KD). The representations see
the same clips, so they err differently and the peers' predictions carry knowledge
none of them has alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.training import LossFn, Mixup


class RepresentationFrontends(nn.Module):
    """One frontend per representation; their features come back as a tuple, in member order."""

    def __init__(self, frontends: dict[str, nn.Module]):
        super().__init__()
        self.frontends = nn.ModuleDict(frontends)

    def forward(self, waveforms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(frontend(waveforms) for frontend in self.frontends.values())


class StudentGroup(nn.Module):
    """The students of a group, run on their own representation: logits (batch, members, classes)."""

    def __init__(self, students: dict[str, nn.Module]):
        super().__init__()
        self.students = nn.ModuleDict(students)

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(self.students)

    def update_params(self, epoch: int) -> float | None:
        """EfficientAT's per-epoch hook, passed to the members that have it (DyMN); returns the last value."""
        values = [student.update_params(epoch) for student in self.students.values() if hasattr(student, "update_params")]
        return values[-1] if values else None

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.stack([student(x) for student, x in zip(self.students.values(), features)], dim=1)


def member_state_dict(group_state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """One member's plain state dict, cut from a saved StudentGroup state dict."""
    prefix = f"students.{name}."
    return {key[len(prefix):]: value for key, value in group_state.items() if key.startswith(prefix)}


def mutual_term(logits: torch.Tensor) -> torch.Tensor:
    """Mean over members k and peers j != k of BCE(member k, sigmoid(peer j)), peers detached.

    Detaching makes the term teach each member from the others without pulling the
    peers towards it through the same term; with one member it is zero.
    """
    members = logits.shape[1]
    if members < 2:
        return logits.new_zeros(())
    peers = torch.sigmoid(logits.detach())
    terms = [F.binary_cross_entropy_with_logits(logits[:, k], peers[:, j])
             for k in range(members) for j in range(members) if j != k]
    return torch.stack(terms).mean()


def collaborative_loss(member_loss: LossFn, mutual_weight: float) -> LossFn:
    """Each member's own loss (labels and teacher targets), summed, plus the weighted mutual-KD term."""

    def loss(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, mixup: Mixup | None) -> torch.Tensor:
        own = sum(member_loss(logits[:, k], rows, labels, mixup) for k in range(logits.shape[1]))
        return own + mutual_weight * logits.shape[1] * mutual_term(logits)

    return loss
