"""The `kdpipe` command line. Verbs match the library's functions; stages are brought up to date on demand.

Exit codes: 0 ok, 1 a run failed, 2 a usage or config error. User errors
print one message a user can act on, never a traceback.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer
from rich.table import Table

from kdpipe import __version__
from kdpipe import config as config_module
from kdpipe import console, torch_stack
from kdpipe.config import Config, load_config
from kdpipe.errors import ConfigError, KdpipeError, environment_error
from kdpipe.runner import Pipeline
from kdpipe.verify import Verdict

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="kdpipe",
    help="Offline knowledge distillation for audio tagging: transformer teachers -> efficient CNN students.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
config_app = typer.Typer(help="Inspect the resolved config.", no_args_is_help=True)
cache_app = typer.Typer(help="List and clean the stage cache.", no_args_is_help=True)
bench_app = typer.Typer(help="Throughput of our path against a naive baseline, side by side.", no_args_is_help=True)
manifest_app = typer.Typer(help="Build manifests from other descriptions of data.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(cache_app, name="cache")
app.add_typer(manifest_app, name="manifest")
app.add_typer(bench_app, name="bench")

DEFAULT_CONFIG = Path("kdpipe.yaml")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Run config (YAML). Default: ./kdpipe.yaml if present, else built-in defaults.",
                 rich_help_panel="Config"),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config value, e.g. --set student.width=2.0 "
                 "(repeatable).", rich_help_panel="Config"),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Recompute the named stage even when it is cached.")]
NoWaitOption = Annotated[
    bool, typer.Option("--no-wait", help="If another process is building the same output, exit instead of waiting.")
]


def user_errors(function: F) -> F:
    """Turn KdpipeError, a torch/torchaudio/torchvision that cannot load, and a full or unwritable disk into
    a one-line message and its exit code."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return function(*args, **kwargs)
            except (ImportError, OSError, RuntimeError) as exc:
                member = torch_stack.broken_member(exc)
                converted = torch_stack.stack_error(member, exc) if member else environment_error(exc)
                if converted is None:
                    raise
                raise converted from None
        except KdpipeError as exc:
            console.err.print(f"[bold red]error:[/bold red] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def resolve_config(path: Path | None, overrides: list[str] | None, flags: dict[str, Any] | None = None,
                   *, check_files: bool = True) -> Config:
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load_config(path, overrides or [], flags, check_files=check_files)


def make_pipeline(config: Config) -> Pipeline:
    from kdpipe.stages import build_stages

    pipeline = Pipeline(build_stages(config), config)
    pipeline.cache.check_writable()
    return pipeline


def referenced_entries(config: Config) -> set[tuple[str, str]]:
    """(stage, key) of every cache entry the config's run uses: its stages', and with KD on, its no-KD
    baseline's (evaluate scores that student too, so `cache gc` must keep it)."""
    from kdpipe.stages.evaluate import baseline_config

    configs = [config, baseline_config(config)] if config.student.kd.enabled else [config]
    return {(stage, key) for c in configs for stage, key in make_pipeline(c).referenced_keys().items()}


def _print_version(value: bool) -> None:
    if value:
        console.out.print(f"kdpipe {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Say more.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")] = False,
) -> None:
    console.set_verbosity(0 if quiet else 2 if verbose else 1)


# ----------------------------------------------------------------- stages
@app.command()
@user_errors
def prepare(config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False,
            no_wait: NoWaitOption = False) -> None:
    """Decode every clip of the manifests into the int16 waveform store (Zarr)."""
    pipeline = make_pipeline(resolve_config(config, set_))
    out = pipeline.ensure("prepare", force=force, wait=not no_wait)
    console.out.print(str(out / "waveforms.zarr"))


