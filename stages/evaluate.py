"""`evaluate`: every teacher, the ensemble and every student of the run, scored on the same clips, and a report.

Inputs: the waveform store, extract-teachers' logits (when the run has
teachers), train-student's `best.pt`, and the no-KD baseline's when it has
been built (train-student under the same config with `student.kd.enabled=false`;
its key is a parameter, so building the baseline later makes this stage stale).
Parameters: `evaluation.split`. Outputs: `metrics.json`, `per_class_ap.csv`,
`report.md` and the PNG plots it links.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from kdpipe import bench, console, devices, evaluate, logits_store, metrics, report, training
from kdpipe.config import Config, to_plain
from kdpipe.errors import KdpipeError
from kdpipe.evaluate import Evaluation, ModelResult
from kdpipe.extraction import Teacher, TeacherSpec
from kdpipe.frontends import build_frontend
from kdpipe.loader import BatchLoader
from kdpipe.models import load_checkpoint
from kdpipe.models.windowing import clip_forward
from kdpipe.runner import Pipeline
from kdpipe.stage import Stage, StageContext
from kdpipe.waveform_store import WaveformStore
from kdpipe.stages import train_student
from kdpipe.stages.extract_teachers import NAME as EXTRACT

NAME = "evaluate"
STUDENT = train_student.NAME


class Baseline(NamedTuple):
    config: Config
    key: str
    folder: Path


def baseline_config(config: Config) -> Config:
    """The run's no-KD baseline: the same config with `student.kd.enabled=false`."""
    plain = to_plain(config)
    plain["student"]["kd"]["enabled"] = False
    return Config.model_validate(plain)


def built_baseline(config: Config) -> Baseline | None:
    """The no-KD baseline's train-student output, if the run's student uses KD and the baseline has been built."""
    if not config.student.kd.enabled:
        return None  # the run's own student is the baseline
    from kdpipe.stages import build_stages  # stages/__init__ imports this module

    baseline = baseline_config(config)
    pipeline = Pipeline(build_stages(baseline), baseline)
    key = pipeline.key(STUDENT)
    if pipeline.cache.record(STUDENT, key) is None:
        return None
    return Baseline(baseline, key, pipeline.cache.entry_dir(STUDENT, key))


def teacher_results(ctx: StageContext, store: WaveformStore, rows: np.ndarray, targets: np.ndarray,
                    device: torch.device) -> list[ModelResult]:
    """Each teacher and the ensemble from their stored logits; sizes and speeds of the teachers' models."""
    config = ctx.config
    combined = logits_store.open_combined(ctx.upstream[EXTRACT] / "teachers.zarr")
    results = []
    for teacher in console.track(config.teachers, len(config.teachers), "scoring teachers"):
        array = combined[f"teachers/{teacher.label}/logits"]
        result = evaluate.score(f"teacher_{teacher.label}", f"teacher {teacher.label}", "teacher",
                                teacher.arch or "imported logits", targets, array.oindex[rows, :])
        if teacher.logits is None:  # a model to measure (imported logits come without one)
            loaded = Teacher(TeacherSpec(teacher.label, teacher.arch, Path(array.attrs["checkpoint"]),
                                         dict(teacher.options), dict(teacher.frontend), config.extract.precision),
                             store.sample_rate, device, config.evaluation.batch_size)
            result.footprint = evaluate.measure_footprint(loaded.model, loaded.logits, config.data.clip_seconds,
                                                          store.clip_samples, config.evaluation.batch_size, device)
        results.append(result)
    ensemble = evaluate.score("ensemble", "teacher ensemble", "ensemble",
                              f"{config.extract.ensemble} mean of {len(config.teachers)}",
                              targets, combined["ensemble/logits"].oindex[rows, :])
    footprints = [r.footprint for r in results]
    if all(footprints):
        ensemble.footprint = evaluate.combined_footprint(footprints)
    return [*results, ensemble]


