"""Commands that read what the stages built: predict, export, export-logits, import-logits, compare.

They never build silently: a stale or missing stage is an error naming the command that builds it,
unless `--build` asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdpipe import config as config_module
from kdpipe import console, stage_names
from kdpipe.cli.common import BuildOption, ConfigOption, SetOption, app, make_pipeline, resolve_config, user_errors
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.waveform_store import STORE_FILE

ModelOption = Annotated[str, typer.Option("--model", "-m", metavar="NAME|FILE", help="student (the run's trained student), a teacher "
                                           "of the config by name, or a checkpoint file (with --arch).")]
ArchOption = Annotated[str | None, typer.Option(metavar="NAME", help="Registry architecture of a checkpoint file given as --model, "
                                                 "e.g. mn10 (see `kdpipe models`).")]


@app.command("export-logits")
@user_errors
def export_logits(
    output: Annotated[Path, typer.Argument(metavar="FOLDER", help="Folder to write into.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    format: Annotated[str, typer.Option(metavar="efficientat", help="<name>.npy + fname_to_index.pkl, as "
                                        "EfficientAT reads them (the only format).")] = "efficientat",
    split: Annotated[str, typer.Option(metavar="NAME", help="Clips to export (EfficientAT trains on 'train').")] = "train",
    teacher: Annotated[str | None, typer.Option(metavar="NAME", help="One teacher instead of the ensemble.")] = None,
    build: BuildOption = False,
) -> None:
    """Write the ensemble's (or one teacher's) logits the way EfficientAT's training code reads them."""
    from kdpipe.interop import export_logits as write
    from kdpipe.logits_store import CombinedLogits
    from kdpipe.waveform_store import WaveformStore

    if format != "efficientat":
        raise ConfigError(f"--format: only 'efficientat' is supported, got {format!r}")
    pipeline = make_pipeline(resolve_config(config, set_))
    if stage_names.ENSEMBLE not in pipeline.stages:
        raise KdpipeError("teachers is empty: nothing to export")
    combined = CombinedLogits.in_folder(pipeline.output(stage_names.ENSEMBLE, build))
    store = WaveformStore.open(pipeline.output(stage_names.PREPARE, build) / STORE_FILE)
    rows = store.rows(split)
    npy, index = write(output, combined.read(teacher, rows), store.column("clip_id")[rows],
                       teacher or "ensemble_logits")
    console.info(f"{len(rows)} {split} clips")
    console.out.print(f"{npy}\n{index}")


@app.command("import-logits")
@user_errors
def import_logits(
    npy: Annotated[Path, typer.Argument(metavar="NPY", help="Logits .npy, e.g. passt_enemble_logits_mAP_495.npy.", exists=True,
                                        dir_okay=False)],
    index: Annotated[Path, typer.Argument(metavar="INDEX_PKL", help="Its fname_to_index.pkl.", exists=True, dir_okay=False)],
    config: ConfigOption = None,
    set_: SetOption = None,
    name: Annotated[str, typer.Option(help="Teacher name for the config entry.")] = "passt_ensemble",
    build: BuildOption = False,
) -> None:
    """Check EfficientAT-format logits against the prepared clips and print the teacher entry that uses them."""
    from kdpipe.interop import coverage_by_split
    from kdpipe.interop import import_logits as read
    from kdpipe.waveform_store import WaveformStore

    pipeline = make_pipeline(resolve_config(config, set_))
    store = WaveformStore.open(pipeline.output(stage_names.PREPARE, build) / STORE_FILE)
    aligned, found = read(npy, index, store.column("clip_id"), len(store.classes))
    decoded = store.rows()
    for split, (covered, clips) in coverage_by_split(aligned[decoded], store.column("split")[decoded]).items():
        console.info(f"{split}: logits for {covered} of {clips} clips")
    if found == 0:
        raise KdpipeError("none of the prepared clip ids is in the index: keys should be YouTube ids")
    entry = {"name": name, "logits": str(npy.resolve()), "logits_index": str(index.resolve())}
    console.info("add this entry to `teachers:` in your config; clips without logits get no KD term:")
    console.out.print(config_module.dump_yaml([entry]), end="", markup=False)


