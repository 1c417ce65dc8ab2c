"""Stage `train-teacher/<name>`: train or fine-tune one teacher on the prepared store, labels only.

One stage per teacher entry without a `checkpoint`. Inputs: the prepare
stage's store and the optional `init` weights. Parameters: the teacher's entry,
`teacher_training`, `data.validation_fraction` and `seed`. Outputs: `model.pt`
(the kept epoch, by `teacher_training.keep`: a plain state dict that
`load_checkpoint` and extract-teachers read), `kept.json` (which epoch and why),
`last.pt`, `metrics.jsonl` (kdpipe.training). The evaluation split is never read.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from kdpipe import devices, frontends, splits, stage_names, training
from kdpipe.config import Config, TeacherConfig, keyed_values
from kdpipe.stage import Stage, StageContext
from kdpipe.teachers import build_teacher
from kdpipe.waveform_store import STORE_FILE, WaveformStore


def run_for(teacher: TeacherConfig):
    def run(ctx: StageContext) -> dict[str, Any]:
        config = ctx.config
        settings = config.teacher_training
        store_path = ctx.upstream[stage_names.PREPARE] / STORE_FILE
        store = WaveformStore.open(store_path)
        name = stage_names.train_teacher(teacher.label)
        rows = splits.training_splits(store, config.data.validation_fraction, name)
        splits.require_validation(rows, settings.keep, "teacher_training.keep")
        torch.manual_seed(config.seed)  # the initial weights too: a rerun trains the same teacher
        model = build_teacher(teacher, len(store.classes))
        frontend = frontends.build_frontend(model.frontend_config, store.sample_rate)
        kept = training.fit(model, frontend, store_path, training.epoch_plan(store, rows.train, settings, config.seed),
                            rows, training.label_loss, settings.fit_settings(config.evaluation.batch_size, config.seed),
                            ctx.out_dir, devices.resolve_device(config.device))
        return {"arch": teacher.arch, **kept, "parameters": sum(p.numel() for p in model.parameters())}

    return run


def stages(config: Config) -> list[Stage]:
    """One stage per teacher without a checkpoint."""
    return [Stage(
        name=stage_names.train_teacher(teacher.label),
        command=f"train-teacher --teacher {teacher.label}",
        params=("teacher_training", "data.validation_fraction", "seed"),
        param_values=lambda config, label=teacher.label: {
            "teacher": {k: v for k, v in keyed_values(config.teacher(label)).items() if k != "weight"}},
        outputs=training.OUTPUTS,
        run=run_for(teacher),
        code=(sys.modules[__name__],),
        upstream=(stage_names.PREPARE,),
        inputs=lambda config, init=teacher.init: {"init": init} if init else {},
        resumable=True,
    ) for teacher in config.teachers if teacher.trainable]
