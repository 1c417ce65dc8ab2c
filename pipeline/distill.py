"""Knowledge distillation from stored teacher logits: the targets on the device, and EfficientAT's loss.

Loss = w·L_label + (1 − w)·L_KD (w = `student.kd.label_weight`), each term a BCE averaged over the
clips it has targets for. Under mixup, clip i is mixed with clip j = π(i) at λ_i ≥ 0.5, and its term
is the mix of the two clips' BCEs, renormalised over the partners that have a target:

    term_i = (λ_i·h_i·B(s_i, y_i) + (1 − λ_i)·h_j·B(s_i, y_j)) / (λ_i·h_i + (1 − λ_i)·h_j)

with h = 1 where the clip has the target (labels: a labelled clip; KD: a teacher row) and 0 where it
has not, B the mean over classes of BCE-with-logits, s_i the student's logits for the mixed input.
L is the mean of term_i over the clips whose denominator is positive. BCE is linear in its target,
so with every clip labelled and taught this is EfficientAT's loss exactly (BCE against λ·y_i +
(1 − λ)·y_j); a partner without a target hands its share to the clip that has one, and a pair
where neither has one adds nothing. Without mixup, λ = 1.

Two kinds of targets: `Targets`, one per clip, computed on the clean clip (EfficientAT); and
`ViewTargets` (consistent teaching, after CED), where at epoch e the student hears view e mod K of
each clip, rebuilt from its seed exactly as the teachers heard it, and learns that view's target.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.config import Config
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.integrity import row_blocks
from kdpipe.logits_store import CombinedLogits
from kdpipe.training import LossFn, Mixup
from kdpipe.view_plan import ViewPlan
from kdpipe.views import apply_views, view_params


def confident_classes(combined: CombinedLogits, threshold: float) -> Callable[[np.ndarray], np.ndarray]:
    """rows -> (len(rows), C) bool: the classes the ensemble hears in each clip with probability >= `threshold`
    (none where a row has no logits). This stands in for the labels of unlabelled clips when drawing batches:
    the ensemble's confident classes, not its whole probability row, whose hundreds of small values on rare
    classes would each be multiplied by the largest class weights."""
    cut = float(np.log(threshold) - np.log1p(-threshold))  # compared in logit space: no (N, C) sigmoid

    def heard(rows: np.ndarray) -> np.ndarray:
        logits = combined.read(rows=rows)
        return np.isfinite(logits).all(axis=1, keepdims=True) & (logits >= cut)

    return heard


class Targets:
    """The ensemble's targets on clean clips, the same every epoch: what the KD loss reads by store row.

    `probabilities` (N, C) float32 and `present` (N,) live on the device, filled a block of rows at a time
    from the store: the host never holds more than a block (AudioSet's 2 M clips x 527 classes are
    4.2 GB on the device, 35 MB a block on the host).
    """

    def __init__(self, combined: CombinedLogits, n_clips: int, temperature: float, device: torch.device):
        self._allocate(combined, n_clips, device)
        self._fill(lambda start, stop: combined.read(start=start, stop=stop), temperature)

    def _allocate(self, combined: CombinedLogits, n_clips: int, device: torch.device) -> None:
        if combined.n_clips != n_clips:
            raise KdpipeError(f"{combined.path}: teacher logits have {combined.n_clips} rows, the store {n_clips}")
        self.combined = combined
        self.probabilities = torch.empty((n_clips, combined.n_classes), dtype=torch.float32, device=device)
        self.present = torch.empty(n_clips, dtype=torch.float32, device=device)

    def _fill(self, logits_of: Callable[[int, int], np.ndarray], temperature: float) -> None:
        """sigmoid(logits / T) of every row into `probabilities` (in place), and which rows have a teacher."""
        for start, stop in row_blocks(len(self.present)):
            block = torch.from_numpy(logits_of(start, stop)).to(self.probabilities.device, torch.float32)
            present = torch.isfinite(block.sum(dim=1))  # one pass; a NaN or an infinity anywhere makes the sum so
            block[~present] = 0.0
            self.present[start:stop] = present
            self.probabilities[start:stop] = block.div_(temperature).sigmoid_()

    def start_epoch(self, epoch: int) -> None:
        """Clean targets do not change between epochs."""

    def augment(self, waves: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Clean targets go with the clean clips."""
        return waves


