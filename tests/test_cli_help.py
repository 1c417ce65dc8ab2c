"""First contact: help that reads like a tool's, README that agrees with the CLI, and calm edges (interrupts,
missing demo data, inspection that writes nothing, an empty cache)."""

import re
from pathlib import Path

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from kdpipe.cli import app, normalized_argv
from kdpipe.runner import Pipeline

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def every_command() -> list[list[str]]:
    """The argv prefix of every command and group of the app, e.g. ["cache", "ls"]."""
    found: list[list[str]] = []

    def walk(command: click.Command, prefix: list[str]) -> None:
        found.append(prefix)
        for name, child in getattr(command, "commands", {}).items():
            walk(child, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return found


def help_of(prefix: list[str]) -> str:
    result = runner.invoke(app, [*prefix, "--help"], terminal_width=200)
    assert result.exit_code == 0, (prefix, result.output)
    return result.output


def test_no_help_shows_python_types_and_choices_are_listed():
    commands = every_command()
    assert ["cache", "ls"] in commands and ["bench", "extract"] in commands and len(commands) > 20
    for prefix in commands:
        text = help_of(prefix)
        leaked = re.findall(r"<(?:bool|str|int|float|Path|list\[[^\]]*\])[^>]*>|\{[a-z_]+\}", text)
        assert not leaked, (prefix, leaked)
    assert "onnx|torchscript" in help_of(["export"]) and "auto|fp32|bf16" in help_of(["bench", "extract"])
    assert "predict [OPTIONS] FILE..." in help_of(["predict"])
    top = help_of([])
    panels = [name for name in ("Start", "Stages", "Results", "Cache", "Inspect", "Bench") if f"─ {name} ─" in top]
    assert len(panels) == 6 and top.index("─ Start ─") < top.index("─ Stages ─") and "kdpipe demo" in top
    for example in (["predict"], ["export"], ["compare"], ["verify"], ["manifest", "from-audioset"]):
        assert "Example: kdpipe " in help_of(example), example


def test_readme_agrees_with_the_cli():
    """Every `kdpipe COMMAND ... --option` README shows exists; the global options and exit codes it states are
    the app's."""
    readme = (ROOT / "README.md").read_text()
    commands = {" ".join(prefix) for prefix in every_command() if prefix}
    shown = re.findall(r"kdpipe((?: [a-z][a-z-]*)+)((?: [^`\n]*)?)", readme)
    assert len(shown) > 10
    for words, rest in shown:
        names = words.split()
        command = next((" ".join(names[:n]) for n in (2, 1) if " ".join(names[:n]) in commands), None)
        if command is None:
            continue  # prose: "kdpipe is ...", "kdpipe demo's table"
        options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest.split("|")[0]))
        text = help_of(command.split())
        missing = {option for option in options if option not in text}
        assert not missing, f"README shows `kdpipe {command}` with {sorted(missing)}, which it does not take"
    top = help_of([])
    for option in ("--verbose", "-v", "--quiet", "-q", "--version"):
        assert option in top
    assert "every command takes `--config" not in readme.lower()
    assert re.search(r"\b2\b[^.\n]*(usage|config)", readme), "README states exit code 2 for usage/config errors"


def test_global_flags_work_after_the_command_too(tmp_path):
    args = normalized_argv(["status", "-v", "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert args[:2] == ["-v", "status"]
    assert runner.invoke(app, args).exit_code == 0


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "ensure", interrupted)
    result = runner.invoke(app, ["prepare", "--set", f"cache_dir={tmp_path}"])
    assert result.exit_code == 130 and result.output.strip() == "interrupted: rerun the same command to resume"


def test_inspection_writes_nothing_and_an_empty_cache_says_so(tmp_path):
    cache = tmp_path / "cache"
    for args in (["status"], ["config", "show", "--stage", "prepare"], ["cache", "ls"]):
        result = runner.invoke(app, [*args, "--set", f"cache_dir={cache}"])
        assert result.exit_code == 0, (args, result.output)
    assert not cache.exists()
    assert f"the cache at {cache} is empty" in result.output
    unknown = runner.invoke(app, ["config", "show", "--stage", "bogus", "--set", f"cache_dir={cache}"])
    assert unknown.exit_code == 2 and "unknown stage 'bogus'; stages: prepare" in unknown.output


def test_config_show_prints_resolved_values_and_marks_them():
    result = runner.invoke(app, ["config", "show", "--set", "seed=7", "--set", "student.arch=mn10"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["student"]["seed"] == 7 and shown["student"]["precision"] in ("fp32", "bf16")
    assert shown["student"]["arch"] == "mobilenetv3" and shown["student"]["width"] == 1.0
    lines = result.output.splitlines()
    assert any(line.strip().startswith('precision: "fp32"  # resolved from "auto"') for line in lines)
    assert any(line.strip() == 'engine: "local"  # default, unkeyed' for line in lines)
    assert any(line.strip() == "seed: 7" for line in lines)  # set by the user: no mark


def test_a_missing_demo_dataset_names_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["status", "--config", str(ROOT / "configs" / "demo.yaml")])
    assert result.exit_code == 2 and "generated by `kdpipe demo`" in result.output, result.output


@pytest.mark.parametrize("argv", [["run", "--force"], ["demo", "--force", "--seeds", "1"]])
def test_a_bare_force_becomes_a_stage_question(argv):
    assert "--force=" in normalized_argv(argv)
