"""The evaluate stage: metrics against an independent computation, its files, its caching; the report's pieces."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from sklearn.metrics import average_precision_score, label_ranking_average_precision_score, roc_auc_score

from typer.testing import CliRunner

from kdpipe.classes import ClassList
from kdpipe.cli import app
from kdpipe.config import load_config
from kdpipe.frontends import build_frontend
from kdpipe.evaluate import Evaluation, Footprint, combined_footprint, score, write_results
from kdpipe.models import create_model, load_checkpoint
from kdpipe.report import write_report
from kdpipe.students import build_student
from kdpipe.waveform_store import WaveformStore

from helpers import STUDENT_RUN, invoke, settings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_settings(small_demo, tmp_path_factory) -> list[str]:
    """A tiny run: an untrained mn_tiny teacher from a checkpoint (no train-teacher), a one-epoch student."""
    root = tmp_path_factory.mktemp("evaluate")
    checkpoint = root / "mn_tiny.pt"
    torch.save(create_model("mn_tiny", num_classes=12).state_dict(), checkpoint)
    return settings(STUDENT_RUN, small_demo, root / "cache", f"teachers.0.checkpoint={checkpoint}", "student.epochs=1",
                    "student.epoch_samples=8", "evaluation.batch_size=8")


def evaluate(run_settings: list[str], *extra: str) -> tuple[str, Path]:
    output = invoke("evaluate", *[f"--set={item}" for item in (*run_settings, *extra)])
    return output, Path(output.strip().splitlines()[-1]).parent


@pytest.fixture(scope="module")
def evaluated(run_settings) -> tuple[str, Path]:
    return evaluate(run_settings)


def upstream_folder(evaluated_dir: Path, stage: str) -> Path:
    record = json.loads((evaluated_dir / "record.json").read_text())
    return evaluated_dir.parents[1] / stage / record["components"]["upstream"][stage]


def _by_hand_map(weights: Path, model, store: WaveformStore, rows: np.ndarray) -> float:
    """mAP of a saved student over `rows`, computed without kdpipe's prediction or metrics code. Channels-last, as
    kdpipe runs it: a barely trained student's logits differ in the 1e-9s, where layouts round differently."""
    load_checkpoint(model, weights).eval().to(memory_format=torch.channels_last)
    frontend = build_frontend(model.frontend_config, store.sample_rate).eval()
    with torch.no_grad():
        scores = model(frontend(torch.from_numpy(store.read(rows)).float() / 32768)).numpy()
    targets = store.column("labels")[rows]
    keep = targets.any(axis=0)
    return average_precision_score(targets[:, keep], scores[:, keep])


def test_metrics_equal_an_independent_computation_from_the_stored_logits(run_settings, evaluated):
    output, folder = evaluated
    results = json.loads((folder / "metrics.json").read_text())
    store = WaveformStore.open(upstream_folder(folder, "prepare") / "waveforms.zarr")
    rows = store.rows("eval")
    targets = store.column("labels")[rows].astype(bool)
    combined = zarr.open_group(upstream_folder(folder, "extract-teachers") / "teachers.zarr", mode="r")
    models = {model["id"]: model for model in results["models"]}
    assert list(models) == ["teacher_mn_tiny", "ensemble", "student_kd"]
    assert results["split"] == "eval" and results["clips"] == len(rows) == 8
    has_positives = targets.any(axis=0)
    for id, array in (("teacher_mn_tiny", "teachers/mn_tiny/logits"), ("ensemble", "ensemble/logits")):
        logits = combined[array][:][rows].astype(np.float32)
        expected_ap = np.mean([average_precision_score(targets[:, c], logits[:, c])
                               for c in np.flatnonzero(has_positives)])
        assert models[id]["mAP"] == pytest.approx(expected_ap, abs=1e-9)
        both = has_positives & ~targets.all(axis=0)
        assert models[id]["mAUC"] == pytest.approx(roc_auc_score(targets[:, both], logits[:, both]), abs=1e-9)
        expected_lwlrap = label_ranking_average_precision_score(targets, logits, sample_weight=targets.sum(axis=1))
        assert models[id]["lwlrap"] == pytest.approx(expected_lwlrap, abs=1e-9)
    # the kept student run by hand over the eval clips, scored with scikit-learn
    student = upstream_folder(folder, "train-student")
    expected = _by_hand_map(student / "model.pt", build_student(load_config(None, run_settings).student, 12), store,
                            rows)
    assert models["student_kd"]["mAP"] == pytest.approx(expected, abs=1e-5)
    assert models["student_kd"]["kept"] == json.loads((student / "kept.json").read_text())["reason"]
    assert models["student_kd"]["parameters"] == sum(
        p.numel() for p in create_model("mobilenetv3", width=0.2, num_classes=12).parameters())
    assert models["ensemble"]["clips_per_second"] == pytest.approx(models["teacher_mn_tiny"]["clips_per_second"])
    assert re.search(r"student, with KD\s+│ 0\.\d{4}\s+│ 0\.\d{4}", output)  # the printed table


