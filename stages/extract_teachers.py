"""Stage one: `extract/<name>` runs one teacher over every clip; `extract-teachers` combines them.

`extract/<name>` (one per teacher) — inputs: the waveform store, the teacher's
checkpoint (a file, or its train-teacher output). Parameters: the teacher's
entry (not its weight), `extract.dtype`, `extract.chunk_clips`,
`extract.precision`, and with views `extract.views`, `view_seed`, `augment` (one
kdpipe.view_plan.ViewPlan). Output: `logits.zarr` (clean logits, and each view's, whole
or top-k, with the view plan recorded), resumed chunk by chunk after an interruption.

`extract-teachers` — inputs: every teacher's logits. Parameters: the ensemble
weights and mode. Output: `teachers.zarr` with each teacher's arrays (hard links,
no second copy), their one view plan and the ensemble of the clean clips; a view's
ensemble is computed when the student reads it. Changing weights recomputes only this cheap step and
adding a teacher computes only that teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from kdpipe import console, dask_engine, extraction, integrity, interop, logits_store, stage_names
from kdpipe.config import Config, TeacherConfig, keyed_values
from kdpipe.devices import resolve_device
from kdpipe.errors import KdpipeError
from kdpipe.extraction import Teacher, TeacherSpec
from kdpipe.fingerprint import sha256_file
from kdpipe.logits_store import COMBINED_FILE, TEACHER_FILE, CombinedLogits, TeacherLogits
from kdpipe.metrics import tagging_metrics
from kdpipe.models import create_model
from kdpipe.stage import Stage, StageContext
from kdpipe.teachers import checkpoint_paths, unseen_folds
from kdpipe.view_plan import ViewPlan
from kdpipe.waveform_store import STORE_FILE, WaveformStore


def eval_metrics(logits_of: Callable[[np.ndarray], np.ndarray], store: WaveformStore, split: str
                 ) -> dict[str, float]:
    """Metrics on the split's clips that have logits (imported teachers may lack some); `logits_of(rows)`
    gives the logits of those rows alone, never the whole (N, C) array."""
    rows = store.rows(split)
    logits = logits_of(rows).astype(np.float32)
    has = np.isfinite(logits).all(axis=1)
    if not has.any():
        return {}
    return tagging_metrics(store.labels(rows[has]), logits[has])


def run_import(teacher: TeacherConfig, ctx: StageContext) -> dict[str, Any]:
    """An imported teacher: EfficientAT-format logits aligned to the store by clip id."""
    assert teacher.logits is not None and teacher.logits_index is not None
    store = WaveformStore.open(ctx.upstream[stage_names.PREPARE] / STORE_FILE)
    aligned, found = interop.import_logits(teacher.logits, teacher.logits_index, store.column("clip_id"),
                                           len(store.classes))
    if found == 0:
        raise KdpipeError(f"{teacher.logits_index}: none of the store's clip ids is in it; "
                          "its keys should be YouTube ids like '--4gqARaEJE'")
    logits = TeacherLogits.create(ctx.out_dir / TEACHER_FILE, store.n_clips, len(store.classes),
                                  ctx.config.extract.chunk_clips, ctx.config.extract.dtype, {"teacher": teacher.label})
    for chunk in range(logits.n_chunks):
        rows = logits.chunk_rows(chunk)
        logits.write_chunk(chunk, aligned[rows.start:rows.stop])
        logits.mark_done(chunk)
    metrics = eval_metrics(aligned.__getitem__, store, ctx.config.evaluation.split)
    attributes = {"teacher": teacher.label, "imported_from": str(teacher.logits), "clips_found": found,
                  "clips_missing": store.n_clips - found, **metrics}
    logits.group.attrs.update(attributes)
    console.info(f"{teacher.label}: imported logits for {found} of {store.n_clips} clips")
    return attributes


def run_teacher(teacher: TeacherConfig):
    def run(ctx: StageContext) -> dict[str, Any]:
        if teacher.logits is not None:
            return run_import(teacher, ctx)
        config = ctx.config
        settings = config.extract
        store_path = ctx.upstream[stage_names.PREPARE] / STORE_FILE
        store = WaveformStore.open(store_path)
        checkpoints = checkpoint_paths(teacher, ctx.upstream)
        plan = ViewPlan.from_config(settings)
        spec = TeacherSpec(name=teacher.label, arch=teacher.arch, checkpoints=checkpoints,
                           options=dict(teacher.options), frontend=dict(teacher.frontend),
                           precision=settings.precision, compile=settings.compile, views=plan,
                           unseen=unseen_folds(teacher, ctx.upstream))
        device = resolve_device(config.device)
        loaded = Teacher(spec, store.sample_rate, device, settings.batch_size)
        n_out = _output_classes(loaded, store)
        probe = (str(device), loaded.precision)  # what this process runs; dask workers report their own
        path = ctx.out_dir / TEACHER_FILE
        resume = path.exists() and integrity.ready_to_resume(path)
        logits = (TeacherLogits.open(path, mode="r+") if resume else TeacherLogits.create(
            path, store.n_clips, n_out, settings.chunk_clips, settings.dtype, {"teacher": teacher.label},
            plan, settings.topk))
        todo = [chunk for chunk, done in enumerate(logits.done_chunks()) if not done]
        if len(todo) < logits.n_chunks:
            console.info(f"{teacher.label}: {logits.n_chunks - len(todo)} of {logits.n_chunks} chunks already done")
        if settings.engine == "dask":
            del loaded  # the workers load their own copies
            seconds, ran, writers = dask_engine.extract_dask(spec, store_path, path, todo, settings.batch_size,
                                                             settings.scheduler, settings.dask_workers)
        else:
            seconds, ran, writers = extraction.extract_local(loaded, store_path, logits, todo, settings.batch_size,
                                                             settings.num_workers), {probe}, {}
        ran = ran or {probe}  # nothing was left to compute
        computed = extraction.valid_clips(logits, todo, store.column("status") == "ok")
        metrics = eval_metrics(logits.read_at, store, config.evaluation.split)
        attributes = {
            "teacher": teacher.label, "arch": teacher.arch, "checkpoints": [str(path) for path in checkpoints],
            "checkpoints_sha256": [sha256_file(path) for path in checkpoints], "frontend": {**loaded_frontend(spec)},
            "cross_fitted": spec.unseen is not None,
            "device": ", ".join(sorted({d for d, _ in ran})), "precision": ", ".join(sorted({p for _, p in ran})),
            "engine": settings.engine,
            # dask: the worker that wrote each chunk this run (one per chunk, a retried block where it finished)
            "chunk_writers": {str(chunk): worker for chunk, worker in sorted(writers.items())},
            "wall_seconds": round(seconds, 3),
            "clips_per_second": round(computed / seconds, 2) if seconds > 0 else None,
            **metrics,
        }
        logits.group.attrs.update(attributes)
        mAP = f"{metrics['mAP']:.4f}" if metrics else "n/a"
        views = f" x {1 + plan.count} (clean and {plan.count} views)" if plan.count else ""
        console.info(f"{teacher.label}: eval mAP {mAP}, {computed} clips{views} in {seconds:.1f} s")
        return attributes

    return run


def loaded_frontend(spec: TeacherSpec) -> dict[str, Any]:
    with torch.device("meta"):
        model = create_model(spec.arch, **spec.options)
    return {**model.frontend_config, **spec.frontend}


def _output_classes(teacher: Teacher, store: WaveformStore) -> int:
    """A teacher must predict the store's classes; say so before hours of extraction."""
    probe = torch.zeros(1, store.clip_samples, dtype=torch.int16)
    n_out = teacher.logits(probe).shape[1]
    if n_out != len(store.classes):
        raise KdpipeError(f"teacher {teacher.spec.name} predicts {n_out} classes but the data has "
                          f"{len(store.classes)}: use a checkpoint trained on this class list")
    return n_out


