"""Stage `train-teacher/<name>`: train or fine-tune one teacher on the prepared store, labels only.

One stage per teacher entry without a `checkpoint`. Inputs: the prepare
stage's store and the optional `init` weights. Parameters: the teacher's entry,
`teacher_training`, `evaluation.split` and `seed`. Outputs: `best.pt` (the
epoch with the best eval mAP, a plain state dict that `load_checkpoint` and
extract-teachers read), `last.pt`, `metrics.jsonl`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from kdpipe import devices, frontends, stage_names, training
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
        train_rows, eval_rows = training.train_and_eval_rows(store, config.evaluation.split, name)
        torch.manual_seed(config.seed)  # the initial weights too: a rerun trains the same teacher
        model = build_teacher(teacher, len(store.classes))
        frontend = frontends.build_frontend(model.frontend_config, store.sample_rate)
        best = training.fit(model, frontend, store_path, training.epoch_plan(store, train_rows, settings, config.seed),
                            eval_rows, training.label_loss,
                            settings.fit_settings(config.evaluation.batch_size, config.seed),
                            ctx.out_dir, devices.resolve_device(config.device))
        return {"arch": teacher.arch, "best_epoch": best["epoch"], "mAP": best["mAP"], "mAUC": best["mAUC"],
                "d_prime": best["d_prime"], "parameters": sum(p.numel() for p in model.parameters())}

    return run


def stages(config: Config) -> list[Stage]:
    """One stage per teacher without a checkpoint."""
    return [Stage(
        name=stage_names.train_teacher(teacher.label),
        command=f"train-teacher --teacher {teacher.label}",
        params=("teacher_training", "evaluation.split", "seed"),
        param_values=lambda config, label=teacher.label: {
            "teacher": {k: v for k, v in keyed_values(config.teacher(label)).items() if k != "weight"}},
        outputs=("best.pt", "last.pt", "metrics.jsonl"),
        run=run_for(teacher),
        code=(sys.modules[__name__],),
        upstream=(stage_names.PREPARE,),
        inputs=lambda config, init=teacher.init: {"init": init} if init else {},
        resumable=True,
    ) for teacher in config.teachers if teacher.trainable]
