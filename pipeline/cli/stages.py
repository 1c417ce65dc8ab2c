"""Commands that build: one per stage, `run` for all of them, and `demo`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kdpipe import config as config_module
from kdpipe import console, stage_names, training
from kdpipe.cli.common import (ConfigOption, ForceOption, ForceStagesOption, NoWaitOption, SetOption, app,
                               forced_stages, make_pipeline, resolve_config, user_errors)
from kdpipe.errors import KdpipeError
from kdpipe.runner import Pipeline
from kdpipe.waveform_store import STORE_FILE


@app.command()
@user_errors
def prepare(config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False,
            no_wait: NoWaitOption = False) -> None:
    """Decode every clip of the manifests into the int16 waveform store (Zarr)."""
    pipeline = make_pipeline(resolve_config(config, set_))
    out = pipeline.ensure(stage_names.PREPARE, force=force, wait=not no_wait)
    console.out.print(str(out / STORE_FILE))


@app.command("train-teacher")
@user_errors
def train_teacher(
    config: ConfigOption = None,
    set_: SetOption = None,
    teacher: Annotated[list[str] | None, typer.Option("--teacher", "-t", metavar="NAME", help="Teacher name (repeatable); "
                                                       "default: every teacher without a checkpoint.")] = None,
    force: ForceOption = False,
    no_wait: NoWaitOption = False,
) -> None:
    """Train or fine-tune teachers on the prepared store with labels only; keeps the last epoch, or the best
    on validation (teacher_training.keep)."""
    resolved = resolve_config(config, set_)
    pipeline = make_pipeline(resolved)
    trainable = [t.label for t in resolved.teachers if t.trainable]
    unknown = sorted(set(teacher or ()) - set(trainable))
    if unknown:
        raise KdpipeError(f"no trainable teacher named {', '.join(unknown)}; teachers without a checkpoint: "
                          f"{', '.join(trainable) or 'none'}")
    for name in teacher or trainable:
        out = pipeline.ensure(stage_names.train_teacher(name), force=force, wait=not no_wait)
        console.out.print(str(out / training.MODEL))


@app.command("extract-teachers")
@user_errors
def extract_teachers(config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False,
                     no_wait: NoWaitOption = False) -> None:
    """Stage one: run every teacher over every clip once; store their logits and the ensemble (Zarr)."""
    from kdpipe.logits_store import COMBINED_FILE

    pipeline = make_pipeline(resolve_config(config, set_))
    if stage_names.ENSEMBLE not in pipeline.stages:
        raise KdpipeError("teachers is empty: list at least one teacher (arch and checkpoint) in the config")
    out = pipeline.ensure(stage_names.ENSEMBLE, force=force, wait=not no_wait)
    console.out.print(str(out / COMBINED_FILE))


@app.command("train-student")
@user_errors
def train_student(
    config: ConfigOption = None,
    set_: SetOption = None,
    width: Annotated[float | None, typer.Option(min=0.01, max=4.0, help="Width of a mobilenetv3 or dymn student "
                                                "(mn04 = 0.4, mn10 = 1.0, mn20 = 2.0, mn40 = 4.0).")] = None,
    arch: Annotated[str | None, typer.Option(metavar="NAME", help="Any registry model as the student.")] = None,
    init: Annotated[Path | None, typer.Option(metavar="PATH", help="Start from these weights (student.init): an "
                                              "EfficientAT mn*_im/_as or dymn*_as file, or a train-student output "
                                              "folder; a head of other classes starts afresh.")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="Train the same student without KD "
                                           "(stage train-student/no-kd), the baseline KD is measured "
                                           "against.")] = False,
    gpus: Annotated[int, typer.Option(min=1, help="Train data-parallel on this many GPUs (processes on a CPU) "
                                      "per node with DDP; launches torchrun.")] = 1,
    nnodes: Annotated[int, typer.Option(min=1, help="Machines training together; start the same command on "
                                        "each, with its --node-rank.")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="This machine's rank, 0 .. nnodes - 1; node 0 hosts the "
                                           "rendezvous and writes the cache.")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(metavar="HOST:PORT", help="Where node 0 hosts the "
                                                      "rendezvous (a free port on node 0).")] = None,
    join_timeout: Annotated[float, typer.Option(min=1, help="Seconds a node waits for the others to "
                                                "start.")] = 600,
    force: ForceOption = False,
    no_wait: NoWaitOption = False,
) -> None:
    """Stage two: train a student against the stored teacher targets (reuses cached teacher logits)."""
    from kdpipe import distributed, runner

    if nnodes > 1 and (rdzv_endpoint is None or ":" not in rdzv_endpoint or node_rank >= nnodes):
        raise typer.BadParameter(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address and a free "
                                 f"port) and a --node-rank below {nnodes}")
    if (gpus > 1 or nnodes > 1) and not distributed.under_torchrun():
        nodes = distributed.Nodes(nnodes, node_rank, rdzv_endpoint or "", join_timeout)
        distributed.launch(gpus, without_option(sys.argv[1:], "--gpus"), nodes)
        return
    flags = {"student.width": width, "student.arch": arch, "student.init": init,
             "evaluation.baseline": True if baseline else None}
    resolved = resolve_config(config, set_, flags)
    name = stage_names.student(resolved.student.kd.enabled and not baseline)
    if not distributed.under_torchrun():
        out = _student_pipeline(make_pipeline(resolved), name).ensure(name, force=force, wait=not no_wait)
        console.out.print(str(out / training.MODEL))
        return
    ranks = distributed.init(resolved.device)
    try:
        out = runner.ensure_on_every_rank(_student_pipeline(make_pipeline(resolved, ranks), name), name, ranks,
                                          force=force)
    except RuntimeError as exc:
        if (lost := distributed.lost_contact(exc, ranks)) is None:
            raise
        raise KdpipeError(lost) from None
    finally:
        distributed.shutdown()
    if out is not None:
        console.out.print(str(out / training.MODEL))


def _student_pipeline(pipeline: Pipeline, name: str) -> Pipeline:
    """The pipeline, if it has the student stage asked for."""
    if name not in pipeline.stages:
        raise KdpipeError("student.kd.enabled is true but teachers is empty: list teachers, "
                          "or train the baseline with --baseline")
    return pipeline


def without_option(argv: list[str], option: str) -> list[str]:
    """argv with `option VALUE` / `option=VALUE` removed (to relaunch the same command under torchrun)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