@app.command("train-teacher")
@user_errors
def train_teacher(
    config: ConfigOption = None,
    set_: SetOption = None,
    teacher: Annotated[list[str] | None, typer.Option("--teacher", "-t", help="Teacher name (repeatable); "
                                                       "default: every teacher without a checkpoint.")] = None,
    force: ForceOption = False,
    no_wait: NoWaitOption = False,
) -> None:
    """Train or fine-tune teachers on the prepared store with labels only; keeps the best epoch."""
    from kdpipe.stages.train_teacher import PREFIX

    pipeline = make_pipeline(resolve_config(config, set_))
    trainable = [name.removeprefix(PREFIX) for name in pipeline.stages if name.startswith(PREFIX)]
    unknown = sorted(set(teacher or ()) - set(trainable))
    if unknown:
        raise KdpipeError(f"no trainable teacher named {', '.join(unknown)}; teachers without a checkpoint: "
                          f"{', '.join(trainable) or 'none'}")
    for name in teacher or trainable:
        out = pipeline.ensure(PREFIX + name, force=force, wait=not no_wait)
        console.out.print(str(out / "best.pt"))


@app.command("extract-teachers")
@user_errors
def extract_teachers(config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False,
                     no_wait: NoWaitOption = False) -> None:
    """Stage one: run every teacher over every clip once; store their logits and the ensemble (Zarr)."""
    from kdpipe.stages.extract_teachers import NAME

    pipeline = make_pipeline(resolve_config(config, set_))
    if NAME not in pipeline.stages:
        raise KdpipeError("teachers is empty: list at least one teacher (arch and checkpoint) in the config")
    out = pipeline.ensure(NAME, force=force, wait=not no_wait)
    console.out.print(str(out / "teachers.zarr"))


@app.command("train-student")
@user_errors
def train_student(
    config: ConfigOption = None,
    set_: SetOption = None,
    width: Annotated[float | None, typer.Option(min=0.01, max=4.0, help="Width of a mobilenetv3 student "
                                                "(mn04 = 0.4, mn10 = 1.0, mn20 = 2.0, mn40 = 4.0).")] = None,
    arch: Annotated[str | None, typer.Option(help="Any registry model as the student.")] = None,
    gpus: Annotated[int, typer.Option(min=1, help="Train data-parallel on this many GPUs (processes on a CPU) "
                                      "with DDP; launches torchrun.")] = 1,
    force: ForceOption = False,
    no_wait: NoWaitOption = False,
) -> None:
    """Stage two: train a student against the stored teacher targets (reuses cached teacher logits)."""
    from kdpipe import distributed
    from kdpipe.stages.train_student import NAME

    if gpus > 1 and not distributed.under_torchrun():
        raise typer.Exit(distributed.launch(gpus, without_option(sys.argv[1:], "--gpus")))
    resolved = resolve_config(config, set_, {"student.width": width, "student.arch": arch})
    pipeline = make_pipeline(resolved)
    if NAME not in pipeline.stages:
        raise KdpipeError("student.kd.enabled is true but teachers is empty: list teachers, "
                          "or train the baseline with --set student.kd.enabled=false")
    if not distributed.under_torchrun():
        out = pipeline.ensure(NAME, force=force, wait=not no_wait)
        console.out.print(str(out / "best.pt"))
        return
    ranks = distributed.init(resolved.device)
    try:
        out = distributed.ensure_on_every_rank(pipeline, NAME, ranks, force=force)
    finally:
        distributed.shutdown()
    if out is not None:
        console.out.print(str(out / "best.pt"))


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
    from kdpipe.stages.evaluate import NAME

    pipeline = make_pipeline(resolve_config(config, set_))
    if NAME not in pipeline.stages:
        raise KdpipeError("nothing to evaluate: list teachers, or train the baseline with "
                          "--set student.kd.enabled=false")
    out = pipeline.ensure(NAME, force=force, wait=not no_wait)
    console.out.print(evaluation_table(out / "metrics.json", ("mAP", "mAUC", "d_prime", "lwlrap")))
    console.out.print(str(out / "report.md"))


def evaluation_table(metrics_json: Path, metrics: tuple[str, ...]) -> Table:
    """One row per evaluated model: the chosen metrics, parameters, MACs per clip and clips/s."""
    import json

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


