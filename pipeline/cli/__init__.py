"""The `kdpipe` command line. Verbs match the library's functions; stages are brought up to date on demand.

One module per group of commands (lhotse's layout): `stages` builds (prepare ... evaluate, run, demo),
`results` reads what is built (predict, export, export-logits, import-logits), `state` inspects and
repairs the cache (status, verify, cache ls/gc), `info` shows configs and models, `bench` measures,
`manifest` builds manifests. Commands parse, call the library and print; they hold no library logic.

Exit codes: 0 ok, 1 a run failed, 2 a usage or config error. User errors
print one message a user can act on, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from kdpipe import __version__, console
from kdpipe.cli.common import app

# Each group registers its commands on `app` when imported.
for _group in ("stages", "results", "state", "info", "bench", "manifest"):
    importlib.import_module(f"kdpipe.cli.{_group}")

# The help panels, in the order `kdpipe --help` shows them, and the commands (and groups) each holds.
PANELS = {
    "Start": ("demo", "run", "status"),
    "Stages": ("prepare", "train-teacher", "extract-teachers", "train-student", "evaluate"),
    "Results": ("predict", "export", "compare", "export-logits", "import-logits"),
    "Cache": ("verify", "cache"),
    "Inspect": ("config", "models", "manifest"),
    "Bench": ("bench",),
}
_ORDER = [name for names in PANELS.values() for name in names]


def _command_name(info: typer.models.CommandInfo | typer.models.TyperInfo) -> str:
    return info.name or info.callback.__name__.replace("_", "-")  # type: ignore[union-attr]


for _info in [*app.registered_commands, *app.registered_groups]:
    _info.rich_help_panel = next(panel for panel, names in PANELS.items() if _command_name(_info) in names)
app.registered_commands.sort(key=lambda info: _ORDER.index(_command_name(info)))


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


def main() -> None:
    app(args=normalized_argv(sys.argv[1:]))


GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet")


def normalized_argv(argv: list[str]) -> list[str]:
    """The command line as the app parses it: `-v`/`-q` after the command move before it (`kdpipe status -v`
    works as `kdpipe -v status`), and on `run` and `demo`, which take `--force STAGE`, a bare `--force`
    becomes `--force=`, so the command names the stages (exit 2) instead of click's "requires an argument"
    or taking the next option as the stage."""
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if at is None:
        return argv
    after = argv[at + 1:]
    flags = [arg for arg in after if arg in GLOBAL_FLAGS]
    after = [arg for arg in after if arg not in GLOBAL_FLAGS]
    if argv[at] in ("run", "demo"):
        after = [("--force=" if arg == "--force" and (i + 1 == len(after) or after[i + 1].startswith("-")) else arg)
                 for i, arg in enumerate(after)]
    return [*argv[:at], *flags, argv[at], *after]


__all__ = ["app", "main", "normalized_argv"]