@app.command()
@user_errors
def evaluate(config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False,
             no_wait: NoWaitOption = False) -> None:
    """Score every teacher, the ensemble and every student on evaluation.split; write metrics, CSV and report.md."""
    pipeline = make_pipeline(resolve_config(config, set_))
    if stage_names.EVALUATE not in pipeline.stages:
        raise KdpipeError("nothing to evaluate: list teachers, or train the baseline with "
                          "--set student.kd.enabled=false")
    out = pipeline.ensure(stage_names.EVALUATE, force=force, wait=not no_wait)
    console.out.print(evaluation_table(out / "metrics.json", ("mAP", "mAUC", "d_prime", "lwlrap")))
    console.out.print(str(out / "report.md"))


def evaluation_table(metrics_json: Path, metrics: tuple[str, ...]) -> Table:
    """One row per evaluated model: the chosen metrics, parameters, MACs per clip and clips/s."""
    from kdpipe.report import format_count

    result = json.loads(metrics_json.read_text())
    names = {"mAP": "mAP", "mAUC": "mAUC", "d_prime": "d-prime", "lwlrap": "lwlrap"}
    table = Table("model", *(f"{result['split']} {names[m]}" for m in metrics), "parameters",
                  f"MACs ({result['clip_seconds']:g} s clip)", "clips/s",
                  title=f"{result['clips']} {result['split']} clips; clips/s on {result['device']}")
    for model in result["models"]:
        size = ((format_count(model["parameters"]), format_count(model["macs"]), f"{model['clips_per_second']:.1f}")
                if "parameters" in model else ("n/a",) * 3)
        table.add_row(model["label"], *(f"{model[m]:.4f}" for m in metrics), *size)
    return table