@app.command("export-logits")
@user_errors
def export_logits(
    output: Annotated[Path, typer.Argument(help="Folder to write into.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    format: Annotated[str, typer.Option(help="Only 'efficientat': <name>.npy + fname_to_index.pkl.")] = "efficientat",
    split: Annotated[str, typer.Option(help="Clips to export (EfficientAT trains on 'train').")] = "train",
    teacher: Annotated[str | None, typer.Option(help="One teacher instead of the ensemble.")] = None,
) -> None:
    """Write the ensemble's (or one teacher's) logits the way EfficientAT's training code reads them."""
    from kdpipe import logits_store
    from kdpipe.interop import export_logits as write
    from kdpipe.waveform_store import WaveformStore
    from kdpipe.stages.extract_teachers import NAME

    if format != "efficientat":
        raise ConfigError(f"--format: only 'efficientat' is supported, got {format!r}")
    pipeline = make_pipeline(resolve_config(config, set_))
    if NAME not in pipeline.stages:
        raise KdpipeError("teachers is empty: nothing to export")
    combined = logits_store.open_combined(pipeline.ensure(NAME) / "teachers.zarr")
    array = "ensemble/logits" if teacher is None else f"teachers/{teacher}/logits"
    if array not in combined:
        raise KdpipeError(f"no teacher named {teacher!r}; teachers: {', '.join(combined['teachers'].group_keys())}")
    store = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    rows = store.rows(split)
    npy, index = write(output, combined[array][:][rows], store.column("clip_id")[rows], teacher or "ensemble_logits")
    console.info(f"{len(rows)} {split} clips")
    console.out.print(f"{npy}\n{index}")


@app.command("import-logits")
@user_errors
def import_logits(
    npy: Annotated[Path, typer.Argument(help="Logits .npy, e.g. passt_enemble_logits_mAP_495.npy.", exists=True,
                                        dir_okay=False)],
    index: Annotated[Path, typer.Argument(help="Its fname_to_index.pkl.", exists=True, dir_okay=False)],
    config: ConfigOption = None,
    set_: SetOption = None,
    name: Annotated[str, typer.Option(help="Teacher name for the config entry.")] = "passt_ensemble",
) -> None:
    """Check EfficientAT-format logits against the prepared clips and print the teacher entry that uses them."""
    from kdpipe.interop import import_logits as read
    from kdpipe.waveform_store import WaveformStore

    pipeline = make_pipeline(resolve_config(config, set_))
    store = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    aligned, found = read(npy, index, store.column("clip_id"), len(store.classes))
    for split in sorted(set(store.column("split").tolist())):
        rows = store.rows(split)
        covered = int(np.isfinite(aligned[rows]).all(axis=1).sum())
        console.info(f"{split}: logits for {covered} of {len(rows)} clips")
    if found == 0:
        raise KdpipeError("none of the prepared clip ids is in the index: keys should be YouTube ids")
    entry = {"name": name, "logits": str(npy.resolve()), "logits_index": str(index.resolve())}
    console.info("add this entry to `teachers:` in your config; clips without logits get no KD term:")
    console.out.print(config_module.dump_yaml([entry]), end="", markup=False)


ModelOption = Annotated[str, typer.Option("--model", "-m", help="student (the run's trained student), a teacher "
                                           "of the config by name, or a checkpoint file (with --arch).")]
ArchOption = Annotated[str | None, typer.Option(help="Registry architecture of a checkpoint file given as --model, "
                                                 "e.g. mn10 (see `kdpipe models`).")]


@app.command()
@user_errors
def predict(
    files: Annotated[list[Path], typer.Argument(help="Audio files (WAV, FLAC, OGG, MP3, ...), any length and rate.",
                                                exists=True, dir_okay=False)],
    config: ConfigOption = None,
    set_: SetOption = None,
    model: ModelOption = "student",
    arch: ArchOption = None,
    top_k: Annotated[int, typer.Option(min=1, help="Labels per file (and per window in --windows).")] = 10,
    windows: Annotated[Path | None, typer.Option(help="Also write per-window predictions to this CSV.")] = None,
    window_seconds: Annotated[float | None, typer.Option(min=0.01, help="Window length; default data.clip_seconds, "
                                                         "the training clip length.")] = None,
    hop_seconds: Annotated[float | None, typer.Option(min=0.01, help="Hop between windows; default the window "
                                                      "length.")] = None,
) -> None:
    """Top labels of audio files from a trained model: windows of the training clip length, averaged."""
    from kdpipe.predict import predict_files, top_k as ranked, write_windows_csv
    from kdpipe.tagger import load_tagger
    from kdpipe.devices import resolve_device

    resolved = resolve_config(config, set_)
    tagger = load_tagger(make_pipeline(resolved), model, arch, resolve_device(resolved.device))
    predictions = predict_files(tagger, files, window_seconds, hop_seconds, resolved.evaluation.batch_size)
    for prediction in predictions:
        console.out.print(f"{prediction.path} ({prediction.seconds:.2f} s, {len(prediction.starts)} window(s))",
                          markup=False)
        for label, probability in ranked(prediction.probabilities, tagger.classes.names, top_k):
            console.out.print(f"  {probability:.3f}  {label}", markup=False)
    if windows is not None:
        write_windows_csv(predictions, tagger.classes.names, windows, top_k)
        console.info(f"per-window predictions: {windows}")


@app.command("export")
@user_errors
def export_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    format: Annotated[str, typer.Option(help="onnx or torchscript.")] = "onnx",
    model: ModelOption = "student",
    arch: ArchOption = None,
    with_frontend: Annotated[bool, typer.Option("--with-frontend/--no-frontend", help="Take float32 waveforms "
                                                "(batch, samples) at data.sample_rate, or the model's "
                                                "features.")] = True,
    out: Annotated[Path | None, typer.Option(help="File to write; default <model>[-features].onnx or "
                                             "<model>[-features].torchscript.pt.")] = None,
) -> None:
    """Export a trained model (dynamic batch; class list and frontend settings inside) and check it against torch."""
    from kdpipe.export import FORMATS, PARITY_BATCHES, PARITY_TOLERANCE, SUFFIXES, export_tagger
    from kdpipe.tagger import load_tagger

    if format not in FORMATS:
        raise ConfigError(f"--format: one of {', '.join(FORMATS)}; got {format!r}")
    tagger = load_tagger(make_pipeline(resolve_config(config, set_)), model, arch)
    path = out or Path(f"{tagger.name}{'' if with_frontend else '-features'}{SUFFIXES[format]}")
    result = export_tagger(tagger, path, format, with_frontend)
    runtime = "onnxruntime" if format == "onnx" else "torch.jit.load"
    console.info(f"parity: {runtime} against torch at batch sizes {', '.join(map(str, PARITY_BATCHES))}: "
                 f"max abs logit difference {result.max_abs_diff:.2e}")
    if result.max_abs_diff > PARITY_TOLERANCE:
        console.err.print(f"[yellow]warning:[/yellow] the difference exceeds {PARITY_TOLERANCE:g}; "
                          f"compare the exported model's outputs before deploying it")
    console.out.print(str(path))


@app.command()
@user_errors
def run(config: ConfigOption = None, set_: SetOption = None, force: ForceOption = False,
        no_wait: NoWaitOption = False) -> None:
    """Bring every stage up to date, in order; cached stages cost nothing."""
    pipeline = make_pipeline(resolve_config(config, set_))
    for name in pipeline.stages:
        pipeline.ensure(name, force=force, wait=not no_wait)


@app.command()
@user_errors
def verify(
    stage: Annotated[str | None, typer.Argument(help="One stage; default: every stage of the config.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report damage without marking it.")] = False,
) -> None:
    """Check committed outputs against their checksums and digests; mark damaged ones for rebuilding."""
    pipeline = make_pipeline(resolve_config(config, set_))
    _print_verdicts(pipeline.verify([stage] if stage else None, mark=not dry_run))


def _print_verdicts(verdicts: list[Verdict]) -> None:
    table = Table("stage", "key", "result", "problems")
    damaged = 0
    for verdict in verdicts:
        damaged += bool(verdict.problems)
        colour = "red" if verdict.problems else "green" if verdict.action == "ok" else "yellow"
        table.add_row(verdict.stage, verdict.key, f"[{colour}]{verdict.action}[/]", "; ".join(verdict.problems[:5])
                      + (f"; and {len(verdict.problems) - 5} more" if len(verdict.problems) > 5 else ""))
    console.out.print(table)
    checked = sum(v.bytes_checked for v in verdicts)
    seconds = sum(v.seconds for v in verdicts)
    console.info(f"verified {_human_bytes(checked)} in {seconds:.1f} s"
                 + (f" ({seconds / (checked / 1e9):.1f} s per GB)" if checked else ""))
    if damaged:
        console.info(f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}: `kdpipe run` rebuilds what is damaged")


@app.command()
@user_errors
def status(config: ConfigOption = None, set_: SetOption = None,
           verify_: Annotated[bool, typer.Option("--verify", help="Also verify committed outputs "
                                                 "(as `kdpipe verify`) before reporting.")] = False) -> None:
    """One row per stage: fresh, stale (and what changed) or missing; then how clips reach each model."""
    from kdpipe.manifests import load_clips
    from kdpipe.models.windowing import coverage_notes

    pipeline = make_pipeline(resolve_config(config, set_))
    if pipeline.config.data.sources:
        load_clips(pipeline.config.data)  # a malformed manifest is found here, not hours into prepare
    if verify_:
        _print_verdicts(pipeline.verify())
    table = Table("stage", "state", "key", "why")
    colours = {"fresh": "green", "stale": "yellow", "missing": "red"}
    for name in pipeline.stages:
        state = pipeline.status(name)
        why = "; ".join(state.reasons) or ("up to date" if state.state == "fresh" else "never built")
        table.add_row(name, f"[{colours[state.state]}]{state.state}[/]", state.key, why)
    console.out.print(table)
    for note in coverage_notes(pipeline.config):
        console.out.print(note, markup=False, highlight=False)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data and cache.")] = Path("kdpipe-demo"),
    set_: SetOption = None,
    missing_labels: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of train-clip events left unlabelled, as in AudioSet's weak labels: the "
        "regime where teacher targets add what the labels lack.")] = 0.3,
    force: ForceOption = False,
) -> None:
    """Generate the embedded demo data and run every stage on it with configs/demo.yaml."""
    from kdpipe.demo_data import write_demo_dataset
    from kdpipe.stages.evaluate import NAME as EVALUATE
    from kdpipe.stages.evaluate import baseline_config
    from kdpipe.stages.train_student import NAME as STUDENT

    started = time.time()
    demo_config = resources.files("kdpipe.configs").joinpath("demo.yaml")
    with resources.as_file(demo_config) as path:
        overrides = [f"cache_dir={out / 'cache'}", f"data.sources.0.path={out / 'data' / 'manifest.csv'}",
                     f"data.class_list={out / 'data' / 'class_labels_indices.csv'}", *(set_ or [])]
        config = load_config(path, overrides, check_files=False)
    data_dir = config.data.sources[0].path.parent
    if not config.data.sources[0].path.is_file():
        dataset = write_demo_dataset(data_dir, clip_seconds=config.data.clip_seconds, seed=config.seed,
                                     missing_labels=missing_labels)
        console.info(f"demo: wrote {dataset.n_clips} synthetic clips to {data_dir}")
    out.mkdir(parents=True, exist_ok=True)
    config_module.check_input_files(config)
    resolved = out / "demo.yaml"
    resolved.write_text(config_module.dump_yaml(config_module.to_plain(config)))
    make_pipeline(baseline_config(config)).ensure(STUDENT, force=force)  # first: evaluate scores it too
    pipeline = make_pipeline(config)
    for name in pipeline.stages:
        pipeline.ensure(name, force=force)
    evaluated = pipeline.ensure(EVALUATE)
    console.out.print(evaluation_table(evaluated / "metrics.json", ("mAP",)))
    console.out.print(f"report: {evaluated / 'report.md'}")
    console.info(f"demo: finished in {time.time() - started:.1f} s; outputs under {config.cache_dir}")
    console.info(f"demo: try `kdpipe status --config {resolved}` or `kdpipe cache ls --config {resolved}`")