def test_per_class_csv_has_one_named_row_per_class(evaluated):
    _, folder = evaluated
    store = WaveformStore.open(upstream_folder(folder, "prepare") / "waveforms.zarr")
    positives = store.column("labels")[store.rows("eval")].sum(axis=0)
    with open(folder / "per_class_ap.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class_name"] for row in rows] == list(store.classes.names)
    assert [int(row["class_index"]) for row in rows] == list(range(12))
    assert [int(row["positives"]) for row in rows] == positives.tolist()
    for row in rows:
        for column in ("ap_teacher_mn_tiny", "ap_ensemble", "ap_student_kd"):
            assert (row[column] == "") == (int(row["positives"]) == 0)


def test_report_links_valid_pngs(evaluated):
    _, folder = evaluated
    report = (folder / "report.md").read_text()
    assert "**eval** split" in report and "| student, with KD |" in report
    assert "- **student, with KD**: the last epoch, 1 of 1 (keep: last)" in report
    assert "no training step read a clip scored here" in report
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert {"per_class_ap.png", "map_vs_complexity.png", "training_curves.png", "metrics.json"} <= set(links)
    for link in links:
        assert (folder / link).is_file(), link
    for png in folder.glob("*.png"):
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, png


def test_rerun_is_cached_and_the_baseline_is_a_declared_upstream(run_settings, evaluated):
    _, folder = evaluated
    output, again = evaluate(run_settings, "evaluation.batch_size=4", "student.num_workers=1")  # keyless settings
    assert again == folder and "building" not in output and "evaluate: cached" in output
    # A baseline built by hand is not scored: the evaluation's key never depends on what the cache holds.
    invoke("train-student", "--baseline", *[f"--set={item}" for item in run_settings])
    output, unchanged = evaluate(run_settings)
    assert unchanged == folder and "building" not in output
    # Asked for in the config, it is an upstream like any other: built already, so only evaluate runs.
    output, with_baseline = evaluate(run_settings, "evaluation.baseline=true")
    assert with_baseline != folder and "evaluate: building" in output
    assert output.count("building") == 1 and "train-student: cached" in output
    assert "train-student/no-kd: cached" in output and "extract-teachers: cached" in output
    ids = [model["id"] for model in json.loads((with_baseline / "metrics.json").read_text())["models"]]
    assert ids == ["teacher_mn_tiny", "ensemble", "student_kd", "student_no_kd"]
    assert "student, no KD" in output


def test_every_kept_student_of_a_multi_representation_run_is_evaluated(run_settings):
    extra = ("student.representations=[mel,mfcc]", "student.keep_members=all")
    output, folder = evaluate(run_settings, *extra)
    models = json.loads((folder / "metrics.json").read_text())["models"]
    students = {model["id"]: model for model in models if model["role"] == "student"}
    assert list(students) == ["student_kd_mel", "student_kd_mfcc"] and "student, with KD (mfcc)" in output
    store = WaveformStore.open(upstream_folder(folder, "prepare") / "waveforms.zarr")
    kept = upstream_folder(folder, "train-student") / "students"
    for member in ("mel", "mfcc"):  # each kept student, run by hand
        model = build_student(load_config(None, [*run_settings, *extra]).student, 12, member)
        expected = _by_hand_map(kept / f"{member}.pt", model, store, store.rows("eval"))
        assert students[f"student_kd_{member}"]["mAP"] == pytest.approx(expected, abs=1e-5)