@app.command(epilog="Example: kdpipe predict --config run.yaml dog.wav street.flac --top-k 5")
@user_errors
def predict(
    files: Annotated[list[Path], typer.Argument(metavar="FILE", help="Audio files (WAV, FLAC, OGG, MP3, ...), any length and rate.",
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
    build: BuildOption = False,
) -> None:
    """Top labels of audio files from a trained model: windows of the training clip length, averaged."""
    from kdpipe.devices import resolve_device
    from kdpipe.predict import predict_files, top_k as ranked, write_windows_csv
    from kdpipe.tagger import load_tagger

    resolved = resolve_config(config, set_)
    tagger = load_tagger(make_pipeline(resolved), model, arch, resolve_device(resolved.device), build)
    predictions = predict_files(tagger, files, window_seconds, hop_seconds, resolved.evaluation.batch_size)
    for prediction in predictions:
        console.out.print(f"{prediction.path} ({prediction.seconds:.2f} s, {len(prediction.starts)} window(s))",
                          markup=False)
        for label, probability in ranked(prediction.probabilities, tagger.classes.names, top_k):
            console.out.print(f"  {probability:.3f}  {label}", markup=False)
    if windows is not None:
        write_windows_csv(predictions, tagger.classes.names, windows, top_k)
        console.info(f"per-window predictions: {windows}")


@app.command("export", epilog="Example: kdpipe export --config run.yaml --format onnx --out student.onnx")
@user_errors
def export_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    format: Annotated[str, typer.Option(metavar="onnx|torchscript", help="Model file format.")] = "onnx",
    model: ModelOption = "student",
    arch: ArchOption = None,
    with_frontend: Annotated[bool, typer.Option("--with-frontend/--no-frontend", help="Take float32 waveforms "
                                                "(batch, samples) at data.sample_rate, or the model's "
                                                "features.")] = True,
    out: Annotated[Path | None, typer.Option(help="File to write; default <model>[-features].onnx or "
                                             "<model>[-features].torchscript.pt.")] = None,
    build: BuildOption = False,
) -> None:
    """Export a trained model (dynamic batch; class list and frontend settings inside) and check it against torch."""
    from kdpipe.export import FORMATS, PARITY_BATCHES, PARITY_TOLERANCE, SUFFIXES, export_tagger
    from kdpipe.tagger import load_tagger

    if format not in FORMATS:
        raise ConfigError(f"--format: one of {', '.join(FORMATS)}; got {format!r}")
    tagger = load_tagger(make_pipeline(resolve_config(config, set_)), model, arch, build=build)
    path = out or Path(f"{tagger.name}{'' if with_frontend else '-features'}{SUFFIXES[format]}")
    result = export_tagger(tagger, path, format, with_frontend)
    runtime = "onnxruntime" if format == "onnx" else "torch.jit.load"
    console.info(f"parity: {runtime} against torch at batch sizes {', '.join(map(str, PARITY_BATCHES))}: "
                 f"max abs logit difference {result.max_abs_diff:.2e}")
    if result.max_abs_diff > PARITY_TOLERANCE:
        console.err.print(f"[yellow]warning:[/yellow] the difference exceeds {PARITY_TOLERANCE:g}; "
                          f"compare the exported model's outputs before deploying it")
    console.out.print(str(path))


@app.command(epilog="Example: kdpipe compare --config run.yaml --variant 'views 8: extract.views=8' --variant 'no KD: student.kd.enabled=false' --seeds 0,1,2")
@user_errors
def compare(
    variant: Annotated[list[str], typer.Option("--variant", metavar="NAME: KEY=VALUE", help="NAME: KEY=VALUE; KEY=VALUE (repeatable), "
                                               "e.g. 'views 8: extract.views=8'; 'NAME:' alone is the run as "
                                               "configured.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    seeds: Annotated[str, typer.Option(metavar="N,N,...", help="Student seeds, comma-separated.")] = "0,1,2",
    out: Annotated[Path, typer.Option(help="Folder for comparison.md, comparison.json and "
                                      "comparison.png.")] = Path("kdpipe-compare"),
    build: BuildOption = False,
) -> None:
    """Variants of the run side by side: each one's student eval mAP per seed and mean, a table and a plot."""
    from rich.table import Table

    from kdpipe.compare import Variant, student_scores, write_comparison

    try:
        seed_list = [int(seed) for seed in seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds: comma-separated integers, e.g. 0,1,2; got {seeds!r}") from None
    results = []
    for text in variant:
        chosen = Variant.parse(text)
        pipelines = ((seed, make_pipeline(resolve_config(config, [*(set_ or []), *chosen.overrides,
                                                                   f"student.seed={seed}"])))
                     for seed in seed_list)
        results.append(student_scores(chosen, pipelines, build))
    split = resolve_config(config, set_, check_files=False).evaluation.split
    report = write_comparison(results, out, split)
    table = Table("variant", *(f"seed {seed}" for seed in seed_list), "mean", title=f"student {split} mAP")
    for result in results:
        table.add_row(result.variant.name, *(f"{score:.4f}" for score in result.mAP), f"{result.mean:.4f}")
    console.out.print(table)
    console.out.print(str(report))
