"""Stage two: `train-student` trains a student against the stored teacher targets (EfficientAT's recipe);
`train-student/no-kd` trains the same student on the labels alone, the baseline KD is measured against.

Inputs: the waveform store, with KD the ensemble logits of extract-teachers, and the content of
`student.init` when given (the student starts from those weights; a head of other classes starts
afresh, kdpipe.students.start_from). Parameters: `student` (its `kd` settings only with KD; not
`init`'s path, whose content is the input), `data.validation_fraction`, `seed`.
Outputs: `model.pt` (the kept epoch, by `student.keep`), `kept.json` (which epoch and why),
`last.pt`, `metrics.jsonl` (kdpipe.training), and `student.json`, which says how to rebuild
the kept student (kdpipe.students reads it). In multi-representation mode `model.pt` /
`last.pt` hold the whole group and `students/<representation>.pt` the plain students kept
(the best on validation, or all of them). The evaluation split is never read. Under
torchrun every rank runs the stage; rank 0 alone writes.

With views (`extract.views` > 0, consistent teaching), the KD student hears view e mod K of
every clip at epoch e, rebuilt from its seed, and learns that view's target (kdpipe.distill).
Unlabelled train clips join a KD student's training for the KD term only, drawn for the classes
the teachers confidently hear in them (kdpipe.training.epoch_plan); the baseline leaves them out.

A config with `student.kd.enabled: false` has only the baseline, and its key is the
one the baseline of the same config with KD has: one build serves both.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from kdpipe import collaborative, devices, distill, frontends, splits, stage_names, students, training
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
        rows = splits.training_splits(store, config.data.validation_fraction, name, unlabelled=kd)
        splits.require_validation(rows, student.keep, "student.keep")
        if student.representations and student.keep_members == "best":
            splits.require_validation(rows, student.keep_members, "student.keep_members")
        device = devices.resolve_device(config.device, ranks)
        seed = config.seed if student.seed is None else student.seed
        torch.manual_seed(seed)
        n_classes = len(store.classes)
        if student.representations:
            model, frontend = students.build_group(student, n_classes, store.sample_rate)
        else:
            model = students.build_student(student, n_classes)
            frontend = frontends.build_frontend(model.frontend_config, store.sample_rate)
        started = students.start_from(model, student.init)
        loss_fn, targets, heard = training.label_loss, None, None
        if kd:
            combined = CombinedLogits.in_folder(ctx.upstream[stage_names.ENSEMBLE])
            targets = distill.student_targets(combined, config, store.n_clips, store.sample_rate,
                                              store.clip_samples, device)
            labelled = torch.from_numpy(store.labelled().astype(np.float32)).to(device)
            loss_fn = distill.kd_loss(targets, labelled, student.kd.label_weight)
            heard = distill.confident_classes(combined, student.kd.unlabelled_threshold)
        if student.representations:
            loss_fn = collaborative.collaborative_loss(loss_fn, student.mutual_weight)
        plan = training.epoch_plan(store, rows.train, student, seed, heard)
        fit_settings = training.FitSettings.from_config(student, config.evaluation.batch_size, seed)
        kept = training.fit(model, frontend, store_path, plan, rows, loss_fn, fit_settings, ctx.out_dir, device, ranks,
                            targets if distill.learns_from_views(config) else None)
        if not ranks.is_main:
            return {}
        representation, weights = "mel", training.MODEL
        if isinstance(model, collaborative.StudentGroup):
            validation = kept.get("validation_metrics")
            representation = validation["best_member"] if validation else model.member_names[0]
            weights = students.keep_members(ctx.out_dir, model, representation, student.keep_members)
        student_model = students.describe(ctx.out_dir, student, n_classes, representation, weights)
        return {"arch": student.arch, "kd": kd, "representation": representation, **started, **kept,
                "parameters": sum(p.numel() for p in student_model.parameters())}

    return run


def stage(kd: bool) -> Stage:
    """The student with KD (upstream: the ensemble) or without it (labels only; `student.kd` not in its key)."""
    return Stage(
        name=stage_names.student(kd),
        command="train-student" if kd else "train-student --baseline",
        params=("data.validation_fraction", "seed"),
        param_values=lambda config: {"student": {key: value for key, value in keyed_values(config.student).items()
                                                 if (kd or key != "kd") and key != "init"}},
        outputs=(*training.OUTPUTS, students.DESCRIPTION),
        run=run_for(kd),
        code=(sys.modules[__name__],),
        upstream=(stage_names.PREPARE, stage_names.ENSEMBLE) if kd else (stage_names.PREPARE,),
        inputs=lambda config: {"init": students.init_weights(config.student.init)} if config.student.init else {},
        resumable=True,
    )


def stages(config: Config) -> list[Stage]:
    """The KD student, the baseline, or both (stage_names.students says which)."""
    return [stage(name == stage_names.STUDENT) for name in stage_names.students(config)]
