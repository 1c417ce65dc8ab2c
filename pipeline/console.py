"""One place for user-facing output: messages, verbosity and progress bars.

Messages and progress go to stderr so that stdout carries only results
(tables, YAML) that users may pipe elsewhere. How much is said is the level of the
standard `logging` logger "kdpipe" (INFO unless set): the CLI's --quiet/--verbose set it,
and a program using kdpipe as a library sets it the way it sets any library's.
"""

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

err = Console(stderr=True, highlight=False)
# Piped results (tables included) are not wrapped at 80 columns: scripts and logs read them whole.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)

LOGGER = logging.getLogger("kdpipe")
if LOGGER.level == logging.NOTSET:
    LOGGER.setLevel(logging.INFO)


def set_verbosity(level: int) -> None:
    """0 quiet (warnings and results only), 1 normal, 2 verbose."""
    LOGGER.setLevel({0: logging.WARNING, 1: logging.INFO}.get(level, logging.DEBUG))


def info(message: str) -> None:
    if LOGGER.isEnabledFor(logging.INFO):
        err.print(message)


def warn(message: str) -> None:
    """Shown even under --quiet: something was wrong and kdpipe recovered."""
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True, highlight=False)


def debug(message: str) -> None:
    if LOGGER.isEnabledFor(logging.DEBUG):
        err.print(f"[dim]{message}[/dim]")


def progress() -> Progress:
    """A progress bar for long work; silent under --quiet."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not LOGGER.isEnabledFor(logging.INFO),
        transient=False,
    )


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate with a progress bar."""
    with progress() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