@app.command()
@user_errors
def run(config: ConfigOption = None, set_: SetOption = None, force: ForceStagesOption = None,
        no_wait: NoWaitOption = False) -> None:
    """Bring every stage up to date, in order; cached stages cost nothing."""
    pipeline = make_pipeline(resolve_config(config, set_))
    forced = forced_stages(pipeline, force)
    for name in pipeline.stages:
        pipeline.ensure(name, force=name in forced, wait=not no_wait)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data and cache.")] = Path("kdpipe-demo"),
    set_: SetOption = None,
    seeds: Annotated[int, typer.Option(min=1, max=10, help="Train both students with seeds 0..N-1 and report "
                                       "each one's mean and spread (3: about 35 s more).")] = 2,
    train_clips: Annotated[int, typer.Option(min=4, help="Train clips to generate.")] = 240,
    val_clips: Annotated[int, typer.Option(min=2, help="Validation clips (choose checkpoints; never scored).")] = 48,
    eval_clips: Annotated[int, typer.Option(min=2, help="Evaluation clips (scored; never trained or chosen "
                                            "on).")] = 400,
    missing_labels: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of train-clip events left unlabelled, as in AudioSet's weak labels: the "
        "regime where teacher targets add what the labels lack.")] = 0.3,
    unlabelled: Annotated[int, typer.Option(min=0, help="Add this many unlabelled train clips (a source with "
                                            "labels: none): they teach the KD student through the teachers' "
                                            "targets only.")] = 0,
    force: ForceStagesOption = None,
) -> None:
    """Generate the embedded demo data and run every stage on it with configs/demo.yaml."""
    from kdpipe.demo_data import demo_config

    started = time.time()
    clips = {"n_train": train_clips, "n_val": val_clips, "n_eval": eval_clips}
    config, written = demo_config(out, set_ or [], missing_labels, unlabelled, clips)
    if written:
        console.info(f"demo: wrote {written} synthetic clips to {config.data.sources[0].path.parent}")
    resolved = out / "demo.yaml"
    resolved.write_text(config_module.dump_yaml(config_module.to_plain(config)))
    pipeline = make_pipeline(config)
    forced = forced_stages(pipeline, force)
    times: dict[str, float | None] = {"generate the clips": time.time() - started} if written else {}
    for name in pipeline.stages:
        times[name] = _timed(pipeline, name, name in forced)
    evaluated = pipeline.built(stage_names.EVALUATE)
    console.out.print(evaluation_table(evaluated / "metrics.json", ("mAP",)))
    for model in json.loads((evaluated / "metrics.json").read_text())["models"]:
        if "kept" in model:
            console.out.print(f"  {model['label']}: {model['kept']}")
    console.out.print(f"Every checkpoint above was chosen without the {config.evaluation.split} split it is "
                      "scored on.")
    if stage_names.ENSEMBLE in pipeline.stages:
        for table in _label_evidence(pipeline, missing_labels, evaluated):
            console.out.print(table)
    if stage_names.STUDENT in pipeline.stages and stage_names.BASELINE in pipeline.stages:
        _seeds(resolved, set_ or [], seeds, out, times, config.evaluation.split)
    console.out.print(_times_table(times, time.time() - started))
    console.out.print(f"report: {evaluated / 'report.md'}")
    console.info(f"demo: finished in {time.time() - started:.1f} s; outputs under {config.cache_dir}")
    console.info(f"demo: try `kdpipe status --config {resolved}` or `kdpipe cache ls --config {resolved}`")


def _timed(pipeline: Pipeline, name: str, force: bool = False) -> float | None:
    """Seconds to bring `name` up to date; None when it was cached."""
    if not force and pipeline.cache.record(name, pipeline.key(name)) is not None:
        pipeline.ensure(name)
        return None
    started = time.time()
    pipeline.ensure(name, force=force)
    return time.time() - started


