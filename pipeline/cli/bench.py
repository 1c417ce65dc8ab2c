"""`kdpipe bench ...`: throughput of our path and of a naive baseline, side by side, as a ratio; and `scale`,
the host-side steps at AudioSet's shape with their time and memory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from kdpipe import console
from kdpipe.cli.common import bench_app, human_bytes, user_errors
from kdpipe.errors import ConfigError

if TYPE_CHECKING:
    from kdpipe.bench_scale import ScaleResult


@bench_app.command("extract")
@user_errors
def bench_extract(
    arch: Annotated[str | None, typer.Option(metavar="NAME", help="Registry model (`kdpipe models`); default passt_s_s10 on CUDA, "
                                                "passt_tiny on a CPU.")] = None,
    clips: Annotated[int, typer.Option(min=1, help="Clips for our path.")] = 256,
    naive_clips: Annotated[int, typer.Option(min=1, help="Clips for the naive loop (it is slow).")] = 64,
    seconds: Annotated[float, typer.Option(min=0.1, help="Clip length.")] = 10.0,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Default: 64 on CUDA, 4 on a CPU.")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Loader processes; default 4 on CUDA, 0 on "
                                                "a CPU (they would compete with the model for cores).")] = None,
    device: Annotated[str, typer.Option(metavar="auto|cpu|cuda|cuda:N", help="Where to run.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile our path (compile time excluded).")] = False,
    precision: Annotated[str, typer.Option(metavar="auto|fp32|bf16", help="auto (bf16 on CUDA, fp32 on a CPU), fp32 "
                                           "or bf16.")] = "auto",
    rounds: Annotated[int, typer.Option(min=1, help="Alternating rounds of both paths; medians are reported.")] = 3,
    views: Annotated[int, typer.Option(min=0, help="Also run each clip as this many augmented views "
                                       "(extract.views); throughput in clip-views/s.")] = 0,
) -> None:
    """Teacher inference: clips/s of extract-teachers' path against a one-clip fp32 CPU-feature loop."""
    from kdpipe.bench import bench_extract as run_bench
    from kdpipe.devices import resolve_device

    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision: one of auto, fp32, bf16; got {precision!r}")
    chosen = resolve_device(device)
    cuda = chosen.type == "cuda"
    arch = arch or ("passt_s_s10" if cuda else "passt_tiny")
    result = run_bench(arch, clips, seconds, batch_size or (64 if cuda else 4), chosen,
                       workers if workers is not None else (4 if cuda else 0), naive_clips, compile, precision, rounds,
                       views)
    unit = f"clip-views/s (1 clean + {views} views per clip)" if views else "clips/s"
    print_bench(result, unit=unit)


@bench_app.command("loader")
@user_errors
def bench_loader(
    clips: Annotated[int, typer.Option(min=1, help="Clips (generated demo audio in mixed formats).")] = 128,
    seconds: Annotated[float, typer.Option(min=0.1, help="Clip length.")] = 10.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Loader processes, the same for both loaders.")] = 2,
    device: Annotated[str, typer.Option(metavar="auto|cpu|cuda|cuda:N", help="Where to run.")] = "auto",
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
    arch: Annotated[str, typer.Option(metavar="NAME", help="Student to train.")] = "mn10",
    clips: Annotated[int, typer.Option(min=2, help="Clips (generated demo audio).")] = 128,
    seconds: Annotated[float, typer.Option(min=0.1, help="Clip length.")] = 10.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Loader processes.")] = 2,
    device: Annotated[str, typer.Option(metavar="auto|cpu|cuda|cuda:N", help="Where to run.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (the warm-up step "
                                          "compiles; not timed).")] = False,
) -> None:
    """Training throughput of train-student's step on our loader, and the share of time spent waiting for data."""
    from kdpipe.bench import bench_train as run_bench
    from kdpipe.devices import resolve_device

    result = run_bench(arch, clips, seconds, batch_size, workers, resolve_device(device), compile)
    print_bench(result, f"training {result['train_clips_per_s']:.1f} clips/s, "
                        f"waiting for data {100 * result['data_wait_share']:.1f} % of step time")