class ViewTargets(Targets):
    """Consistent teaching: at epoch e, view e mod K of every clip and the ensemble's target for that view.

    Only one view's targets sit on the device at a time, overwritten in place at a view change and read
    from the store a block of rows at a time (one view's chunks only).
    """

    def __init__(self, combined: CombinedLogits, config: Config, n_clips: int, sample_rate: int,
                 clip_samples: int, device: torch.device):
        self.plan = combined.view_plan  # what the teachers heard, whatever the config says
        if not self.plan.count:
            raise KdpipeError(f"{combined.path} has no views: set extract.views > 0, or student.kd.views: false")
        wanted = ViewPlan.from_config(config.extract)
        if wanted != self.plan:
            raise ConfigError(f"extract: {combined.path} holds views made by {self.plan}; the config asks for "
                              f"{wanted} ({'; '.join(self.plan.differences(wanted))}). Train against a store "
                              "extracted with this config's views, or set extract.views, view_seed and augment "
                              "to the store's")
        self._allocate(combined, n_clips, device)  # filled by start_epoch
        self.temperature, self.fill = config.student.kd.temperature, config.student.kd.topk_fill
        self.sample_rate, self.clip_samples = sample_rate, clip_samples
        self.view = -1

    def start_epoch(self, epoch: int) -> None:
        view = epoch % self.plan.count
        if view != self.view:
            self.view = view
            # tempered before the fill (kdpipe.topk), so the classes not kept get the fill's probability at any T
            self._fill(lambda start, stop: self.combined.read_view(view, self.fill, self.temperature, start, stop),
                       1.0)

    def augment(self, waves: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """This epoch's view of each clip, bit-identical to what the teachers heard on this device type."""
        return apply_views(waves, view_params(rows, self.view, self.plan.seed, self.plan.augment, self.sample_rate,
                                              self.clip_samples))


def learns_from_views(config: Config) -> bool:
    """Consistent teaching: the KD student learns each epoch's view from its stored target (`student.kd.views`;
    unset, whenever there are views)."""
    return config.student.kd.enabled and resolved_kd_views(config)


def resolved_kd_views(config: Config) -> bool:
    """`student.kd.views` with its default resolved: true when the teachers label views (extract.views > 0)."""
    return config.extract.views > 0 if config.student.kd.views is None else config.student.kd.views


def student_targets(combined: CombinedLogits, config: Config, n_clips: int, sample_rate: int, clip_samples: int,
                    device: torch.device) -> Targets:
    """The targets a KD student learns from: each epoch's view with views (consistent teaching), else the
    clean clips'."""
    if learns_from_views(config):
        return ViewTargets(combined, config, n_clips, sample_rate, clip_samples, device)
    return Targets(combined, n_clips, config.student.kd.temperature, device)


def mixed_term(own: torch.Tensor, partner: torch.Tensor | None, has: torch.Tensor, mixup: Mixup | None
               ) -> torch.Tensor:
    """The mean over clips of per-clip BCEs against the clip's own target (`own`) and, under mixup, its
    partner's (`partner`), renormalised over those that have a target (`has`, by clip): the module docstring."""
    if mixup is None:
        return (own * has).sum() / has.sum().clamp(min=1.0)
    own_share, partner_share = mixup.lam * has, (1.0 - mixup.lam) * has[mixup.perm]
    covered = own_share + partner_share
    counted = covered > 0
    per_clip = (own_share * own + partner_share * partner) / covered.clamp(min=torch.finfo(covered.dtype).tiny)
    return torch.where(counted, per_clip, torch.zeros_like(per_clip)).sum() / counted.sum().clamp(min=1)


def kd_loss(targets: Targets, labelled: torch.Tensor, label_weight: float) -> LossFn:
    """EfficientAT's KD loss over device-resident teacher probabilities, indexed by store row.

    `labelled` (N,) marks the rows with labels. Each term is averaged over the clips (under mixup,
    the renormalised pairs) that have its targets: the module docstring gives the formula.
    """

    def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)

    def loss(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, mixup: Mixup | None) -> torch.Tensor:
        teacher = targets.probabilities[rows]
        partner_labels = bce(logits, labels[mixup.perm]) if mixup else None
        partner_teacher = bce(logits, teacher[mixup.perm]) if mixup else None
        label_term = mixed_term(bce(logits, labels), partner_labels, labelled[rows], mixup)
        kd_term = mixed_term(bce(logits, teacher), partner_teacher, targets.present[rows], mixup)
        return label_weight * label_term + (1.0 - label_weight) * kd_term

    return loss
