"""`kdpipe bench scale` at a tiny size: it commits real cache entries, measures every step, and draws the labels
its docstring promises."""

import csv
import json
from collections import Counter

import numpy as np
import pytest

from kdpipe.bench_scale import ScaleSettings, expected_frequencies, label_blocks, mids
from kdpipe.config import load_config
from kdpipe.logits_store import TEACHER_FILE, CombinedLogits, TeacherLogits
from kdpipe.runner import Pipeline
from kdpipe.stages import build_stages
from kdpipe.waveform_store import STORE_FILE, WaveformStore

from helpers import invoke

CLIPS, CLASSES, EVAL_CLIPS, SCALED = 3000, 527, 300, 2_000_000
STEPS = {"inputs", "build:prepare", "build:extract/t0", "build:extract/t1", "build:extract-teachers",
         "open_waveforms", "open_logits", "key", "status", "combine", "naive_read", "verify", "student_start", "draw",
         "topk", "first_view", "view_change", "resume", "evaluate"}
"""Every step issue 22 asks to time, and the writes of every store, with 2 teachers and views."""


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    """One run: 3000 clips, 527 classes, 2 teachers, 2 views kept as their top 5."""
    root = tmp_path_factory.mktemp("scale")
    output = invoke("bench", "scale", "--clips", str(CLIPS), "--classes", str(CLASSES), "--teachers", "2",
                    "--views", "2", "--topk", "5", "--eval-clips", str(EVAL_CLIPS), "--draw", "500",
                    "--out", str(root / "bench"), "--json", str(root / "scale.json"), "--extrapolate-to", str(SCALED))
    return root / "bench", json.loads((root / "scale.json").read_text()), output


def test_every_step_is_timed_with_its_memory(scale):
    _, result, output = scale
    rows = {row["key"]: row for row in result["rows"]}
    assert set(rows) == STEPS
    for row in rows.values():
        assert row["seconds"] > 0 and row["peak_rss"] > 0 and row["baseline_rss"] > 0, row
        scaled = SCALED / CLIPS if row["key"] not in ("key", "evaluate", "topk") else 1  # not grown with the clips
        assert row["extrapolated_seconds"] == pytest.approx(row["seconds"] * scaled)
    assert rows["draw"]["note"] == "4 batches, 480 clips"  # 500 drawn, batches of 120, the last one dropped
    assert rows["status"]["note"].startswith("4 fresh, 0 stale, 2 missing")
    assert rows["combine"]["disk_bytes"] > 0 and rows["verify"]["disk_bytes"] == rows["naive_read"]["disk_bytes"]
    assert "(extrapolated)" in output and "verify:" in output and "synthetic clips of 32 samples" in output
    loss = result["labels"]["topk_loss"]  # top-5 of 527 from two teachers: recomputed from the full views
    assert loss["clips"] == CLIPS and "top-5 targets against the ensemble of full views" in output
    for name in ("per-teacher top-k", "CED's ensemble top-k"):
        assert 0 < loss[name]["mean_abs_dp"] <= loss[name]["max_abs_dp"] <= 1


def test_the_stores_are_cache_entries_that_open_and_verify(scale):
    bench, _, _ = scale
    config = load_config(bench / "kdpipe.yaml")
    pipeline = Pipeline(build_stages(config), config)  # the real stages: the bench's keys must be theirs
    states = {name: pipeline.status(name).state for name in pipeline.stages}
    assert states == {"prepare": "fresh", "extract/t0": "fresh", "extract/t1": "fresh", "extract-teachers": "fresh",
                      "train-student": "missing", "evaluate": "missing"}
    assert {v.action for v in pipeline.verify(mark=False)} == {"ok", "not built"}
    store = WaveformStore.open(pipeline.built("prepare") / STORE_FILE)
    assert (store.n_clips, len(store.classes), store.clip_samples) == (CLIPS, CLASSES, 32)
    assert store.done_shards().all() and len(store.rows("eval")) == EVAL_CLIPS
    for teacher in ("t0", "t1"):
        logits = TeacherLogits.open(pipeline.built(f"extract/{teacher}") / TEACHER_FILE)
        assert logits.done_chunks().all() and np.isfinite(logits.read()).all()
    combined = CombinedLogits.in_folder(pipeline.built("extract-teachers"))
    assert combined.n_views == 2 and np.isfinite(combined.read_view(1)).all()
    assert combined.read().shape == (CLIPS, CLASSES)


def test_the_labels_are_the_documented_recipe(scale):
    """The manifest's labels, counted from its text, against the shares the module docstring states."""
    bench, result, _ = scale
    with open(bench / "manifest.csv", newline="") as handle:
        labels = [row["labels"].split(";") for row in csv.DictReader(handle)]
    counts = Counter(label for clip in labels for label in clip)
    share = np.array([counts[mid] for mid in mids(CLASSES)]) / len(labels)
    expected = expected_frequencies(CLASSES)
    assert expected[[0, 1, 2]] == pytest.approx([0.510, 0.286, 0.024], abs=0.0005)
    assert expected[-1] * 2_000_000 == pytest.approx(61, abs=1) and expected.sum() == pytest.approx(2.70)
    assert len(labels) == CLIPS and min(map(len, labels)) >= 1 and "" not in counts
    tolerance = 5 * np.sqrt(expected * (1 - expected) / CLIPS) + 2 / CLIPS  # 5 sigma of a binomial share
    assert np.all(np.abs(share - expected) <= tolerance)
    assert share.sum() == pytest.approx(2.70, abs=0.15)
    assert result["labels"]["counts"] == [counts[mid] for mid in mids(CLASSES)]  # the store holds the manifest's


def test_the_label_draws_match_the_recipe_at_200k_clips():
    """Tighter than the bench's 3000 clips: the head within 0.5 points, the rarest tail on its ~60-per-2 M."""
    settings = ScaleSettings(clips=200_000)
    counts, per_clip = np.zeros(settings.classes), []
    for _, block in label_blocks(settings):
        counts += block.sum(axis=0)
        per_clip.append(block.sum(axis=1))
    share, expected = counts / settings.clips, expected_frequencies(settings.classes)
    assert share[:2] == pytest.approx(expected[:2], abs=0.005)
    rarest = np.argsort(expected)[:100]  # ~6 clips each at 200 k: their total, within 5 sigma
    total = expected[rarest].sum() * settings.clips
    assert abs(counts[rarest].sum() - total) <= 5 * np.sqrt(total)
    assert np.concatenate(per_clip).min() == 1 and np.concatenate(per_clip).mean() == pytest.approx(2.70, abs=0.02)
