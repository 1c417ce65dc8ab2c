"""What every command shares: the app and its groups, the config options, the error boundary, and the
pipeline of a config. Each sibling module adds one group of commands to `app`."""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from kdpipe import console, torch_stack
from kdpipe.config import Config, load_config
from kdpipe.errors import ConfigError, KdpipeError, environment_error
from kdpipe.distributed import SINGLE, Ranks
from kdpipe.runner import Pipeline

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="kdpipe",
    help="Offline knowledge distillation for audio tagging: transformer teachers -> efficient CNN students.",
    epilog="Start here: [bold]kdpipe demo[/bold] runs every stage on generated data (about 3 minutes on a CPU); "
           "then [bold]kdpipe status --config kdpipe-demo/demo.yaml[/bold].",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


def _help_value(param: Any, ctx: Any) -> str | None:
    """What help shows after an option: nothing after a flag, else its metavar, its choices, or its kind in
    capitals (typer's own display prints Python types: <bool>, <list[str]>, <int range>)."""
    if getattr(param, "is_flag", False):
        return None
    if param.metavar is not None:
        return param.metavar
    described = param.type_descriptor
    if described.is_choice:
        return "|".join(str(choice) for choice in described.choices or ())
    if described.is_path:
        return "PATH"
    annotation = described.annotation
    element = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else annotation
    return {int: "INTEGER", float: "NUMBER", str: "TEXT"}.get(element, getattr(element, "__name__", "VALUE").upper())


typer.core.TyperOption.display_type_rich = _help_value  # type: ignore[method-assign]
typer.core.TyperArgument.display_type_rich = lambda param, ctx: None  # type: ignore[method-assign]  # its metavar says it
# usage lines: `predict [OPTIONS] FILE...`, not typer's `{FILE}...` for a required argument
typer.core.TyperArgument._usage_display_name = lambda param: (  # type: ignore[method-assign]
    (param.display_name_raw if param.required else f"[{param.display_name_raw}]") + ("..." if param.nargs != 1 else ""))
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
    typer.Option("--config", "-c", metavar="FILE", help="Run config (YAML). Default: ./kdpipe.yaml if present, else built-in defaults.",
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
        except KeyboardInterrupt:
            console.err.print("interrupted: rerun the same command to resume", markup=False, highlight=False)
            raise typer.Exit(130) from None
        except KdpipeError as exc:
            console.err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def resolve_config(path: Path | None, overrides: list[str] | None, flags: dict[str, Any] | None = None,
                   *, check_files: bool = True) -> Config:
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    try:
        return load_config(path, overrides or [], flags, check_files=check_files)
    except ConfigError as exc:
        if path is not None and path.name == "demo.yaml" and "no such file" in str(exc):
            raise ConfigError(f"{exc}\n  the demo's data is generated by `kdpipe demo`: run it first") from None
        raise


def make_pipeline(config: Config, ranks: Ranks = SINGLE, inspect_only: bool = False) -> Pipeline:
    """The config's stages over its cache folder: checked usable before any stage runs, or, for a command
    that only inspects (`inspect_only`), left exactly as it is (not even created)."""
    from kdpipe.stages import build_stages

    pipeline = Pipeline(build_stages(config), config, ranks, read_only=inspect_only)
    if not inspect_only:
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
