"""`evaluate`: every teacher, the ensemble and every student of the run, scored on the same clips, and a report.

Inputs: the waveform store, extract-teachers' logits (when the run has
teachers), and the kept weights of each student stage of the run: the KD
student and, when the config has it, the no-KD baseline (`evaluation.baseline`).
Parameters: `evaluation.split`. Outputs: `metrics.json`, `per_class_ap.csv`,
`report.md` and the PNG plots it links. This is the only stage that reads the
evaluation split: every model it scores was kept without it (kdpipe.splits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe import bench, console, devices, evaluate, metrics, report, splits, stage_names, students, training
from kdpipe.config import Config
from kdpipe.evaluate import Evaluation, ModelResult
from kdpipe.extraction import Teacher, TeacherSpec
from kdpipe.frontends import build_frontend, int16_to_float
from kdpipe.loader import BatchLoader
from kdpipe.logits_store import CombinedLogits
from kdpipe.models.windowing import clip_forward
from kdpipe.stage import Stage, StageContext
from kdpipe.students import kept_students
from kdpipe.waveform_store import STORE_FILE, WaveformStore


def teacher_results(ctx: StageContext, store: WaveformStore, rows: np.ndarray, targets: np.ndarray,
                    device: torch.device) -> list[ModelResult]:
    """Each teacher and the ensemble from their stored logits; sizes and speeds of the teachers' models."""
    config = ctx.config
    combined = CombinedLogits.in_folder(ctx.upstream[stage_names.ENSEMBLE])
    results = []
    for teacher in console.track(config.teachers, len(config.teachers), "scoring teachers"):
        result = evaluate.score(f"teacher_{teacher.label}", f"teacher {teacher.label}", "teacher",
                                teacher.arch or "imported logits", targets, combined.read(teacher.label, rows))
        if teacher.logits is None:  # a model to measure (imported logits come without one)
            checkpoints = tuple(Path(path) for path in combined.attributes(teacher.label)["checkpoints"])
            if teacher.trainable:  # trained by train-teacher: its record of the kept epoch is beside it
                result.kept = kept_teacher(checkpoints)
            loaded = Teacher(TeacherSpec(name=teacher.label, arch=teacher.arch, checkpoints=checkpoints,
                                         options=dict(teacher.options), frontend=dict(teacher.frontend),
                                         precision=config.extract.precision),
                             store.sample_rate, device, config.evaluation.batch_size)
            result.footprint = evaluate.measure_footprint(loaded.model, loaded.logits, config.data.clip_seconds,
                                                          store.clip_samples, config.evaluation.batch_size, device)
        results.append(result)
    ensemble = evaluate.score("ensemble", "teacher ensemble", "ensemble",
                              f"{config.extract.ensemble} mean of {len(config.teachers)}",
                              targets, combined.read(rows=rows))
    footprints = [r.footprint for r in results]
    if all(footprints):
        ensemble.footprint = evaluate.combined_footprint(footprints)
    return [*results, ensemble]


def kept_teacher(checkpoints: tuple[Path, ...]) -> str:
    """Which epoch a trained teacher is, and why (for each of its models when cross-fitted)."""
    reasons = [training.read_kept(path.parent)["reason"] for path in checkpoints]
    if len(reasons) == 1:
        return reasons[0]
    return f"{len(reasons)} cross-fitted models, " + "; ".join(f"fold {f}: {r}" for f, r in enumerate(reasons))


def student_results(model_id: str, label: str, config: Config, folder: Path, store_path: Path, rows: np.ndarray,
                    targets: np.ndarray, device: torch.device) -> list[ModelResult]:
    """Each kept student of a train-student output: run over the evaluation clips, its size and speed, its curves."""
    store = WaveformStore.open(store_path)
    arch, width = students.canonical_arch(config.student.arch, config.student.width)
    arch += "" if width is None else f" w{width:g}"
    results = []
    reader = BatchLoader(store_path, num_workers=config.student.num_workers, pin_memory=device.type == "cuda")
    for representation, model in kept_students(folder, config.student, len(store.classes)).items():
        member = representation if config.student.representations else None
        model = model.to(device).eval()
        frontend = build_frontend(model.frontend_config, store.sample_rate).to(device).eval()
        named = f"{label} ({member})" if member else label
        logits = training.predict(model, frontend, reader, rows, config.evaluation.batch_size, device,
                                  f"predicting {named}")
        result = evaluate.score(f"{model_id}_{member}" if member else model_id, named, "student",
                                f"{arch}, {member}" if member else arch, targets, logits)
        result.footprint = evaluate.measure_footprint(
            model, lambda waves: clip_forward(model, frontend(int16_to_float(waves.to(device)))),
            config.data.clip_seconds,
            store.clip_samples, config.evaluation.batch_size, device)
        result.history = evaluate.read_history(folder / training.METRICS, member)
        result.kept = training.read_kept(folder)["reason"]
        results.append(result)
    return results


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    split = config.evaluation.split
    store_path = ctx.upstream[stage_names.PREPARE] / STORE_FILE
    store = WaveformStore.open(store_path)
    rows = splits.evaluation_rows(store, split)
    targets = store.labels(rows)
    device = devices.resolve_device(config.device)
    results = teacher_results(ctx, store, rows, targets, device) if stage_names.ENSEMBLE in ctx.upstream else []
    for kd in (True, False):
        if stage_names.student(kd) in ctx.upstream:
            results += student_results("student_kd" if kd else "student_no_kd",
                                       f"student, {'with' if kd else 'no'} KD", config,
                                       ctx.upstream[stage_names.student(kd)], store_path, rows, targets, device)
    evaluation = Evaluation(split, store.classes, targets.sum(axis=0), len(rows), config.data.clip_seconds,
                            [str(source.path) for source in config.data.sources], bench.device_name(device), results)
    evaluate.write_results(evaluation, ctx.out_dir)
    report.write_report(evaluation, ctx.out_dir)  # the commands that build this stage print its path
    for result in results:
        console.info(f"  {result.label:<24} mAP {result.metrics['mAP']:.4f}  lwlrap {result.metrics['lwlrap']:.4f}")
    return {"split": split, "clips": len(rows), "mAP": {r.label: r.metrics["mAP"] for r in results}}


def stages(config: Config) -> list[Stage]:
    """The evaluation of the run's students (none without one) and of its teachers."""
    scored = stage_names.students(config)
    if not scored:
        return []
    return [Stage(
        name=stage_names.EVALUATE,
        command="evaluate",
        params=("evaluation.split",),
        outputs=("metrics.json", "per_class_ap.csv", "report.md"),
        run=run,
        code=(run, teacher_results, kept_teacher, student_results, evaluate, report, metrics, training.predict,
              bench.inference_clips_per_second),
        upstream=(stage_names.PREPARE, *((stage_names.ENSEMBLE,) if config.teachers else ()), *scored),
    )]