@bench_app.command("scale")
@user_errors
def bench_scale(
    clips: Annotated[int, typer.Option(min=2, help="Clips in the manifest and every store.")] = 2_000_000,
    classes: Annotated[int, typer.Option(min=3, help="Classes, with AudioSet-like imbalance.")] = 527,
    teachers: Annotated[int, typer.Option(min=1, help="Teachers (synthetic logits).")] = 3,
    views: Annotated[int, typer.Option(min=0, help="Augmented views per clip (extract.views).")] = 0,
    topk: Annotated[int, typer.Option(min=0, help="Logits kept per view (extract.topk).")] = 20,
    eval_clips: Annotated[int, typer.Option(min=1, help="Clips of the eval split.")] = 20_000,
    draw: Annotated[int, typer.Option(min=1, help="Clips drawn per epoch (student.epoch_samples).")] = 100_000,
    out: Annotated[Path | None, typer.Option(help="An empty folder for the stores, kept; default a temporary "
                                             "one under the current directory.")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the temporary folder.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Where the table goes as JSON; default "
                                                   "bench-scale.json beside the stores' folder.")] = None,
    extrapolate_to: Annotated[int | None, typer.Option(min=1, help="Add time and disk scaled to this many clips: "
                                                       "linearly, but for steps whose work does not grow "
                                                       "with the clips.")] = None,
) -> None:
    """AudioSet's shape: the real stages' host-side steps on stores of that size, with time and peak memory."""
    from kdpipe.bench_scale import RunCode, ScaleSettings
    from kdpipe.bench_scale import bench_scale as run_bench
    from kdpipe.cli.state import status
    from kdpipe.stages import build_stages, extract_teachers

    result = run_bench(ScaleSettings(clips, classes, teachers, views, topk, eval_clips, draw),
                       RunCode(build_stages, extract_teachers.eval_metrics, status), out, keep, json_path,
                       extrapolate_to)
    print_scale(result)


def print_scale(result: ScaleResult) -> None:
    """The steps as a table (extrapolated columns marked), then what the figures are and are not."""
    settings = result.settings
    table = Table("step", "seconds", "peak RSS", "baseline RSS", "on disk", "note",
                  title=f"{settings.clips:,} clips, {settings.classes} classes, {settings.teachers} teachers, "
                        f"{settings.views} views, top-{settings.topk}")
    scaled = result.extrapolate_to
    if scaled:
        table.add_column(f"seconds at {scaled:,} (extrapolated)")
        table.add_column(f"on disk at {scaled:,} (extrapolated)")
    for row in result.rows:
        disk = row.get("disk_bytes")
        cells = [row["step"], f"{row['seconds']:.2f}", human_bytes(row["peak_rss"]), human_bytes(row["baseline_rss"]),
                 "-" if disk is None else human_bytes(disk), row.get("note", "")]
        if scaled:
            extrapolated = row.get("extrapolated_disk_bytes")
            cells += [f"{row['extrapolated_seconds']:.1f}" + ("" if row["per_clip"] else " (not per clip)"),
                      "-" if extrapolated is None else human_bytes(extrapolated)]
        table.add_row(*cells)
    console.out.print(table)
    for note in result.notes:
        console.out.print(f"- {note}")
    kept = f"stores in {result.workspace} (kdpipe status -c {result.workspace}/kdpipe.yaml); " \
        if Path(result.workspace).is_dir() else ""
    console.out.print(f"cache {human_bytes(result.cache_bytes)}; {kept}table as JSON: {result.json_path}")


def print_bench(result: dict[str, Any], headline: str | None = None, unit: str = "clips/s") -> None:
    """Every measure in a table, then one line: by default ours against naive, as a ratio."""
    table = Table("measure", "value")
    for key, value in result.items():
        table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    console.out.print(table)
    paired = (f" (median of {result['rounds']} paired rounds, {result['speedup_range']})"
              if result.get("rounds", 1) > 1 else "")
    console.out.print(headline or f"ours {result['ours_clips_per_s']:.1f} {unit}, naive "
                                  f"{result['naive_clips_per_s']:.1f} {unit}: {result['speedup']:.2f}x{paired}")