@app.command("models")
@user_errors
def models_command(
    seconds: Annotated[float, typer.Option(help="Clip length the MACs are counted for.")] = 10.0,
) -> None:
    """Every registered model with its parameters and MACs for one clip (shapes only, no weights)."""
    import torch

    from kdpipe.models import create_model, list_models
    from kdpipe.models.complexity import describe

    table = Table("name", "parameters", f"MACs ({seconds:g} s)", "input (mel x frames)", "frontend")
    for name in list_models():
        with torch.device("meta"):
            info = describe(create_model(name), seconds)
        table.add_row(name, f"{info['parameters'] / 1e6:.3f} M", f"{info['macs'] / 1e9:.3f} G",
                      " x ".join(map(str, info["input"])), info["frontend"])
    console.out.print(table)


# ----------------------------------------------------------------- config
@config_app.command("show")
@user_errors
def config_show(
    config: ConfigOption = None,
    set_: SetOption = None,
    stage: Annotated[str | None, typer.Option(help="Only the keys this stage depends on.")] = None,
) -> None:
    """Print the resolved config (defaults < file < --set) as YAML."""
    from kdpipe.models.windowing import coverage_notes

    resolved = resolve_config(config, set_, check_files=False)
    plain = config_module.to_plain(resolved)
    if stage is not None:
        plain = make_pipeline(resolved).stage(stage).parameters(resolved)
    console.out.print(config_module.dump_yaml(plain), end="", markup=False)
    for note in coverage_notes(resolved):  # on stderr: stdout stays valid YAML
        console.info(note)


