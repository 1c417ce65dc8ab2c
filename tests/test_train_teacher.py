"""The train-teacher stage: trains on the store, keeps the last epoch or the best on validation, caches per teacher."""

import hashlib
import json
from functools import partial

import numpy as np
import pytest
import torch
import zarr
from sklearn.metrics import average_precision_score
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.config import load_config
from kdpipe.frontends import build_frontend
from kdpipe.models import create_model, load_checkpoint
from kdpipe.waveform_store import WaveformStore
from kdpipe.stages import build_stages
from kdpipe.stages.evaluate import kept_teacher

import helpers


RUN = ("teachers.0.arch=passt_tiny", "teachers.1.arch=ast_tiny", "teachers.1.name=ast",
       "teacher_training.epochs=2", "teacher_training.batch_size=4", "teacher_training.num_workers=0",
       "teacher_training.mixup_alpha=0.3")
settings = partial(helpers.settings, RUN)
make = partial(helpers.make, RUN)


def test_keep_best_keeps_the_epoch_with_the_best_validation_map_and_it_reproduces(small_demo, tmp_path):
    pipeline = make(small_demo, tmp_path, "teacher_training.keep=best", "teacher_training.epochs=3")
    assert [n for n in pipeline.stages if n.startswith(("prepare", "train-teacher"))] == [
        "prepare", "train-teacher/passt_tiny", "train-teacher/ast"]
    out = pipeline.ensure("train-teacher/ast")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3] and all(set(line) >= {"validation", "train_loss"}
                                                                  for line in lines)
    best = max(lines, key=lambda line: line["validation"]["mAP"])
    kept = json.loads((out / "kept.json").read_text())
    assert kept["keep"] == "best" and kept["epoch"] == best["epoch"] and "split 'val' (8 clips)" in kept["reason"]
    record = pipeline.cache.record("train-teacher/ast", pipeline.key("train-teacher/ast"))
    assert record["summary"]["epoch"] == best["epoch"] and record["summary"]["arch"] == "ast_tiny"
    # an independent path: load model.pt, run it by hand over the validation clips, score with scikit-learn
    store = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    model = load_checkpoint(create_model("ast_tiny", num_classes=len(store.classes)), out / "model.pt").eval()
    frontend = build_frontend(model.frontend_config, store.sample_rate).eval()
    rows = store.rows("val")
    with torch.no_grad():
        scores = model(frontend(torch.from_numpy(store.read(rows)).float() / 32768)).numpy()
    targets = store.column("labels")[rows]
    keep = targets.any(axis=0)
    assert average_precision_score(targets[:, keep], scores[:, keep]) == pytest.approx(best["validation"]["mAP"],
                                                                                       abs=1e-5)


def test_each_teacher_is_cached_on_its_own_and_keeps_its_last_epoch_by_default(small_demo, tmp_path):
    out = make(small_demo, tmp_path).ensure("train-teacher/passt_tiny")
    kept = json.loads((out / "kept.json").read_text())
    assert kept["keep"] == "last" and kept["epoch"] == 2 and "the last epoch, 2 of 2" in kept["reason"]
    assert (out / "model.pt").samefile(out / "last.pt")  # one file on disk
    changed = make(small_demo, tmp_path, "teachers.0.options.depth=1")
    assert changed.status("prepare").state == "fresh"
    assert changed.status("train-teacher/passt_tiny").reasons == ("teacher.options.depth: <unset> -> 1",)
    assert changed.status("train-teacher/ast").state == "missing"
    reweighted = make(small_demo, tmp_path, "teachers.0.weight=0.5")  # the ensemble's business, not training's
    assert reweighted.status("train-teacher/passt_tiny").state == "fresh"
    with_checkpoint = load_config(None, settings(small_demo, tmp_path, f"teachers.1.checkpoint={small_demo.manifest}"))
    assert [s.name for s in build_stages(with_checkpoint) if s.name.startswith(("prepare", "train-teacher"))] == [
        "prepare", "train-teacher/passt_tiny"]


def test_cli_rejects_an_unknown_teacher(small_demo, tmp_path):
    args = ["train-teacher", "--teacher", "passt"] + [f"--set={item}" for item in settings(small_demo, tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "no trainable teacher named passt" in result.output
    assert "passt_tiny, ast" in result.output


def test_cross_fitted_teacher_labels_each_train_clip_with_the_model_that_never_saw_it(small_demo, prepared,
                                                                                      tmp_path):
    pipeline = make(small_demo, helpers.copy_cache(prepared, tmp_path / "cache"), "teacher_training.folds=2", "teacher_training.epochs=1",
                    "teachers.1.weight=0")
    out = pipeline.ensure("train-teacher/passt_tiny")
    store = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    unseen = np.load(out / "unseen_fold.npy")
    train = store.rows("train")
    # the folds, recomputed independently: blake2b of the clip id salted "fold", modulo 2
    expected = np.full(store.n_clips, -1)
    for row in train:
        digest = hashlib.blake2b(store.column("clip_id")[row].encode(), digest_size=8, salt=b"fold").digest()
        expected[row] = int.from_bytes(digest, "little") % 2
    assert (unseen == expected).all() and set(unseen[train]) == {0, 1}
    summary = pipeline.cache.record("train-teacher/passt_tiny", pipeline.key("train-teacher/passt_tiny"))["summary"]
    assert summary["clips_per_fold"] == np.bincount(unseen[train]).tolist()
    models = [load_checkpoint(create_model("passt_tiny", num_classes=len(store.classes)),
                              out / f"fold{f}" / "model.pt").eval() for f in (0, 1)]
    assert not torch.equal(models[0].head[-1].weight, models[1].head[-1].weight)
    logits = zarr.open_group(pipeline.ensure("extract/passt_tiny") / "logits.zarr", mode="r")["logits"][:]
    frontend = build_frontend(models[0].frontend_config, store.sample_rate).eval()
    rows = np.flatnonzero(store.column("status") == "ok")
    with torch.no_grad():
        features = frontend(torch.from_numpy(store.read(rows)).float() / 32768)
        outputs = torch.stack([model(features) for model in models]).numpy()
    by_hand = np.where((unseen[rows] >= 0)[:, None], outputs[unseen[rows].clip(0), np.arange(len(rows))],
                       outputs.mean(axis=0))
    np.testing.assert_allclose(logits[rows].astype(np.float32), by_hand, atol=2e-3)
    assert (unseen[store.rows("eval")] == -1).all()  # eval clips: the mean of both models
    assert kept_teacher((out / "fold0" / "model.pt", out / "fold1" / "model.pt")).startswith(
        "2 cross-fitted models, fold 0: the last epoch, 1 of 1")