def run_ensemble(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    store = WaveformStore.open(ctx.upstream[stage_names.PREPARE] / STORE_FILE)
    teachers = {t.label: TeacherLogits.open(ctx.upstream[stage_names.extract(t.label)] / TEACHER_FILE)
                for t in config.teachers}
    weights = {t.label: t.weight for t in config.teachers}
    if sum(weights.values()) <= 0:
        raise KdpipeError("teachers.*.weight: at least one teacher needs a positive weight")
    decoded = store.column("status") == "ok"
    expected = {name: decoded & ("imported_from" not in logits.group.attrs) for name, logits in teachers.items()}
    logits_store.write_combined(ctx.out_dir / COMBINED_FILE, store.column("clip_id"), teachers, weights,
                                config.extract.ensemble, config.extract.dtype, {"n_classes": len(store.classes)},
                                expected)
    combined = CombinedLogits.in_folder(ctx.out_dir)
    split = config.evaluation.split
    summary = {name: eval_metrics(partial(combined.read, name), store, split) for name in teachers}
    summary["ensemble"] = eval_metrics(partial(combined.read, None), store, split)
    for name, metrics in summary.items():
        if metrics:
            console.info(f"  {name:<24} mAP {metrics['mAP']:.4f}  mAUC {metrics['mAUC']:.4f}")
    return {"mAP": {name: m.get("mAP") for name, m in summary.items()}, "weights": weights}


def view_settings(config: Config) -> dict[str, Any]:
    """The settings of the views, when there are views (without, they change nothing and key nothing)."""
    if not config.extract.views:
        return {}
    extract = keyed_values(config.extract)
    return {f"extract.{key}": extract[key] for key in ("views", "view_seed", "augment", "topk")}


def stages(config: Config) -> list[Stage]:
    """One `extract/<name>` per teacher, then the ensemble over all of them (none without teachers)."""
    if not config.teachers:
        return []
    per_teacher = [Stage(
        name=stage_names.extract(teacher.label),
        command="extract-teachers",
        params=("extract.dtype", "extract.chunk_clips", "extract.precision"),
        param_values=lambda config, label=teacher.label: {**view_settings(config), "teacher": {
            k: v for k, v in keyed_values(config.teacher(label)).items() if k not in ("weight", "init")}},
        outputs=(TEACHER_FILE,),
        run=run_teacher(teacher),
        code=(run_teacher, run_import, loaded_frontend, _output_classes, eval_metrics),
        upstream=(stage_names.PREPARE,
                  *((stage_names.train_teacher(teacher.label),) if teacher.trainable else ())),
        inputs=lambda config, teacher=teacher: {key: getattr(teacher, key) for key in
                                                ("checkpoint", "logits", "logits_index")
                                                if getattr(teacher, key) is not None},
        resumable=True,
    ) for teacher in config.teachers]
    ensemble = Stage(
        name=stage_names.ENSEMBLE,
        command="extract-teachers",
        params=("extract.ensemble", "extract.dtype"),
        param_values=lambda config: {"weights": {t.label: t.weight for t in config.teachers}},
        outputs=(COMBINED_FILE,),
        run=run_ensemble,
        code=(run_ensemble, eval_metrics),
        upstream=(stage_names.PREPARE, *(stage_names.extract(t.label) for t in config.teachers)),
    )
    return [*per_teacher, ensemble]
