"""Commands about the cache's state: status, verify, cache ls, cache gc."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from kdpipe import console, stage_names
from kdpipe.cli.common import (ConfigOption, SetOption, app, cache_app, coverage_notes, human_bytes, make_pipeline,
                               resolve_config, user_errors)
from kdpipe.verify import Verdict


@app.command(epilog="Example: kdpipe verify --config run.yaml extract-teachers  (then `kdpipe run` rebuilds what was damaged)")
@user_errors
def verify(
    stage: Annotated[str | None, typer.Argument(metavar="STAGE", help="One stage; default: every stage of the config.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report damage without marking it.")] = False,
) -> None:
    """Check committed outputs against their checksums and digests; mark damaged ones for rebuilding."""
    pipeline = make_pipeline(resolve_config(config, set_))
    _print_verdicts(pipeline.verify([stage] if stage else None, mark=not dry_run))


def _print_verdicts(verdicts: list[Verdict]) -> None:
    table = Table("stage", "key", "result", "problems")
    damaged = 0
    for verdict in verdicts:
        damaged += bool(verdict.problems)
        colour = "red" if verdict.problems else "green" if verdict.action == "ok" else "yellow"
        table.add_row(verdict.stage, verdict.key, f"[{colour}]{verdict.action}[/]", "; ".join(verdict.problems[:5])
                      + (f"; and {len(verdict.problems) - 5} more" if len(verdict.problems) > 5 else ""))
    console.out.print(table)
    checked = sum(v.bytes_checked for v in verdicts)
    seconds = sum(v.seconds for v in verdicts)
    console.info(f"verified {human_bytes(checked)} in {seconds:.1f} s"
                 + (f" ({seconds / (checked / 1e9):.1f} s per GB)" if checked else ""))
    if damaged:
        console.info(f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}: `kdpipe run` rebuilds what is damaged")


@app.command()
@user_errors
def status(config: ConfigOption = None, set_: SetOption = None,
           verify_: Annotated[bool, typer.Option("--verify", help="Also verify committed outputs "
                                                 "(as `kdpipe verify`) before reporting.")] = False) -> None:
    """One row per stage: fresh, stale (and what changed) or missing; then how clips reach each model."""
    from kdpipe.manifests import load_clips

    pipeline = make_pipeline(resolve_config(config, set_), inspect_only=not verify_)
    if pipeline.config.data.sources and pipeline.status(stage_names.PREPARE).state != "fresh":
        # a malformed manifest is found here, not hours into prepare; a fresh prepare has read it (2 M rows: 70 s)
        load_clips(pipeline.config.data)
    if verify_:
        _print_verdicts(pipeline.verify())
    table = Table("stage", "state", "key", "why")
    colours = {"fresh": "green", "stale": "yellow", "missing": "red"}
    for name in pipeline.stages:
        state = pipeline.status(name)
        why = "; ".join(state.reasons) or ("up to date" if state.state == "fresh" else "never built")
        table.add_row(name, f"[{colours[state.state]}]{state.state}[/]", state.key, why)
    console.out.print(table)
    for note in coverage_notes(pipeline.config):
        console.out.print(note, markup=False, highlight=False)


@cache_app.command("ls")
@user_errors
def cache_ls(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Every cache entry: stage, key, complete or partial, size, used by the current config."""
    pipeline = make_pipeline(resolve_config(config, set_), inspect_only=True)
    entries = pipeline.cache.entries() if pipeline.cache.root.is_dir() else []
    if not entries:
        console.out.print(f"the cache at {pipeline.cache.root} is empty: no stage has been built there")
        return
    referenced = set(pipeline.referenced_keys().items())
    table = Table("stage", "key", "state", "size", "built", "current")
    for entry in entries:
        record = pipeline.cache.record(entry.stage, entry.key)
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(record["finished"])) if record else "-"
        table.add_row(entry.stage, entry.key, "complete" if entry.complete else "partial",
                      human_bytes(entry.size_bytes()), built, "yes" if (entry.stage, entry.key) in referenced else "")
    console.out.print(table)


@cache_app.command("gc")
@user_errors
def cache_gc(
    config: ConfigOption = None,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
) -> None:
    """Remove cache entries that the current config no longer references (never one being built or read)."""
    pipeline = make_pipeline(resolve_config(config, set_))
    freed, removed = 0, 0
    for entry, holder, size in pipeline.cache.collect_garbage(set(pipeline.referenced_keys().items()), dry_run):
        if holder is not None:
            console.out.print(f"skipped {entry.stage}/{entry.key}: in use ({holder})")
            continue
        freed, removed = freed + size, removed + 1
        console.out.print(f"{'would remove' if dry_run else 'removed'} {entry.stage}/{entry.key} ({human_bytes(size)})")
    console.info(f"{removed} entr{'y' if removed == 1 else 'ies'}, {human_bytes(freed)}"
                 f"{' would be' if dry_run else ''} freed")
