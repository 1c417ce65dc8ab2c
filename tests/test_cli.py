"""The CLI as a user meets it: the demo, then status, run, prepare, config show and cache ls/gc."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdpipe.cli import app

from helpers import invoke

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
FAST = ("--set", "teacher_training.epochs=1", "--set", "student.epochs=1", "--train-clips", "24", "--val-clips", "8",
        "--eval-clips", "16", "--seeds", "2")
TEACHERS = ("passt_tiny", "mn04")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "kdpipe-demo"
    output = invoke("demo", "--out", str(out), *FAST)
    assert "prepare: 48 clips decoded, none skipped" in output  # train 24, val 8, eval 16
    for teacher in TEACHERS:
        assert f"train-teacher/{teacher}: done" in output
    assert "extract-teachers: done" in output and re.search(r"ensemble\s+mAP 0\.\d{4}", output)
    assert re.search(r"model\s+┃ eval mAP\s+┃ parameters\s+┃ MACs \(1 s clip\)\s+┃ clips/s", output)
    for row in (*(f"teacher {t}" for t in TEACHERS), "teacher ensemble", "student, with KD", "student, no KD"):
        assert re.search(rf"{row}\s+│ 0\.\d{{4}}\s+│ [\d.]+ [kM]\s+│ [\d.]+ [MG]\s+│ [\d.]+", output), row
    assert "teacher mn04: 2 cross-fitted models, fold 0: the last epoch" in output
    assert "student, no KD: the last epoch" in output
    assert "Every checkpoint above was chosen without the eval split it is scored on." in output
    # the evidence: what the teachers predict for the train events the labels leave out
    assert re.search(r"Teachers' mean probability on the train clips: \d+ of \d+ events are unlabelled", output)
    assert re.search(r"│ ensemble\s+│ 0\.\d{3}\s+│ 0\.\d{3}\s+│ \d+%", output)
    assert "Per-class eval AP" in output and re.search(r"│ Doorbell\s+│ \d+%\s+│ [\d.]+\s+│ [\d.]+\s+│ [\d.]+", output)
    # both students over seeds 0 and 1, their spread, and one plain finding
    assert re.search(r"student, with KD\s+│ 0\.\d{4}\s+│ 0\.\d{4}\s+│ 0\.\d{4} ± 0\.\d{4}", output)
    assert re.search(r"KD - no KD\s+│ [+-]0\.\d{4}\s+│ [+-]0\.\d{4}", output)
    assert re.search(r"Finding: (KD beat|KD lost to|No consistent effect of KD)", output)
    # where the time went: every stage, then the seeds' students
    assert re.search(r"Where the demo's \d+ s went", output)
    for step in ("prepare", "train-teacher/mn04", "extract-teachers", "evaluate", "train-student (seed 1)",
                 "train-student/no-kd (seed 1)", "total"):
        assert re.search(rf"│ {re.escape(step)}\s+│ \d+\.\d", output), step
    assert output.count("report:") == 1
    report = Path(re.search(r"report: (\S+report\.md)", output).group(1))
    assert report.is_file() and (report.parent / "metrics.json").is_file()
    assert (out / "seeds" / "comparison.png").is_file()
    return out / "demo.yaml"


def test_demo_leaves_every_stage_fresh_and_rerun_is_cached(demo):
    status = invoke("status", "--config", str(demo))
    stages = ("prepare", *(f"train-teacher/{t}" for t in TEACHERS), *(f"extract/{t}" for t in TEACHERS),
              "extract-teachers", "train-student", "train-student/no-kd", "evaluate")
    for stage in stages:
        assert re.search(rf"{stage}\s+│\s+fresh", status), status
    assert invoke("run", "--config", str(demo)).count(": cached") == len(stages)
    again = invoke("demo", "--out", str(demo.parent), *FAST)
    assert "building" not in again and "wrote" not in again and "student, no KD" in again
    assert re.search(r"│ train-student \(seed 1\)\s+│ cached", again)


def prepare_entries(listing: str) -> int:
    return sum(1 for line in listing.splitlines() if line.startswith("│ prepare ") and "complete" in line)


def test_status_explains_a_change_and_prepare_rebuilds(demo):
    status = invoke("status", "--config", str(demo), "--set", "prepare.min_seconds=0.6")
    assert "stale" in status and "prepare.min_seconds: 0.5 -> 0.6" in status
    # 2 train-teacher, 2 extract, the ensemble, both students, evaluate
    assert status.count("upstream prepare changed") == 8
    output = invoke("prepare", "--config", str(demo), "--set", "prepare.min_seconds=0.6")
    assert "prepare: building" in output and output.strip().endswith("waveforms.zarr")
    listing = invoke("cache", "ls", "--config", str(demo))
    assert prepare_entries(listing) == 2 and listing.count("train-teacher/") == 2
    dry = invoke("cache", "gc", "--config", str(demo), "--dry-run")
    # the 0.6 store goes; the teachers and both students stay (the baseline is a stage of the demo's config);
    # the seed-1 students of the demo's spread are not stages of its config, so they go too
    assert dry.count("would remove prepare/") == 1 and dry.count("would remove train-student/") == 2
    assert "would remove train-teacher" not in dry and "would remove extract" not in dry
    assert prepare_entries(invoke("cache", "ls", "--config", str(demo))) == 2
    invoke("cache", "gc", "--config", str(demo))
    assert prepare_entries(invoke("cache", "ls", "--config", str(demo))) == 1
    after = invoke("status", "--config", str(demo))
    assert re.search(r"prepare\s+│\s+fresh", after) and re.search(r"evaluate\s+│\s+fresh", after)


def test_force_rebuilds_a_fresh_stage(demo):
    output = invoke("prepare", "--config", str(demo), "--force")
    assert "rebuilding beside the committed output" in output and "done in" in output


def test_user_errors_exit_2_without_traceback(tmp_path):
    for args in (["status", "--config", str(tmp_path / "nope.yaml")],
                 ["prepare", "--set", "data.sample_rate=fast"],
                 ["status", "--set", f"data.sources.0.path={tmp_path / 'missing.csv'}"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "error:" in result.output


def test_empty_sources_is_a_clear_failure(tmp_path):
    result = runner.invoke(app, ["prepare", "--set", f"cache_dir={tmp_path}"])
    assert result.exit_code == 1 and "data.sources is empty" in result.output


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "kdpipe", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "extract" not in result.stderr and "demo" in result.stdout


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    demo_command, test_command = blocks[0].strip(), blocks[1].strip()
    assert demo_command.endswith("kdpipe demo") and "pip install -c constraints.txt ." in demo_command
    assert "-c constraints.txt" in test_command
    assert readme.index(demo_command) < 300
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] != "#"]
    assert ci_lines[-1] == test_command


def test_verbose_says_why_a_stage_is_rebuilt(demo):
    result = runner.invoke(app, ["--verbose", "prepare", "--config", str(demo), "--set", "prepare.min_seconds=0.7"])
    assert result.exit_code == 0, result.output
    assert "prepare: prepare.min_seconds: 0.5 -> 0.7" in result.output
    plain = runner.invoke(app, ["prepare", "--config", str(demo), "--set", "prepare.min_seconds=0.8"])
    assert "prepare: building" in plain.output and "prepare.min_seconds: 0.5 -> 0.8" not in plain.output
