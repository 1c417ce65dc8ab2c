"""Stage two: `train-student` trains a student against the stored teacher targets (EfficientAT's recipe).

Inputs: the waveform store and, with KD on, the ensemble logits of
extract-teachers. Parameters: `student.*`, `evaluation.split`, `seed`.
Outputs: `best.pt` (best eval mAP, a plain state dict), `last.pt`, `metrics.jsonl`.

Loss = λ·BCE(student, labels) + (1 − λ)·BCE(student, sigmoid(teacher / T)),
mixup on the spectrogram with the KD term mixed in loss space; clips without
a teacher row contribute no KD term.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from pipeline import frontends, loader, models, training
from pipeline.config import Config, StudentConfig
from pipeline.errors import KdpipeError
from pipeline.models import create_model, mobilenet
from pipeline.stage import Stage, StageContext
from pipeline.training import FitSettings, LossFn, Mixup
from pipeline.waveform_store import WaveformStore
from stages.extract_teachers import NAME as EXTRACT

NAME = "train-student"


def build_student(config: Config, num_classes: int) -> torch.nn.Module:
    """The student architecture; `student.width` applies to the width-free `mobilenetv3` entry."""
    student = config.student
    extra = {"width": student.width} if student.arch == "mobilenetv3" else {}
    return create_model(student.arch, **{"num_classes": num_classes, **extra, **student.options})


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


def teacher_targets(ctx: StageContext, n_clips: int, temperature: float,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """sigmoid(ensemble / T) for every store row, on the device, and which rows have a teacher."""
    logits = zarr.open_group(ctx.upstream[EXTRACT] / "teachers.zarr", mode="r")["ensemble/logits"][:]
    if logits.shape[0] != n_clips:
        raise KdpipeError(f"teacher logits have {logits.shape[0]} rows, the store {n_clips}")
    logits = logits.astype(np.float32)
    present = np.isfinite(logits).all(axis=1)
    probabilities = 1.0 / (1.0 + np.exp(-np.nan_to_num(logits) / temperature))
    return (torch.from_numpy(probabilities).to(device),
            torch.from_numpy(present.astype(np.float32)).to(device))


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    student = config.student
    store_path = ctx.upstream["prepare"] / "waveforms.zarr"
    store = WaveformStore.open(store_path)
    train_rows, eval_rows = training.train_and_eval_rows(store, config.evaluation.split, NAME)
    device = training.resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_student(config, len(store.classes))
    frontend = frontends.build_frontend(model.frontend_config, store.sample_rate)
    if student.kd.enabled:
        targets, present = teacher_targets(ctx, store.n_clips, student.kd.temperature, device)
        loss_fn = kd_loss(targets, present, student.kd.label_weight)
    else:
        loss_fn = training.label_loss
    weights = loader.class_balanced_weights(store.column("labels")[train_rows])
    epoch_batches = training.weighted_epochs(train_rows, weights, student.epoch_samples, student.batch_size,
                                             config.seed)
    best = training.fit(model, frontend, store_path, epoch_batches, eval_rows, loss_fn, FitSettings(
        epochs=student.epochs, lr=student.lr, optimizer="adam", weight_decay=0.0,
        warmup_epochs=student.warmup_epochs, rampdown_start=student.rampdown_start,
        rampdown_epochs=student.rampdown_epochs, last_lr_factor=student.last_lr_factor,
        mixup_alpha=student.mixup_alpha, eval_batch_size=config.evaluation.batch_size,
        num_workers=student.num_workers, seed=config.seed,
    ), ctx.out_dir, device)
    return {"arch": student.arch, "kd": student.kd.enabled, "best_epoch": best["epoch"], "mAP": best["mAP"],
            "mAUC": best["mAUC"], "d_prime": best["d_prime"],
            "parameters": sum(p.numel() for p in model.parameters())}


def available(config: Config) -> bool:
    """KD needs teachers; the no-KD baseline does not."""
    return bool(config.teachers) or not config.student.kd.enabled


def stage(config: Config) -> Stage:
    kd = config.student.kd.enabled
    keyed = tuple(f"student.{key}" for key in StudentConfig.model_fields if key != "num_workers")
    return Stage(
        name=NAME,
        params=(*keyed, "evaluation.split", "seed"),
        outputs=("best.pt", "last.pt", "metrics.jsonl"),
        run=run,
        code=(sys.modules[__name__], training, loader, frontends, models, mobilenet),
        upstream=("prepare", EXTRACT) if kd else ("prepare",),
        resumable=True,
    )