# ------------------------------------------------------------------ cache
@cache_app.command("ls")
@user_errors
def cache_ls(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Every cache entry: stage, key, complete or partial, size, used by the current config."""
    pipeline = make_pipeline(resolve_config(config, set_))
    referenced = referenced_entries(pipeline.config)
    table = Table("stage", "key", "state", "size", "built", "current")
    for entry in pipeline.cache.entries():
        record = pipeline.cache.record(entry.stage, entry.key)
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(record["finished"])) if record else "-"
        table.add_row(entry.stage, entry.key, "complete" if entry.complete else "partial",
                      _human_bytes(entry.size_bytes()), built, "yes" if (entry.stage, entry.key) in referenced else "")
    console.out.print(table)


@cache_app.command("gc")
@user_errors
def cache_gc(
    config: ConfigOption = None,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
) -> None:
    """Remove cache entries that the current config no longer references."""
    pipeline = make_pipeline(resolve_config(config, set_))
    referenced = referenced_entries(pipeline.config)
    stale = [e for e in pipeline.cache.entries() if (e.stage, e.key) not in referenced]
    freed, removed = 0, 0
    for entry in stale:
        with pipeline.cache.claim(entry) as holder:
            if holder is not None:  # being built, or read by a build: never removed
                console.out.print(f"skipped {entry.stage}/{entry.key}: in use ({holder})")
                continue
            size = entry.size_bytes()
            freed, removed = freed + size, removed + 1
            console.out.print(f"{'would remove' if dry_run else 'removed'} {entry.stage}/{entry.key} "
                              f"({_human_bytes(size)})")
            if not dry_run:
                pipeline.cache.remove(entry)
    console.info(f"{removed} entr{'y' if removed == 1 else 'ies'}, {_human_bytes(freed)}"
                 f"{' would be' if dry_run else ''} freed")


# ------------------------------------------------------------------ bench
@bench_app.command("extract")
@user_errors
def bench_extract(
    teacher: Annotated[str | None, typer.Option(help="Registry model; default passt_s_s10 on CUDA, "
                                                "passt_tiny on a CPU.")] = None,
    clips: Annotated[int, typer.Option(min=1, help="Clips for our path.")] = 256,
    naive_clips: Annotated[int, typer.Option(min=1, help="Clips for the naive loop (it is slow).")] = 64,
    seconds: Annotated[float, typer.Option(min=0.1, help="Clip length.")] = 10.0,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Default: 64 on CUDA, 4 on a CPU.")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Loader processes; default 4 on CUDA, 0 on "
                                                "a CPU (they would compete with the model for cores).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile our path (compile time excluded).")] = False,
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on a CPU), fp32 "
                                           "or bf16.")] = "auto",
    rounds: Annotated[int, typer.Option(min=1, help="Alternating rounds of both paths; medians are reported.")] = 3,
) -> None:
    """Teacher inference: clips/s of extract-teachers' path against a one-clip fp32 CPU-feature loop."""
    from kdpipe.bench import bench_extract as run_bench
    from kdpipe.devices import resolve_device

    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision: one of auto, fp32, bf16; got {precision!r}")
    chosen = resolve_device(device)
    cuda = chosen.type == "cuda"
    arch = teacher or ("passt_s_s10" if cuda else "passt_tiny")
    result = run_bench(arch, clips, seconds, batch_size or (64 if cuda else 4), chosen,
                       workers if workers is not None else (4 if cuda else 0), naive_clips, compile, precision, rounds)
    print_bench(result)


@bench_app.command("loader")
@user_errors
def bench_loader(
    clips: Annotated[int, typer.Option(min=1, help="Clips (generated demo audio in mixed formats).")] = 128,
    seconds: Annotated[float, typer.Option(min=0.1, help="Clip length.")] = 10.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Loader processes, the same for both loaders.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Training input: our store loader (int16 reads, features on the device) against per-item decoding."""
    from kdpipe.bench import bench_loader as run_bench
    from kdpipe.devices import resolve_device

    result = run_bench(clips, seconds, batch_size, workers, resolve_device(device))
    print_bench(result, f"ours {result['ours_clips_per_s']:.1f} clips/s with features on the device "
                        f"({result['ours_batches_clips_per_s']:.1f} clips/s for the batches alone), naive "
                        f"{result['naive_clips_per_s']:.1f} clips/s: {result['speedup']:.2f}x "
                        f"({result['batches_speedup']:.2f}x for the batches alone)")


@bench_app.command("train")
@user_errors
def bench_train(
    arch: Annotated[str, typer.Option(help="Student to train.")] = "mn10",
    clips: Annotated[int, typer.Option(min=2, help="Clips (generated demo audio).")] = 128,
    seconds: Annotated[float, typer.Option(min=0.1, help="Clip length.")] = 10.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Loader processes.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (the warm-up step "
                                          "compiles; not timed).")] = False,
) -> None:
    """Training throughput of train-student's step on our loader, and the share of time spent waiting for data."""
    from kdpipe.bench import bench_train as run_bench
    from kdpipe.devices import resolve_device

    result = run_bench(arch, clips, seconds, batch_size, workers, resolve_device(device), compile)
    print_bench(result, f"training {result['train_clips_per_s']:.1f} clips/s, "
                        f"waiting for data {100 * result['data_wait_share']:.1f} % of step time")


def print_bench(result: dict[str, Any], headline: str | None = None) -> None:
    """Every measure in a table, then one line: by default ours against naive, as a ratio."""
    table = Table("measure", "value")
    for key, value in result.items():
        table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    console.out.print(table)
    paired = (f" (median of {result['rounds']} paired rounds, {result['speedup_range']})"
              if result.get("rounds", 1) > 1 else "")
    console.out.print(headline or f"ours {result['ours_clips_per_s']:.1f} clips/s, naive "
                                  f"{result['naive_clips_per_s']:.1f} clips/s: {result['speedup']:.2f}x{paired}")


# --------------------------------------------------------------- manifests
@manifest_app.command("from-audioset")
@user_errors
def manifest_from_audioset(
    segments: Annotated[Path, typer.Argument(help="Official segment CSV, e.g. eval_segments.csv.", exists=True,
                                             dir_okay=False)],
    audio_dir: Annotated[Path, typer.Argument(help="Folder with the downloaded clips.", exists=True, file_okay=False)],
    split: Annotated[str, typer.Option(help="Split name for these clips.")] = "train",
    output: Annotated[Path, typer.Option("--output", "-o", help="Manifest CSV to write.")] = Path("manifest.csv"),
) -> None:
    """Write our CSV manifest for the clips of an AudioSet segment list found in AUDIO_DIR."""
    from kdpipe.manifests import read_audioset_segments, write_csv_manifest

    clips = read_audioset_segments(segments, audio_dir, split)
    present = [clip for clip in clips if clip.audio.is_file()]
    write_csv_manifest(present, output)
    console.info(f"{len(present)} of {len(clips)} segments have audio in {audio_dir}; "
                 f"{len(clips) - len(present)} missing")
    console.out.print(str(output))


def _human_bytes(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def main() -> None:
    app()


