"""What every command shares: the app and its groups, the config options, the error boundary, and the
pipeline of a config. Each sibling module adds one group of commands to `app`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from kdpipe import console, torch_stack
from kdpipe.config import Config, load_config
from kdpipe.errors import KdpipeError, environment_error
from kdpipe.distributed import SINGLE, Ranks
from kdpipe.runner import Pipeline

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
bench_app = typer.Typer(help="Our path against a naive baseline, side by side (extract, loader, train); "
                        "AudioSet's shape (scale).", no_args_is_help=True)
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
ForceStagesOption = Annotated[
    list[str] | None,
    typer.Option("--force", metavar="STAGE", help="Recompute this stage even when it is cached (repeatable); its "
                 "committed output stays until the new one is committed."),
]


def forced_stages(pipeline: Pipeline, names: list[str] | None) -> set[str]:
    """The stages `--force STAGE` names, each one of the pipeline's (a usage error listing them otherwise)."""
    unknown = [name for name in names or [] if name not in pipeline.stages]
    if unknown:
        what = "needs a stage" if unknown == [""] else f"{', '.join(map(repr, unknown))} is not a stage of this config"
        raise typer.BadParameter(f"{what}; name one or more of: {', '.join(pipeline.stages)}", param_hint="--force")
    return set(names or [])
NoWaitOption = Annotated[
    bool, typer.Option("--no-wait", help="If another process is building the same output, exit instead of waiting.")
]
BuildOption = Annotated[bool, typer.Option("--build", help="Build what this command reads when it is stale or "
                                           "missing, instead of stopping with the command that builds it.")]


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
            console.err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def resolve_config(path: Path | None, overrides: list[str] | None, flags: dict[str, Any] | None = None,
                   *, check_files: bool = True) -> Config:
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load_config(path, overrides or [], flags, check_files=check_files)


def make_pipeline(config: Config, ranks: Ranks = SINGLE) -> Pipeline:
    """The config's stages over its cache folder (checked usable before any stage runs)."""
    from kdpipe.stages import build_stages

    pipeline = Pipeline(build_stages(config), config, ranks)
    pipeline.cache.check_writable()
    return pipeline


def coverage_notes(config: Config) -> list[str]:
    """For `kdpipe status` and `config show`: each model of the run whose input is shorter than a clip.

    Sizing a frontend needs torchaudio; where it cannot load, there are no notes (the commands
    that compute features say why), so these two commands keep answering.
    """
    import torch

    from kdpipe.models import create_model
    from kdpipe.models.windowing import coverage

    entries = [(f"teacher {t.label}", t.arch, dict(t.options), dict(t.frontend)) for t in config.teachers if t.arch]
    entries.append(("student", config.student.arch, dict(config.student.options), {}))
    notes = []
    for label, arch, options, frontend in entries:
        with torch.device("meta"):
            model = create_model(arch, **options)
        try:
            note = coverage(model, {**model.frontend_config, **frontend}, config.data.clip_seconds)
        except (ImportError, OSError, RuntimeError) as exc:
            if torch_stack.broken_member(exc) is None:
                raise
            return []
        if note:
            notes.append(f"{label}: {note}")
    return notes


def human_bytes(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
