"""`kdpipe bench ...`: throughput of our path and of a naive baseline, measured side by side, as a ratio."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from kdpipe import console
from kdpipe.cli.common import bench_app, user_errors
from kdpipe.errors import ConfigError


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
    arch = teacher or ("passt_s_s10" if cuda else "passt_tiny")
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
