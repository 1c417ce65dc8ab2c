"""Knowledge distillation from stored teacher logits: the targets on the device, and EfficientAT's loss.

Loss = λ·BCE(student, labels) + (1 − λ)·BCE(student, sigmoid(teacher / T)), with mixup's KD term
mixed in loss space; clips without a teacher row contribute no KD term.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError
from kdpipe.logits_store import CombinedLogits
from kdpipe.training import LossFn, Mixup


def teacher_targets(combined: CombinedLogits, n_clips: int, temperature: float,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """sigmoid(ensemble / T) for every store row, on the device, and which rows have a teacher."""
    logits = combined.read()
    if logits.shape[0] != n_clips:
        raise KdpipeError(f"{combined.path}: teacher logits have {logits.shape[0]} rows, the store {n_clips}")
    logits = logits.astype(np.float32)
    present = np.isfinite(logits).all(axis=1)
    probabilities = 1.0 / (1.0 + np.exp(-np.nan_to_num(logits) / temperature))
    return (torch.from_numpy(probabilities).to(device),
            torch.from_numpy(present.astype(np.float32)).to(device))


def kd_loss(targets: torch.Tensor, has_target: torch.Tensor, label_weight: float) -> LossFn:
    """EfficientAT's KD loss over device-resident teacher probabilities, indexed by store row."""

    def loss(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, mixup: Mixup | None) -> torch.Tensor:
        label_loss = F.binary_cross_entropy_with_logits(logits, mixup.mix(labels) if mixup else labels)
        teacher, present = targets[rows], has_target[rows]
        per_clip = F.binary_cross_entropy_with_logits(logits, teacher, reduction="none").mean(dim=1) * present
        if mixup is not None:
            partner = F.binary_cross_entropy_with_logits(logits, teacher[mixup.perm], reduction="none").mean(dim=1)
            per_clip = mixup.lam * per_clip + (1.0 - mixup.lam) * partner * present[mixup.perm]
        return label_weight * label_loss + (1.0 - label_weight) * per_clip.mean()

    return loss
