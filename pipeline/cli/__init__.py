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

# Each group registers its commands on `app` when imported, in the order `--help` lists them.
for _group in ("stages", "results", "state", "info", "bench", "manifest"):
    importlib.import_module(f"kdpipe.cli.{_group}")


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
    app(args=with_force_values(sys.argv[1:]))


def with_force_values(argv: list[str]) -> list[str]:
    """`run` and `demo` take `--force STAGE`; a bare `--force` there becomes `--force=`, so the command says
    which stages there are (exit 2) instead of click's "requires an argument", or taking the next option as
    the stage."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in ("run", "demo"):
        return argv
    return [("--force=" if arg == "--force" and (i + 1 == len(argv) or argv[i + 1].startswith("-")) else arg)
            for i, arg in enumerate(argv)]


__all__ = ["app", "main", "with_force_values"]
