"""Consistent teaching (CED): teacher targets for augmented views, top-k storage, KD on unlabelled audio."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kdpipe import training
from kdpipe.config import load_config
from kdpipe.distill import Targets, ViewTargets, confident_classes, learns_from_views
from kdpipe.errors import ConfigError
from kdpipe.extraction import Teacher, TeacherSpec
from kdpipe.frontends import int16_to_float
from kdpipe.logits_store import CombinedLogits, TeacherLogits
from kdpipe.models import create_model
from kdpipe.runner import Pipeline
from kdpipe.splits import training_splits
from kdpipe.stages import build_stages
from kdpipe.topk import ABSENT_LOGIT
from kdpipe.view_plan import ViewAugment, ViewPlan
from kdpipe.waveform_store import WaveformStore

import helpers

VIEWS = 3
RUN = ("teachers.0.arch=mn_tiny", "teachers.1.arch=passt_tiny", "extract.chunk_clips=8", "extract.num_workers=0",
       "extract.batch_size=5", f"extract.views={VIEWS}", "extract.view_seed=7", "student.arch=mobilenetv3",
       "student.width=0.2", "student.epochs=4", "student.epoch_samples=16", "student.batch_size=4",
       "student.num_workers=0")


@pytest.fixture(scope="module")
def run(small_demo, tmp_path_factory) -> list[str]:
    """The RUN settings with untrained, seeded teachers given as checkpoints (no train-teacher stage)."""
    root = tmp_path_factory.mktemp("views")
    items = []
    for i, arch in enumerate(("mn_tiny", "passt_tiny")):
        torch.manual_seed(i)
        torch.save(create_model(arch, num_classes=12).state_dict(), root / f"{arch}.pt")
        items.append(f"teachers.{i}.checkpoint={root / arch}.pt")
    return helpers.settings((*RUN, *items), small_demo, root / "cache")


def pipeline_of(items: list[str], *extra: str) -> Pipeline:
    config = load_config(None, [*items, *extra])
    return Pipeline(build_stages(config), config)


def test_a_view_on_the_training_path_is_what_the_teachers_heard(run):
    """The student's epoch-e audio is bit-identical to what extraction fed the teacher for view e mod K, and
    the teacher run on it gives the stored view logits."""
    pipeline = pipeline_of(run)
    logits = TeacherLogits.open(pipeline.ensure("extract/passt_tiny") / "logits.zarr")
    store = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    combined = CombinedLogits.in_folder(pipeline.ensure("extract-teachers"))
    assert logits.n_views == combined.n_views == VIEWS
    recipe = ViewPlan(count=VIEWS, seed=7, augment=ViewAugment())  # RUN's views, default augmentation
    assert logits.view_plan == combined.view_plan == recipe  # recorded in both stores
    rows = np.array([2, 5, 11, 17])
    waves = torch.from_numpy(store.read(rows))
    config = pipeline.config
    spec = TeacherSpec(name="passt_tiny", arch="passt_tiny", checkpoints=(config.teachers[1].checkpoint,),
                       views=ViewPlan.from_config(config.extract))
    teacher = Teacher(spec, store.sample_rate, torch.device("cpu"), batch_size=5)
    heard = []
    forward = teacher._forward
    teacher._forward = lambda floats, unseen: heard.append(floats.clone()) or forward(floats, unseen)
    teacher.outputs(waves, rows)  # as extraction runs it: the clean batch, then each view
    targets = ViewTargets(combined, config, store.n_clips, store.sample_rate, store.clip_samples,
                          torch.device("cpu"))
    stored = logits.group["views"][:]  # 12 classes: the default top-20 keeps every class whole
    for epoch in (0, 1, 5):  # views 0, 1 and 5 mod 3 = 2
        targets.start_epoch(epoch)
        view = epoch % VIEWS
        trained_on = targets.augment(int16_to_float(waves), rows)  # what train_step hands the student's frontend
        assert torch.equal(trained_on, heard[1 + view]), f"epoch {epoch}"
        assert not torch.equal(trained_on, heard[0])  # a view is not the clean clip
        with torch.inference_mode():
            again = teacher._forward(trained_on, None).numpy()
        np.testing.assert_allclose(again, stored[rows, view].astype(np.float32), rtol=1e-2, atol=1e-2)
        ensemble = combined.read_view(view)[rows]
        expected = 1.0 / (1.0 + np.exp(-ensemble / config.student.kd.temperature))
        np.testing.assert_allclose(targets.probabilities[rows].numpy(), expected, rtol=1e-6)


def test_topk_views_are_stored_per_teacher_and_their_ensemble_is_bounded_by_the_full_one(run):
    """With top-k, each teacher keeps its k largest view logits; the ensemble read for training is, independently
    computed here: a kept class at the teachers' mean with a teacher that did not keep it at its smallest kept
    logit; a class no teacher kept at the fill. It never lies below the full computation on a kept class."""
    full_run = pipeline_of(run)
    full = CombinedLogits.in_folder(full_run.ensure("extract-teachers"))
    pipeline = pipeline_of(run, "extract.topk=4")
    assert pipeline.key("extract/mn_tiny") != full_run.key("extract/mn_tiny")  # top-k is stored per teacher
    topk = CombinedLogits.in_folder(pipeline.ensure("extract-teachers"))
    names = ("mn_tiny", "passt_tiny")
    stores = {name: TeacherLogits.open(pipeline.built(f"extract/{name}") / "logits.zarr") for name in names}
    for array in ("logits/c/0/0", "views_topk/values/c/0/0/0"):  # hard links: no second copy on disk
        own, linked = stores["passt_tiny"].path / array, topk.path / "teachers" / "passt_tiny" / array
        assert own.stat().st_ino == linked.stat().st_ino and own.stat().st_nlink == 2
    dense_views = {name: TeacherLogits.open(full_run.built(f"extract/{name}") / "logits.zarr").group["views"][:]
                   .astype(np.float32) for name in names}
    weights = full.array().attrs["weights"]
    for view in range(VIEWS):
        kept, bounded = {}, {}
        for name in names:
            dense = dense_views[name][:, view]
            order = stores[name].group["views_topk/indexes"][:, view].astype(np.intp)
            top = stores[name].group["views_topk/values"][:, view].astype(np.float32)
            np.testing.assert_array_equal(np.take_along_axis(dense, order, 1), top)  # its own logits, largest first
            assert (np.diff(top, axis=1) <= 0).all()
            kept[name] = np.zeros_like(dense, dtype=bool)
            np.put_along_axis(kept[name], order, True, 1)
            assert (np.where(kept[name], -np.inf, dense).max(axis=1) <= top.min(axis=1)).all()  # none larger left out
            bounded[name] = np.where(kept[name], dense, top.min(axis=1, keepdims=True))
        any_kept = kept["mn_tiny"] | kept["passt_tiny"]
        expected = sum(weights[n] * bounded[n] for n in names) / sum(weights.values())
        smallest = np.where(any_kept, expected, np.inf).min(axis=1, keepdims=True)
        expected = np.where(any_kept, expected, np.minimum(smallest, ABSENT_LOGIT))
        ensemble = topk.read_view(view)  # the default fill: CED's "zero", probability ~0 as a logit
        np.testing.assert_allclose(ensemble, expected, rtol=1e-5, atol=1e-5)
        exact = full.read_view(view)
        assert (ensemble[any_kept] >= exact[any_kept] - 1e-5).all()
        both = kept["mn_tiny"] & kept["passt_tiny"]
        np.testing.assert_allclose(ensemble[both], exact[both], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(topk.read_view(view, temperature=2.0, start=5, stop=9)[~any_kept[5:9]],
                                   np.minimum(smallest[5:9] / 2, ABSENT_LOGIT).repeat(12, 1)[~any_kept[5:9]],
                                   rtol=1e-5)


@pytest.mark.parametrize("other", [["extract.view_seed=8"], ["extract.augment.gain_db=3", "extract.augment.roll=false"],
                                   ["extract.views=4"]])
def test_a_store_made_by_one_view_recipe_is_refused_for_another(run, other):
    """The student reads the recipe from the store it learns from; a config asking for another (a store passed by
    path, or imported) is a config error naming both recipes and what differs, before any training."""
    pipeline = pipeline_of(run)
    combined = CombinedLogits.in_folder(pipeline.ensure("extract-teachers"))
    store = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    config = load_config(None, [*run, *other])
    with pytest.raises(ConfigError) as refused:
        ViewTargets(combined, config, store.n_clips, store.sample_rate, store.clip_samples, torch.device("cpu"))
    message = str(refused.value)
    assert str(combined.view_plan) in message and str(ViewPlan.from_config(config.extract)) in message
    differing = {"extract.view_seed=8": "seed: 7 vs 8", "extract.augment.gain_db=3": "augment.gain_db: 6.0 vs 3.0",
                 "extract.augment.roll=false": "augment.roll: True vs False", "extract.views=4": "count: 3 vs 4"}
    assert all(differing[setting] in message for setting in other)


def test_a_kd_student_learns_from_views_and_the_keys_follow_the_view_settings(run):
    pipeline = pipeline_of(run)
    out = pipeline.ensure("train-student")
    assert learns_from_views(pipeline.config)
    assert sum(1 for _ in (out / "metrics.jsonl").open()) == 4
    clean = pipeline_of(run, "student.kd.views=false")
    assert clean.key("extract-teachers") == pipeline.key("extract-teachers")
    assert clean.key("train-student") != pipeline.key("train-student")
    reaugmented = pipeline_of(run, "extract.augment.gain_db=3")
    assert reaugmented.key("extract/mn_tiny") != pipeline.key("extract/mn_tiny")
    no_views = [item for item in run if not item.startswith("extract.view")]
    # without views, the view settings are not parameters: changing them rebuilds nothing
    assert pipeline_of(no_views).key("extract/mn_tiny") == pipeline_of(no_views, "extract.augment.gain_db=3",
                                                                       "extract.view_seed=9").key("extract/mn_tiny")


def test_extraction_with_views_resumes_after_kill_9_bit_identical(run, tmp_path):
    source = Path(next(item for item in run if item.startswith("cache_dir=")).split("=", 1)[1])
    pipeline_of(run).ensure("prepare")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for cache in (killed, clean):
        shutil.copytree(source / "prepare", cache / "prepare")
    items = [item for item in run if not item.startswith("cache_dir=")]
    command = [sys.executable, "-m", "kdpipe", "extract-teachers", "--set=extract.chunk_clips=1",
               "--set=extract.topk=5", f"--set=cache_dir={killed}", *[f"--set={item}" for item in items]]
    helpers.kill_after_chunks(command, killed, 3, 48)  # 2 teachers x 24 chunks of one clip
    helpers.resume_and_run_clean(command, killed, clean)
    for pattern in ("extract/passt_tiny/*/logits.zarr", "extract/mn_tiny/*/logits.zarr"):
        a, b = (zarr.open_group(next(cache.glob(pattern)), mode="r") for cache in (killed, clean))
        for name in ("views_topk/values", "views_topk/indexes", "logits"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
    a, b = (CombinedLogits(next(cache.glob("extract-teachers/*/teachers.zarr"))) for cache in (killed, clean))
    np.testing.assert_array_equal(a.read(), b.read())
    np.testing.assert_array_equal(a.read_view(2), b.read_view(2))


def test_unlabelled_audio_teaches_the_kd_student_only(small_demo, tmp_path):
    """A source marked `labels: none` is prepared and run through the teachers; the KD student trains on it
    (drawn for the classes the teachers confidently hear), the baseline and the teachers' training leave it out."""
    extra = tmp_path / "more.csv"  # the demo's train clips again, under new ids, their labels to be ignored
    header, *lines = small_demo.manifest.read_text().splitlines()
    extra.write_text("\n".join([header, *(f"more_{clip_id},{small_demo.root / path},{rest}" for clip_id, path, rest in
                                         (line.split(",", 2) for line in lines) if clip_id.startswith("demo_train"))]))
    pipeline = pipeline_of(helpers.settings(helpers.STUDENT_RUN, small_demo, tmp_path / "cache",
                                            f"data.sources.1.path={extra}", "data.sources.1.labels=none"))
    store = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    unlabelled = np.array([str(clip_id).startswith("more_") for clip_id in store.column("clip_id")])
    assert unlabelled.sum() == 16 and not store.labelled()[unlabelled].any() and store.labelled()[~unlabelled].all()
    with_kd = training_splits(store, 0.0, "train-student", unlabelled=True).train
    labels_only = training_splits(store, 0.0, "train-teacher/mn_tiny").train
    assert unlabelled[with_kd].sum() == 16 and not unlabelled[labels_only].any()
    combined = CombinedLogits.in_folder(pipeline.ensure("extract-teachers"))
    assert np.isfinite(combined.read()[unlabelled]).all()  # the teachers ran on the unlabelled clips
    rows = with_kd[unlabelled[with_kd]]
    for threshold, heard_anything in ((1e-6, True), (1 - 1e-6, False)):  # (the teacher is untrained: ~0.5 each)
        heard = confident_classes(combined, threshold)
        assert heard(rows).all() if heard_anything else not heard(rows).any()
        plan = training.epoch_plan(store, with_kd, pipeline.config.student, 0, heard)
        drawn = np.concatenate([np.concatenate(plan(epoch)) for epoch in range(10)])
        assert unlabelled[drawn].any() == heard_anything  # a clip the teachers hear nothing in is never drawn
    out = pipeline.ensure("train-student")
    assert (out / "model.pt").is_file()
    targets = Targets(combined, store.n_clips, 1.0, torch.device("cpu"))
    assert targets.present[torch.from_numpy(unlabelled)].all()  # each unlabelled clip has a KD target


def test_views_need_model_teachers_and_a_student_needs_views_to_learn_them(small_demo, tmp_path):
    with pytest.raises(ConfigError, match=r"student.kd.views: true needs views to learn from"):
        load_config(None, ["student.kd.views=true"])
    logits, index = tmp_path / "a.npy", tmp_path / "a.pkl"
    np.save(logits, np.zeros((1, 12), np.float32))
    index.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"imported logits \(a\) have no views"):
        load_config(None, ["extract.views=2", f"teachers.0.logits={logits}", f"teachers.0.logits_index={index}"],
                    check_files=False)

