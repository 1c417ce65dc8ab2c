"""Commands that show things without running a stage: the resolved config, the model registry."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from kdpipe import config as config_module
from kdpipe import console
from kdpipe.cli.common import (ConfigOption, SetOption, app, config_app, coverage_notes, make_pipeline, resolve_config,
                               user_errors)


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


@config_app.command("show")
@user_errors
def config_show(
    config: ConfigOption = None,
    set_: SetOption = None,
    stage: Annotated[str | None, typer.Option(help="Only the keys this stage depends on.")] = None,
) -> None:
    """Print the resolved config (defaults < file < --set) as YAML, each setting at the value the run uses;
    comments mark defaults, values resolved from another (auto, null) and unkeyed settings."""
    from kdpipe.stage import resolved_settings

    given = resolve_config(config, set_, check_files=False)
    if stage is not None:
        plain = make_pipeline(given, inspect_only=True).stage(stage).parameters(given)
        console.out.print(config_module.dump_yaml(plain), end="", markup=False)
    else:
        resolved = resolved_settings(given)
        notes = _setting_notes(config_module.to_plain(given), config_module.to_plain(resolved),
                               config_module.to_plain(config_module.Config()), config_module.keyed_values(resolved))
        console.out.print("\n".join(_yaml_lines(config_module.to_plain(resolved), notes)), markup=False)
    for note in coverage_notes(given):  # on stderr: stdout stays valid YAML
        console.info(note)


def _setting_notes(given: dict, resolved: dict, defaults: dict, keyed: dict) -> dict[str, str]:
    """A comment per dotted setting: `default`, `resolved from X`, `unkeyed` (never in a stage key)."""
    notes: dict[str, str] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(child, f"{path}.{key}" if path else key)
            return
        if isinstance(value, list) and value and isinstance(value[0], dict):
            for i, child in enumerate(value):
                walk(child, f"{path}.{i}")
            return
        marks = []
        before = _at(given, path)
        if before != value:
            marks.append(f"resolved from {json.dumps(before)}")
        elif before == _at(defaults, path):
            marks.append("default")
        if _at(keyed, path) is _MISSING:
            marks.append("unkeyed")
        if marks:
            notes[path] = ", ".join(marks)

    walk(resolved, "")
    return notes


_MISSING = object()


def _at(plain: Any, path: str) -> Any:
    """`config.select`, with _MISSING where `plain` has no such setting (a teacher the defaults lack)."""
    try:
        return config_module.select(plain, path)
    except (KeyError, IndexError, TypeError):
        return _MISSING


def _yaml_lines(value: dict, notes: dict[str, str], path: str = "", indent: int = 0) -> list[str]:
    """Block YAML with a `# note` after each setting that has one (scalars in JSON spelling, which YAML reads)."""
    lines, pad = [], " " * indent
    for key, child in value.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(child, dict) and child:
            lines += [f"{pad}{key}:", *_yaml_lines(child, notes, dotted, indent + 2)]
        elif isinstance(child, list) and child and isinstance(child[0], dict):
            lines.append(f"{pad}{key}:")
            for i, item in enumerate(child):
                entry = _yaml_lines(item, notes, f"{dotted}.{i}", indent + 4)
                lines += [f"{pad}  - {entry[0].lstrip()}", *entry[1:]]
        else:
            note = f"  # {notes[dotted]}" if dotted in notes else ""
            lines.append(f"{pad}{key}: {json.dumps(child)}{note}")
    return lines
