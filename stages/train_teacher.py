"""Stage `train-teacher/<name>`: train or fine-tune one teacher on the prepared store, labels only.

One stage per teacher entry without a `checkpoint`. Inputs: the prepare
stage's store and the optional `init` weights. Parameters: the teacher's entry,
`teacher_training.*` (except loader workers), `evaluation.split` and `seed`.
Outputs: `best.pt` (the epoch with the best eval mAP, a plain state dict that
`load_checkpoint` and extract-teachers read), `last.pt`, `metrics.jsonl`.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from kdpipe import devices, frontends, loader, models, training
from kdpipe.models import ast, mobilenet, passt
from kdpipe.config import UNKEYED_TRAINING, Config, TeacherConfig, to_plain
from kdpipe.models import create_model, load_checkpoint
from kdpipe.stage import Stage, StageContext
from kdpipe.training import FitSettings
from kdpipe.waveform_store import WaveformStore

PREFIX = "train-teacher/"


def stage_name(teacher: TeacherConfig) -> str:
    return PREFIX + teacher.label


def build_teacher(teacher: TeacherConfig, num_classes: int) -> torch.nn.Module:
    """The teacher's architecture with the run's class count, started from `init` when given."""
    model = create_model(teacher.arch, **{"num_classes": num_classes, **teacher.options})
    if teacher.init is not None:
        load_checkpoint(model, teacher.init)
    return model


def run_for(teacher: TeacherConfig):
    def run(ctx: StageContext) -> dict[str, Any]:
        config = ctx.config
        settings = config.teacher_training
        store_path = ctx.upstream["prepare"] / "waveforms.zarr"
        store = WaveformStore.open(store_path)
        train_rows, eval_rows = training.train_and_eval_rows(store, config.evaluation.split, stage_name(teacher))
        torch.manual_seed(config.seed)  # the initial weights too: a rerun trains the same teacher
        model = build_teacher(teacher, len(store.classes))
        frontend = frontends.build_frontend(model.frontend_config, store.sample_rate)
        labels = store.column("labels")[train_rows]
        weights = loader.class_balanced_weights(labels) if settings.balanced_sampling else np.ones(len(train_rows))
        epoch_batches = training.weighted_epochs(train_rows, weights, settings.epoch_samples or len(train_rows),
                                                 settings.batch_size, config.seed)
        best = training.fit(model, frontend, store_path, epoch_batches, eval_rows, training.label_loss, FitSettings(
            epochs=settings.epochs, lr=settings.lr, optimizer=settings.optimizer,
            weight_decay=settings.weight_decay, warmup_epochs=settings.warmup_epochs,
            rampdown_start=settings.rampdown_start, rampdown_epochs=settings.rampdown_epochs,
            last_lr_factor=settings.last_lr_factor, mixup_alpha=settings.mixup_alpha,
            eval_batch_size=config.evaluation.batch_size, num_workers=settings.num_workers, seed=config.seed,
            precision=settings.precision, compile=settings.compile,
        ), ctx.out_dir, devices.resolve_device(config.device))
        return {"arch": teacher.arch, "best_epoch": best["epoch"], "mAP": best["mAP"], "mAUC": best["mAUC"],
                "d_prime": best["d_prime"], "parameters": sum(p.numel() for p in model.parameters())}

    return run


def stage_for(teacher: TeacherConfig) -> Stage:
    training_keys = [key for key in to_plain(Config().teacher_training) if key not in UNKEYED_TRAINING]
    return Stage(
        name=stage_name(teacher),
        params=(*(f"teacher_training.{key}" for key in training_keys), "evaluation.split", "seed"),
        param_values=lambda config: {
            "teacher": config.teacher(teacher.label).model_dump(mode="json", exclude={"weight"})},
        outputs=("best.pt", "last.pt", "metrics.jsonl"),
        run=run_for(teacher),
        code=(sys.modules[__name__], training, loader, frontends, models, mobilenet, passt, ast),
        upstream=("prepare",),
        inputs=lambda config: {"init": teacher.init} if teacher.init else {},
        resumable=True,
    )
