"""Stage two: `train-student` trains a student against the stored teacher targets (EfficientAT's recipe).

Inputs: the waveform store and, with KD on, the ensemble logits of
extract-teachers. Parameters: `student.*`, `evaluation.split`, `seed`.
Outputs: `best.pt` (best eval mAP), `last.pt`, `metrics.jsonl`, and `student.json`,
which says how to rebuild the kept student (architecture, frontend, weights file):
`trained_student()` reads it. In multi-representation mode `best.pt` / `last.pt`
hold the whole group and `students/<representation>.pt` the plain students kept.
Under torchrun every rank runs this stage; rank 0 alone writes.

Loss = λ·BCE(student, labels) + (1 − λ)·BCE(student, sigmoid(teacher / T)),
mixup on the spectrogram with the KD term mixed in loss space; clips without
a teacher row contribute no KD term.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe import atomic, collaborative, devices, distributed, frontends, loader, logits_store, models, training
from kdpipe.config import UNKEYED_TRAINING, Config, StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models import create_model, mobilenet
from kdpipe.stage import Stage, StageContext
from kdpipe.training import FitSettings, LossFn, Mixup
from kdpipe.waveform_store import WaveformStore
from kdpipe.stages.extract_teachers import NAME as EXTRACT

NAME = "train-student"


def build_student(config: Config, num_classes: int, representation: str = "mel") -> torch.nn.Module:
    """The student architecture; `student.width` applies to the width-free `mobilenetv3` entry.

    `representation` swaps the model's mel frontend for MFCC or STFT features of the same shape.
    """
    student = config.student
    extra = {"width": student.width} if student.arch == "mobilenetv3" else {}
    model = create_model(student.arch, **{"num_classes": num_classes, **extra, **student.options})
    if representation != "mel":
        model.frontend_config = frontends.representation_config(model.frontend_config, representation)
    return model


def trained_student(out_dir: Path, config: Config, num_classes: int) -> torch.nn.Module:
    """The kept student of a finished train-student output, weights loaded, `frontend_config` set."""
    description = json.loads((out_dir / "student.json").read_text())
    model = build_student(config, num_classes, description["representation"])
    models.load_checkpoint(model, out_dir / description["weights"])
    return model


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
    logits = logits_store.read_combined(ctx.upstream[EXTRACT] / "teachers.zarr", "ensemble/logits")
    if logits.shape[0] != n_clips:
        raise KdpipeError(f"teacher logits have {logits.shape[0]} rows, the store {n_clips}")
    logits = logits.astype(np.float32)
    present = np.isfinite(logits).all(axis=1)
    probabilities = 1.0 / (1.0 + np.exp(-np.nan_to_num(logits) / temperature))
    return (torch.from_numpy(probabilities).to(device),
            torch.from_numpy(present.astype(np.float32)).to(device))


def build_group(config: Config, num_classes: int, sample_rate: int
                ) -> tuple[collaborative.StudentGroup, collaborative.RepresentationFrontends]:
    """One student per configured representation, and their frontends."""
    students = {rep: build_student(config, num_classes, rep) for rep in config.student.representations}
    return (collaborative.StudentGroup(students), collaborative.RepresentationFrontends(
        {rep: frontends.build_frontend(model.frontend_config, sample_rate) for rep, model in students.items()}))


def keep_students(out_dir: Path, group: collaborative.StudentGroup, best: dict[str, Any], keep: str) -> str:
    """Write the kept members' best weights as plain students; returns the best member's weights file."""
    state = torch.load(out_dir / "best.pt", map_location="cpu", weights_only=True)
    (out_dir / "students").mkdir(exist_ok=True)
    kept = group.member_names if keep == "all" else (best["best_member"],)
    for name in kept:
        member = collaborative.member_state_dict(state, name)
        atomic.write(out_dir / "students" / f"{name}.pt", lambda tmp: torch.save(member, tmp))
    return f"students/{best['best_member']}.pt"


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    student = config.student
    ranks = distributed.current()
    store_path = ctx.upstream["prepare"] / "waveforms.zarr"
    store = WaveformStore.open(store_path)
    train_rows, eval_rows = training.train_and_eval_rows(store, config.evaluation.split, NAME)
    device = devices.resolve_device(config.device, ranks)
    seed = config.seed if student.seed is None else student.seed
    torch.manual_seed(seed)
    if student.representations:
        model, frontend = build_group(config, len(store.classes), store.sample_rate)
    else:
        model = build_student(config, len(store.classes))
        frontend = frontends.build_frontend(model.frontend_config, store.sample_rate)
    if student.kd.enabled:
        targets, present = teacher_targets(ctx, store.n_clips, student.kd.temperature, device)
        loss_fn = kd_loss(targets, present, student.kd.label_weight)
    else:
        loss_fn = training.label_loss
    if student.representations:
        loss_fn = collaborative.collaborative_loss(loss_fn, student.mutual_weight)
    weights = loader.class_balanced_weights(store.column("labels")[train_rows])
    epoch_batches = training.weighted_epochs(train_rows, weights, student.epoch_samples, student.batch_size,
                                             seed)
    best = training.fit(model, frontend, store_path, epoch_batches, eval_rows, loss_fn, FitSettings(
        epochs=student.epochs, lr=student.lr, optimizer="adam", weight_decay=0.0,
        warmup_epochs=student.warmup_epochs, rampdown_start=student.rampdown_start,
        rampdown_epochs=student.rampdown_epochs, last_lr_factor=student.last_lr_factor,
        mixup_alpha=student.mixup_alpha, eval_batch_size=config.evaluation.batch_size,
        num_workers=student.num_workers, seed=seed, precision=student.precision, compile=student.compile,
    ), ctx.out_dir, device, ranks)
    if not ranks.is_main:
        return {}
    representation, weights = "mel", "best.pt"
    if isinstance(model, collaborative.StudentGroup):
        representation = best["best_member"]
        weights = keep_students(ctx.out_dir, model, best, student.keep)
    kept = models.load_checkpoint(build_student(config, len(store.classes), representation), ctx.out_dir / weights)
    atomic.write_text(ctx.out_dir / "student.json", json.dumps(
        {"arch": student.arch, "representation": representation, "frontend": kept.frontend_config,
         "weights": weights}, indent=2))
    summary = {"arch": student.arch, "kd": student.kd.enabled, "representation": representation,
               "best_epoch": best["epoch"], "mAP": best["mAP"], "mAUC": best["mAUC"], "d_prime": best["d_prime"],
               "parameters": sum(p.numel() for p in kept.parameters())}
    if "members" in best:
        summary["members"] = {name: metrics["mAP"] for name, metrics in best["members"].items()}
    return summary


def available(config: Config) -> bool:
    """KD needs teachers; the no-KD baseline does not."""
    return bool(config.teachers) or not config.student.kd.enabled


def stage(config: Config) -> Stage:
    kd = config.student.kd.enabled
    keyed = tuple(f"student.{key}" for key in StudentConfig.model_fields if key not in UNKEYED_TRAINING)
    return Stage(
        name=NAME,
        params=(*keyed, "evaluation.split", "seed"),
        outputs=("best.pt", "last.pt", "metrics.jsonl", "student.json"),
        run=run,
        code=(sys.modules[__name__], training, loader, frontends, models, mobilenet, collaborative, distributed),
        upstream=("prepare", EXTRACT) if kd else ("prepare",),
        resumable=True,
    )