def kept_students(folder: Path, config: Config, num_classes: int) -> dict[str, nn.Module]:
    """The students a train-student output kept, by representation, weights loaded.

    Multi-representation runs keep plain students under students/ (every one with `student.keep: all`);
    otherwise the one student that student.json describes.
    """
    kept = {path.stem: load_checkpoint(train_student.build_student(config, num_classes, path.stem), path)
            for path in sorted((folder / "students").glob("*.pt"))}
    return kept or {"mel": train_student.trained_student(folder, config, num_classes)}


def student_results(model_id: str, label: str, config: Config, folder: Path, store_path: Path, rows: np.ndarray,
                    targets: np.ndarray, device: torch.device) -> list[ModelResult]:
    """Each kept student of a train-student output: run over the evaluation clips, its size and speed, its curves."""
    store = WaveformStore.open(store_path)
    arch = config.student.arch + (f" w{config.student.width:g}" if config.student.arch == "mobilenetv3" else "")
    results = []
    reader = BatchLoader(store_path, num_workers=config.student.num_workers, pin_memory=device.type == "cuda")
    for representation, model in kept_students(folder, config, len(store.classes)).items():
        member = representation if config.student.representations else None
        model = model.to(device).eval()
        frontend = build_frontend(model.frontend_config, store.sample_rate).to(device).eval()
        named = f"{label} ({member})" if member else label
        logits = training.predict(model, frontend, reader, rows, config.evaluation.batch_size, device,
                                  f"predicting {named}")
        result = evaluate.score(f"{model_id}_{member}" if member else model_id, named, "student",
                                f"{arch}, {member}" if member else arch, targets, logits)
        result.footprint = evaluate.measure_footprint(
            model, lambda waves: clip_forward(model, frontend(waves.to(device).float() / 32768.0)),
            config.data.clip_seconds,
            store.clip_samples, config.evaluation.batch_size, device)
        result.history = evaluate.read_history(folder / "metrics.jsonl", member)
        results.append(result)
    return results


def run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    split = config.evaluation.split
    store_path = ctx.upstream["prepare"] / "waveforms.zarr"
    store = WaveformStore.open(store_path)
    rows = store.rows(split)
    if len(rows) == 0:
        raise KdpipeError(f"evaluation.split: the store has no decoded clips in split '{split}'")
    targets = store.column("labels")[rows].astype(bool)
    device = devices.resolve_device(config.device)
    results = teacher_results(ctx, store, rows, targets, device) if EXTRACT in ctx.upstream else []
    kd = config.student.kd.enabled
    students = [("student_kd" if kd else "student_no_kd", f"student, {'with' if kd else 'no'} KD", config,
                 ctx.upstream[STUDENT])]
    baseline = built_baseline(config)
    if baseline is not None:
        students.append(("student_no_kd", "student, no KD", baseline.config, baseline.folder))
    for student in students:
        results += student_results(*student, store_path, rows, targets, device)
    evaluation = Evaluation(split, store.classes, targets.sum(axis=0), len(rows), config.data.clip_seconds,
                            [str(source.path) for source in config.data.sources], bench.device_name(device), results)
    evaluate.write_results(evaluation, ctx.out_dir)
    report.write_report(evaluation, ctx.out_dir)  # the commands that build this stage print its path
    for result in results:
        console.info(f"  {result.label:<24} mAP {result.metrics['mAP']:.4f}  lwlrap {result.metrics['lwlrap']:.4f}")
    return {"split": split, "clips": len(rows), "mAP": {r.label: r.metrics["mAP"] for r in results}}


def available(config: Config) -> bool:
    """Something to evaluate: a student (the KD one needs teachers, which are then evaluated too)."""
    return train_student.available(config)


def stage(config: Config) -> Stage:
    return Stage(
        name=NAME,
        params=("evaluation.split",),
        param_values=lambda config: {"baseline": baseline.key if (baseline := built_baseline(config)) else None},
        outputs=("metrics.json", "per_class_ap.csv", "report.md"),
        run=run,
        code=(sys.modules[__name__], evaluate, report, metrics, training.predict, bench.inference_clips_per_second),
        upstream=("prepare", *((EXTRACT,) if config.teachers else ()), STUDENT),
    )