def _label_evidence(pipeline: Pipeline, missing_labels: float, evaluated: Path) -> list[Table]:
    """What each teacher predicts for the train events the labels leave out (the demo knows them), and each
    class's eval AP beside the share of its train events left unlabelled."""
    import csv

    from kdpipe.demo_data import complete_labels
    from kdpipe.demo_findings import teacher_evidence
    from kdpipe.logits_store import CombinedLogits
    from kdpipe.waveform_store import WaveformStore

    store = WaveformStore.open(pipeline.built(stage_names.PREPARE) / STORE_FILE)
    complete = complete_labels(store.column("clip_id"), pipeline.config.seed)
    train = store.rows("train")
    labels, events = store.column("labels").astype(bool)[train], complete[train]
    missed = int((events & ~labels).sum())
    table = Table("teacher", "labelled events", "unlabelled events", "of those > 0.5", "absent classes",
                  f"{pipeline.config.evaluation.split} calibration error",
                  title=f"Teachers' mean probability on the train clips: {missed} of "
                        f"{int(events.sum())} events are unlabelled (--missing-labels "
                        f"{missing_labels:g})")
    for row in teacher_evidence(store, CombinedLogits.in_folder(pipeline.built(stage_names.ENSEMBLE)), complete,
                                pipeline.config.evaluation.split):
        table.add_row(row.name, f"{row.labelled:.3f}", f"{row.unlabelled:.3f}", f"{row.tagged_unlabelled:.0%}",
                      f"{row.absent:.3f}", f"{row.eval_ece:.3f}")
    with open(evaluated / "per_class_ap.csv", newline="") as handle:
        per_class = list(csv.DictReader(handle))
    columns = [c for c in ("ap_ensemble", "ap_student_kd", "ap_student_no_kd") if c in per_class[0]]
    classes = Table("class", "train events unlabelled", *(c.removeprefix("ap_").replace("_", " ") for c in columns),
                    title=f"Per-class {pipeline.config.evaluation.split} AP")
    for index, row in enumerate(per_class):
        unlabelled_share = (events[:, index] & ~labels[:, index]).sum() / max(events[:, index].sum(), 1)
        classes.add_row(row["class_name"], f"{unlabelled_share:.0%}", *(f"{float(row[c]):.3f}" for c in columns))
    return [table, classes]


def _seeds(resolved: Path, overrides: list[str], seeds: int, out: Path, times: dict[str, float | None],
           split: str) -> None:
    """Both students over seeds 0..seeds-1 (seed 0 is the run above), their spread, and what it shows."""
    from kdpipe.compare import Variant, student_scores, write_comparison
    from kdpipe.demo_findings import kd_finding, spread

    results = []
    for variant in (Variant("student, with KD", ()), Variant("student, no KD", ("student.kd.enabled=false",))):
        pipelines = []
        for seed in range(seeds):
            pipeline = make_pipeline(resolve_config(resolved, [*overrides, *variant.overrides,
                                                                f"student.seed={seed}"]))
            name = stage_names.student(pipeline.config.student.kd.enabled)
            if seed:
                times[f"{name} (seed {seed})"] = _timed(pipeline, name)
            pipelines.append((seed, pipeline))
        results.append(student_scores(variant, pipelines, build=False))
    write_comparison(results, out / "seeds", split)
    table = Table("model", *(f"seed {seed}" for seed in range(seeds)), "mean ± sd",
                  title=f"Students over {seeds} seeds, {split} mAP (the same teachers' targets)")
    for result in results:
        table.add_row(result.variant.name, *(f"{score:.4f}" for score in result.mAP), spread(result.mAP))
    finding = kd_finding(*results)
    table.add_row("KD - no KD", *(f"{d:+.4f}" for d in finding.differences), spread(finding.differences))
    console.out.print(table)
    console.out.print(f"Finding: {finding.text}")
    console.out.print(f"seeds: {out / 'seeds' / 'comparison.md'}")


def _times_table(times: dict[str, float | None], total: float) -> Table:
    table = Table("step", "seconds", title=f"Where the demo's {total:.0f} s went")
    for name, seconds in times.items():
        table.add_row(name, "cached" if seconds is None else f"{seconds:.1f}")
    table.add_row("total", f"{total:.1f}")
    return table
