"""Commands that show things without running a stage: the resolved config, the model registry."""

from __future__ import annotations

from typing import Annotated

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
    """Print the resolved config (defaults < file < --set) as YAML."""
    resolved = resolve_config(config, set_, check_files=False)
    plain = config_module.to_plain(resolved)
    if stage is not None:
        plain = make_pipeline(resolved).stage(stage).parameters(resolved)
    console.out.print(config_module.dump_yaml(plain), end="", markup=False)
    for note in coverage_notes(resolved):  # on stderr: stdout stays valid YAML
        console.info(note)
