"""Stage two: the KD loss, the student stage, its caching and exact resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.models import create_model, load_checkpoint
from pipeline.runner import Pipeline
from pipeline.training import Mixup
from stages import build_stages
from stages.train_student import kd_loss


def test_kd_loss_follows_efficientat_semantics():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), (torch.rand(6, 5) > 0.7).float()
    teacher_logits = torch.randn(10, 5)
    targets = torch.sigmoid(teacher_logits / 2.0)
    present = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.float32)  # row 3 has no teacher
    rows = torch.tensor([0, 3, 5, 7, 8, 9])
    loss = kd_loss(targets, present, 0.1)(logits, rows, labels, None)
    label_part = F.binary_cross_entropy_with_logits(logits, labels)
    per_clip = torch.stack([F.binary_cross_entropy_with_logits(logits[i], targets[r]) * present[r]
                            for i, r in enumerate(rows)])
    torch.testing.assert_close(loss, 0.1 * label_part + 0.9 * per_clip.mean())
    mixup = Mixup(torch.full((6,), 0.7), torch.tensor([1, 0, 3, 2, 5, 4]))
    mixed = kd_loss(targets, present, 0.1)(logits, rows, labels, mixup)
    expected_kd = torch.stack([
        0.7 * F.binary_cross_entropy_with_logits(logits[i], targets[rows[i]]) * present[rows[i]]
        + 0.3 * F.binary_cross_entropy_with_logits(logits[i], targets[rows[j]]) * present[rows[j]]
        for i, j in enumerate(mixup.perm.tolist())])
    expected_label = F.binary_cross_entropy_with_logits(logits, 0.7 * labels + 0.3 * labels[mixup.perm])
    torch.testing.assert_close(mixed, 0.1 * expected_label + 0.9 * expected_kd.mean())


def settings(small_demo, cache, *extra):
    return [f"cache_dir={cache}", f"data.sources.0.path={small_demo.manifest}",
            f"data.class_list={small_demo.class_list}", "data.clip_seconds=1.0", "prepare.workers=1",
            "teachers.0.arch=mn_tiny", "teacher_training.epochs=1", "teacher_training.batch_size=4",
            "teacher_training.num_workers=0", "extract.num_workers=0", "student.arch=mobilenetv3",
            "student.width=0.2", "student.epochs=2", "student.epoch_samples=16", "student.batch_size=4",
            "student.num_workers=0", *extra]


def make(small_demo, cache, *extra) -> Pipeline:
    config = load_config(None, settings(small_demo, cache, *extra))
    return Pipeline(build_stages(config), config)


def test_student_trains_from_cached_teachers_and_width_changes_only_the_student(small_demo, tmp_path):
    pipeline = make(small_demo, tmp_path)
    out = pipeline.ensure("train-student")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    model = load_checkpoint(create_model("mobilenetv3", width=0.2, num_classes=12), out / "best.pt")
    assert model.width == 0.2
    wider = make(small_demo, tmp_path)
    result = CliRunner().invoke(app, ["train-student", "--width", "0.3",
                                      *[f"--set={item}" for item in settings(small_demo, tmp_path)]])
    assert result.exit_code == 0, result.output
    assert "train-student: building" in result.output and "extract-teachers: cached" in result.output
    assert "train-teacher/mn_tiny: cached" in result.output
    assert wider.status("train-student").state == "fresh"  # the 0.2 student is still cached


def test_no_kd_baseline_needs_no_teachers(small_demo, tmp_path):
    config = load_config(None, [item for item in settings(small_demo, tmp_path, "student.kd.enabled=false")
                                if not item.startswith(("teachers.", "teacher_training."))])
    pipeline = Pipeline(build_stages(config), config)
    assert pipeline.stage("train-student").upstream == ("prepare",)
    pipeline.ensure("train-student")
    with_kd = load_config(None, [item for item in settings(small_demo, tmp_path) if not item.startswith("teachers.")])
    assert "train-student" not in [stage.name for stage in build_stages(with_kd)]
    result = CliRunner().invoke(app, ["train-student", *[f"--set={item}" for item in settings(small_demo, tmp_path)
                                                         if not item.startswith("teachers.")]])
    assert result.exit_code == 1 and "teachers is empty" in result.output


def test_kill_9_then_rerun_resumes_with_identical_metrics(small_demo, tmp_path):
    """A real `kdpipe train-student` killed after an epoch continues where it stopped, metrics unchanged."""
    make(small_demo, tmp_path / "killed").ensure("extract-teachers")  # upstream built once, copied below
    shutil.copytree(tmp_path / "killed", tmp_path / "clean")
    common = ["student.epochs=4", "student.epoch_samples=24", "student.batch_size=2"]
    command = lambda cache: [sys.executable, "-m", "pipeline", "train-student",  # noqa: E731
                             *[f"--set={item}" for item in settings(small_demo, cache, *common)]]
    process = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    metrics = None
    while time.monotonic() < deadline and process.poll() is None:
        metrics = next((tmp_path / "killed").glob("train-student/*/resume.pt"), None)
        if metrics is not None:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert metrics is not None, "no epoch finished before the deadline"
    resumed = subprocess.run(command(tmp_path / "killed"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    clean = subprocess.run(command(tmp_path / "clean"), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr

    def read(cache):
        folder = next(cache.glob("train-student/*/metrics.jsonl")).parent
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k != "seconds"} for line in lines], folder

    (killed, killed_dir), (uninterrupted, clean_dir) = read(tmp_path / "killed"), read(tmp_path / "clean")
    assert [line["epoch"] for line in killed] == [1, 2, 3, 4]
    assert killed == uninterrupted
    assert not (killed_dir / "resume.pt").exists()
    a, b = torch.load(killed_dir / "last.pt", weights_only=True), torch.load(clean_dir / "last.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize(("teacher", "student"), [("mn_tiny", "passt_tiny"), ("ast_tiny", "mn_tiny")])
def test_cmkd_in_both_directions(small_demo, tmp_path, teacher, student):
    """CNN -> transformer and transformer -> CNN: any registry model learns from any teacher's logits."""
    pipeline = make(small_demo, tmp_path, f"teachers.0.arch={teacher}", f"student.arch={student}")
    out = pipeline.ensure("train-student")
    record = pipeline.cache.record("train-student", pipeline.key("train-student"))
    assert record["summary"]["arch"] == student and record["summary"]["kd"] is True
    assert pipeline.stage("train-student").upstream == ("prepare", "extract-teachers")
    load_checkpoint(create_model(student, num_classes=12), out / "best.pt")
