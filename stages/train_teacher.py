"""Stage `train-teacher/<name>`: train or fine-tune one teacher on the prepared store, labels only.

One stage per teacher entry without a `checkpoint`. Inputs: the prepare
stage's store and the optional `init` weights (the body loads strictly; a head of
other classes starts afresh, kdpipe.students.start_from). Parameters: the teacher's entry,
`teacher_training`, `data.validation_fraction` and `seed`. Outputs: `model.pt`
(the kept epoch, by `teacher_training.keep`: a plain state dict that
`load_checkpoint` and extract-teachers read), `kept.json` (which epoch and why),
`last.pt`, `metrics.jsonl` (kdpipe.training). The evaluation split is never read.

With `teacher_training.folds` = k > 1 (cross-fitting) the same four files are in
`fold0/` ... `fold<k-1>/`, one model per fold trained without that fold's train
clips, and `unseen_fold.npy` says which model never saw each row (kdpipe.teachers).
A teacher that labels the clips it was trained on repeats their labels, gaps
included; a cross-fitted one labels each train clip as it labels unseen audio.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe import atomic, devices, frontends, splits, stage_names, students, training
from kdpipe.config import Config, TeacherConfig, keyed_values
from kdpipe.stage import Stage, StageContext
from kdpipe.teachers import UNSEEN, build_teacher, fold_dir
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
        if settings.folds == 1:
            return train_one(teacher, config, store, rows, ctx.out_dir, config.seed)
        fold = splits.folds_of(store.column("clip_id")[rows.train], settings.folds)
        kept = []
        for f in range(settings.folds):
            out_dir = ctx.out_dir / fold_dir(f)
            if (out_dir / training.KEPT).is_file() and not (out_dir / training.RESUME).exists():
                kept.append(training.read_kept(out_dir))  # finished before an interruption
                continue
            out_dir.mkdir(exist_ok=True)
            fold_rows = replace(rows, train=rows.train[fold != f])
            kept.append(train_one(teacher, config, store, fold_rows, out_dir, config.seed + f))
        unseen = np.full(store.n_clips, -1, dtype=np.int8)
        unseen[rows.train] = fold
        atomic.write(ctx.out_dir / UNSEEN, lambda tmp: _save_npy(tmp, unseen))
        return {"arch": teacher.arch, "folds": kept, "clips_per_fold": np.bincount(fold, minlength=settings.folds
                                                                                   ).tolist()}

    return run


def train_one(teacher: TeacherConfig, config: Config, store: WaveformStore, rows: splits.TrainingSplits,
              out_dir: Path, seed: int) -> dict[str, Any]:
    """One model of the teacher trained on `rows.train` into `out_dir` (training.OUTPUTS); its kept record."""
    settings = config.teacher_training
    torch.manual_seed(seed)  # the initial weights too: a rerun trains the same teacher
    model = build_teacher(teacher, len(store.classes))
    started = students.start_from(model, teacher.init, f"teachers.{teacher.label}.init")
    frontend = frontends.build_frontend(model.frontend_config, store.sample_rate)
    fit_settings = training.FitSettings.from_config(settings, config.evaluation.batch_size, seed)
    kept = training.fit(model, frontend, store.path, training.epoch_plan(store, rows.train, settings, seed),
                        rows, training.label_loss, fit_settings, out_dir, devices.resolve_device(config.device))
    return {"arch": teacher.arch, **started, **kept, "parameters": sum(p.numel() for p in model.parameters())}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would append ".npy" to the temporary name
        np.save(handle, array, allow_pickle=False)


def outputs(folds: int) -> tuple[str, ...]:
    """training.OUTPUTS, or the same in every fold's folder and the unseen-fold record."""
    if folds == 1:
        return training.OUTPUTS
    return (*(f"{fold_dir(f)}/{path}" for f in range(folds) for path in training.OUTPUTS), UNSEEN)


def stages(config: Config) -> list[Stage]:
    """One stage per teacher without a checkpoint."""
    return [Stage(
        name=stage_names.train_teacher(teacher.label),
        command=f"train-teacher --teacher {teacher.label}",
        params=("teacher_training", "data.validation_fraction", "seed"),
        param_values=lambda config, label=teacher.label: {
            "teacher": {k: v for k, v in keyed_values(config.teacher(label)).items() if k != "weight"}},
        outputs=outputs(config.teacher_training.folds),
        run=run_for(teacher),
        code=(sys.modules[__name__],),
        upstream=(stage_names.PREPARE,),
        inputs=lambda config, init=teacher.init: {"init": init} if init else {},
        resumable=True,
    ) for teacher in config.teachers if teacher.trainable]
