"""Stage two: `train-student` trains a student against the stored teacher targets (EfficientAT's recipe);
`train-student/no-kd` trains the same student on the labels alone, the baseline KD is measured against.

Inputs: the waveform store and, with KD, the ensemble logits of extract-teachers.
Parameters: `student` (its `kd` settings only with KD), `evaluation.split`, `seed`.
Outputs: `best.pt` (best eval mAP), `last.pt`, `metrics.jsonl`, and `student.json`,
which says how to rebuild the kept student (kdpipe.students reads it). In
multi-representation mode `best.pt` / `last.pt` hold the whole group and
`students/<representation>.pt` the plain students kept. Under torchrun every rank
runs the stage; rank 0 alone writes.

A config with `student.kd.enabled: false` has only the baseline, and its key is the
one the baseline of the same config with KD has: one build serves both.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from kdpipe import collaborative, devices, distill, frontends, stage_names, students, training
from kdpipe.config import Config, keyed_values
from kdpipe.logits_store import CombinedLogits
from kdpipe.stage import Stage, StageContext
from kdpipe.waveform_store import STORE_FILE, WaveformStore


def run_for(kd: bool):
    def run(ctx: StageContext) -> dict[str, Any]:
        config, ranks = ctx.config, ctx.ranks
        student = config.student
        name = stage_names.student(kd)
        store_path = ctx.upstream[stage_names.PREPARE] / STORE_FILE
        store = WaveformStore.open(store_path)
        train_rows, eval_rows = training.train_and_eval_rows(store, config.evaluation.split, name)
        device = devices.resolve_device(config.device, ranks)
        seed = config.seed if student.seed is None else student.seed
        torch.manual_seed(seed)
        n_classes = len(store.classes)
        if student.representations:
            model, frontend = students.build_group(student, n_classes, store.sample_rate)
        else:
            model = students.build_student(student, n_classes)
            frontend = frontends.build_frontend(model.frontend_config, store.sample_rate)
        loss_fn = training.label_loss
        if kd:
            targets, present = distill.teacher_targets(CombinedLogits.in_folder(ctx.upstream[stage_names.ENSEMBLE]),
                                                       store.n_clips, student.kd.temperature, device)
            loss_fn = distill.kd_loss(targets, present, student.kd.label_weight)
        if student.representations:
            loss_fn = collaborative.collaborative_loss(loss_fn, student.mutual_weight)
        best = training.fit(model, frontend, store_path, training.epoch_plan(store, train_rows, student, seed),
                            eval_rows, loss_fn, student.fit_settings(config.evaluation.batch_size, seed),
                            ctx.out_dir, device, ranks)
        if not ranks.is_main:
            return {}
        representation, weights = "mel", "best.pt"
        if isinstance(model, collaborative.StudentGroup):
            representation = best["best_member"]
            weights = students.keep_members(ctx.out_dir, model, representation, student.keep)
        kept = students.describe(ctx.out_dir, student, n_classes, representation, weights)
        summary = {"arch": student.arch, "kd": kd, "representation": representation, "best_epoch": best["epoch"],
                   "mAP": best["mAP"], "mAUC": best["mAUC"], "d_prime": best["d_prime"],
                   "parameters": sum(p.numel() for p in kept.parameters())}
        if "members" in best:
            summary["members"] = {member: metrics["mAP"] for member, metrics in best["members"].items()}
        return summary

    return run


def stage(kd: bool) -> Stage:
    """The student with KD (upstream: the ensemble) or without it (labels only; `student.kd` not in its key)."""
    return Stage(
        name=stage_names.student(kd),
        command="train-student" if kd else "train-student --baseline",
        params=("evaluation.split", "seed"),
        param_values=lambda config: {"student": {key: value for key, value in keyed_values(config.student).items()
                                                 if kd or key != "kd"}},
        outputs=("best.pt", "last.pt", "metrics.jsonl", students.DESCRIPTION),
        run=run_for(kd),
        code=(sys.modules[__name__],),
        upstream=(stage_names.PREPARE, stage_names.ENSEMBLE) if kd else (stage_names.PREPARE,),
        resumable=True,
    )


def stages(config: Config) -> list[Stage]:
    """The KD student, the baseline, or both (stage_names.students says which)."""
    return [stage(name == stage_names.STUDENT) for name in stage_names.students(config)]
