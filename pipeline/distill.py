"""Knowledge distillation from stored teacher logits: the targets on the device, and EfficientAT's loss.

Loss = λ·BCE(student, labels) + (1 − λ)·BCE(student, sigmoid(teacher / T)), with mixup's KD term
mixed in loss space; clips without a teacher row contribute no KD term, and clips without labels
(unlabelled audio) no label term.

Two kinds of targets: `Targets`, one per clip, computed on the clean clip (EfficientAT); and
`ViewTargets` (consistent teaching, after CED), where at epoch e the student hears view e mod K of
each clip, rebuilt from its seed exactly as the teachers heard it, and learns that view's target.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.config import Config
from kdpipe.errors import KdpipeError
from kdpipe.logits_store import CombinedLogits
from kdpipe.training import LossFn, Mixup
from kdpipe.views import apply_views, view_params


def _on_device(logits: np.ndarray, n_clips: int, temperature: float, device: torch.device, source: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """sigmoid(logits / T) per row on the device, and which rows have a teacher (finite logits)."""
    if logits.shape[0] != n_clips:
        raise KdpipeError(f"{source}: teacher logits have {logits.shape[0]} rows, the store {n_clips}")
    logits = logits.astype(np.float32)
    present = np.isfinite(logits).all(axis=1)
    probabilities = 1.0 / (1.0 + np.exp(-np.nan_to_num(logits) / temperature))
    return (torch.from_numpy(probabilities).to(device),
            torch.from_numpy(present.astype(np.float32)).to(device))


def teacher_probabilities(combined: CombinedLogits) -> np.ndarray:
    """(N, C) float64 sigmoid of the ensemble's clean logits (0 where a row has none): what the teachers hear in
    each clip, which stands in for the labels of unlabelled clips when drawing training batches."""
    logits = combined.read().astype(np.float64)
    return np.where(np.isfinite(logits), 1.0 / (1.0 + np.exp(-np.nan_to_num(logits))), 0.0)


class Targets:
    """The ensemble's targets on clean clips, the same every epoch: what the KD loss reads by store row."""

    def __init__(self, combined: CombinedLogits, n_clips: int, temperature: float, device: torch.device):
        self.probabilities, self.present = _on_device(combined.read(), n_clips, temperature, device,
                                                      str(combined.path))

    def start_epoch(self, epoch: int) -> None:
        """Clean targets do not change between epochs."""

    def augment(self, waves: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Clean targets go with the clean clips."""
        return waves


class ViewTargets(Targets):
    """Consistent teaching: at epoch e, view e mod K of every clip and the ensemble's target for that view.

    Only one view's targets sit on the device at a time ((N, C) float32: 4.2 GB for AudioSet's 2 M
    clips), read from the store at the start of each epoch (one view's chunks only).
    """

    def __init__(self, combined: CombinedLogits, config: Config, n_clips: int, sample_rate: int,
                 clip_samples: int, device: torch.device):
        if not combined.n_views:
            raise KdpipeError(f"{combined.path} has no views: set extract.views > 0, or student.kd.views: false")
        self.combined, self.n_clips, self.device = combined, n_clips, device
        self.temperature, self.fill = config.student.kd.temperature, config.student.kd.topk_fill
        self.augment_settings, self.view_seed = config.extract.augment.settings(), config.extract.view_seed
        self.sample_rate, self.clip_samples = sample_rate, clip_samples
        self.view = -1

    def start_epoch(self, epoch: int) -> None:
        view = epoch % self.combined.n_views
        if view != self.view:
            self.view = view
            self.probabilities, self.present = _on_device(self.combined.read_view(view, self.fill), self.n_clips,
                                                          self.temperature, self.device, str(self.combined.path))

    def augment(self, waves: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """This epoch's view of each clip, bit-identical to what the teachers heard on this device type."""
        return apply_views(waves, view_params(rows, self.view, self.view_seed, self.augment_settings,
                                              self.sample_rate, self.clip_samples))


def kd_loss(targets: Targets, labelled: torch.Tensor, label_weight: float) -> LossFn:
    """EfficientAT's KD loss over device-resident teacher probabilities, indexed by store row.

    `labelled` (N,) marks the rows with labels: the label term counts only those clips (under
    mixup, only pairs of labelled clips), averaged over them; with every clip labelled it is
    EfficientAT's label term exactly.
    """

    def loss(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, mixup: Mixup | None) -> torch.Tensor:
        counted = labelled[rows]
        if mixup is not None:
            counted = counted * counted[mixup.perm]
        per_clip_labels = F.binary_cross_entropy_with_logits(
            logits, mixup.mix(labels) if mixup else labels, reduction="none").mean(dim=1)
        label_loss = (per_clip_labels * counted).sum() / counted.sum().clamp(min=1.0)
        teacher, present = targets.probabilities[rows], targets.present[rows]
        per_clip = F.binary_cross_entropy_with_logits(logits, teacher, reduction="none").mean(dim=1) * present
        if mixup is not None:
            partner = F.binary_cross_entropy_with_logits(logits, teacher[mixup.perm], reduction="none").mean(dim=1)
            per_clip = mixup.lam * per_clip + (1.0 - mixup.lam) * partner * present[mixup.perm]
        return label_weight * label_loss + (1.0 - label_weight) * per_clip.mean()

    return loss