def test_ensemble_costs_the_sum_of_its_teachers():
    parts = [Footprint(100, 10, 50, 200.0), Footprint(300, 30, 150, 50.0)]
    assert combined_footprint(parts) == Footprint(400, 40, 200, 40.0)  # 1 / (1/200 + 1/50)


def test_report_without_a_measurable_model_or_student(tmp_path):
    """Imported teacher logits only: metrics and per-class AP, but no plots and n/a for size and speed."""
    targets = np.eye(3, dtype=bool)[[0, 1, 2, 0]]
    imported = score("teacher_x", "teacher x", "teacher", "imported logits", targets,
                     np.vstack([np.eye(3)[[0, 1, 2]], np.full((1, 3), np.nan)]))
    assert imported.clips == 3 and imported.metrics["mAP"] == 1.0 and imported.metrics["lwlrap"] == 1.0
    evaluation = Evaluation("eval", ClassList(("/m/a", "/m/b", "/m/c"), ("a", "b", "c")), targets.sum(axis=0),
                            4, 1.0, ["manifest.csv"], "cpu", [imported])
    write_results(evaluation, tmp_path)
    report = write_report(evaluation, tmp_path).read_text()
    assert "| teacher x | imported logits | 3 | 1.0000 |" in report and "n/a | n/a | n/a" in report
    assert not list(tmp_path.glob("*.png")) and "![" not in report


def test_compare_scores_each_variant_over_seeds_and_never_builds_unasked(trained_run, tmp_path):
    """`kdpipe compare` scores each kept student on the eval split (as an independent computation does), writes a
    table, JSON and a plot; a seed not built is an error naming its command, built with --build."""
    pipeline = trained_run.pipeline
    cache = tmp_path / "cache"  # a copy: what --build adds must not change the shared run's cache
    shutil.copytree(pipeline.config.cache_dir, cache)
    settings = [f"--set={item}" for item in (*trained_run.settings, f"cache_dir={cache}")]
    store = WaveformStore.open(pipeline.built("prepare") / "waveforms.zarr")
    recorded = _by_hand_map(pipeline.built("train-student/no-kd") / "model.pt",
                            build_student(pipeline.config.student, 12), store, store.rows("eval"))
    result = CliRunner().invoke(app, ["compare", "--variant", "no KD:", "--seeds", "0", "--out", str(tmp_path),
                                      *settings])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "comparison.json").read_text())[0]
    assert scores["mAP"] == pytest.approx([recorded], abs=1e-5) and scores["mean_mAP"] == scores["mAP"][0]
    assert scores["variant"] == "no KD" and scores["overrides"] == [] and scores["seeds"] == [0]
    assert (tmp_path / "comparison.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "| no KD | `(as configured)` |" in (tmp_path / "comparison.md").read_text()
    two_seeds = ["compare", "--variant", "no KD: student.lr=0.002", "--seeds", "0,1", "--out", str(tmp_path), *settings]
    result = CliRunner().invoke(app, two_seeds)
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "variant 'no KD', seed 0: train-student/no-kd is stale" in message
    assert "run `kdpipe train-student --baseline` first" in message
    result = CliRunner().invoke(app, [*two_seeds, "--build"])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "comparison.json").read_text())[0]
    assert scores["seeds"] == [0, 1] and scores["mean_mAP"] == sum(scores["mAP"]) / 2
    bad = CliRunner().invoke(app, ["compare", "--variant", "x:", "--seeds", "0,one", *settings])
    assert bad.exit_code == 2 and "--seeds" in bad.output
