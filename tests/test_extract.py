"""Stage one: teacher logits in Zarr, per-teacher caching, exact resume, dask scale-out, integrity."""

import os
import pickle
import shutil
import sys
from functools import partial

import numpy as np
import pytest
import torch
import zarr

from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.errors import KdpipeError
from kdpipe.frontends import build_frontend
from kdpipe.interop import read_index
from kdpipe.models import create_model, load_checkpoint
from kdpipe.runner import Pipeline
from kdpipe.waveform_store import WaveformStore

import helpers


RUN = ("teachers.0.arch=passt_tiny", "teachers.1.arch=ast_tiny", "teachers.1.weight=3.0",
       "teacher_training.epochs=1", "teacher_training.batch_size=4", "teacher_training.num_workers=0",
       "extract.chunk_clips=5", "extract.num_workers=0", "extract.batch_size=3")
settings = partial(helpers.settings, RUN)
make = partial(helpers.make, RUN)


@pytest.fixture(scope="module")
def built(small_demo, tmp_path_factory):
    cache = tmp_path_factory.mktemp("extract")
    pipeline = make(small_demo, cache)
    out = pipeline.ensure("extract-teachers")
    return pipeline, zarr.open_group(out / "teachers.zarr", mode="r")


def direct_logits(pipeline: Pipeline, arch: str, name: str) -> np.ndarray:
    """An independent path: the trained checkpoint run clip by clip, outside the extraction code."""
    store = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    model = load_checkpoint(create_model(arch, num_classes=len(store.classes)),
                            pipeline.ensure(f"train-teacher/{name}") / "model.pt").eval()
    frontend = build_frontend(model.frontend_config, store.sample_rate).eval()
    with torch.no_grad():
        return np.concatenate([model(frontend(torch.from_numpy(store.read(np.array([row]))).float() / 32768)).numpy()
                               for row in range(store.n_clips)])


def test_store_layout_and_values(built, small_demo):
    pipeline, store = built
    waveforms = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    np.testing.assert_array_equal(store["clip_id"][:], waveforms.column("clip_id"))
    passt, ast = store["teachers/passt_tiny/logits"], store["teachers/ast_tiny/logits"]
    assert passt.dtype == np.float16 and passt.shape == (small_demo.n_clips, 12) and passt.chunks == (5, 12)
    np.testing.assert_allclose(passt[:], direct_logits(pipeline, "passt_tiny", "passt_tiny"), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(ast[:], direct_logits(pipeline, "ast_tiny", "ast_tiny"), atol=2e-2, rtol=1e-2)
    expected = (1.0 * passt[:].astype(np.float32) + 3.0 * ast[:].astype(np.float32)) / 4.0
    np.testing.assert_allclose(store["ensemble/logits"][:], expected, atol=2e-3, rtol=2e-3)
    attrs = dict(passt.attrs)
    assert attrs["arch"] == "passt_tiny" and len(attrs["checkpoints_sha256"][0]) == 64
    assert {"mAP", "mAUC", "wall_seconds", "clips_per_second", "frontend"} <= set(attrs)
    assert attrs["frontend"]["kind"] == "mel"
    assert attrs["precision"] == "fp32" and attrs["device"] == "cpu"  # precision auto on a CPU


def test_adding_a_teacher_computes_only_that_teacher(built, small_demo):
    pipeline, _ = built
    cache = pipeline.config.cache_dir
    grown = make(small_demo, cache, "teachers.2.arch=mn_tiny", "teachers.2.name=cnn")
    states = {name: grown.status(name).state for name in grown.stages}
    assert states == {"prepare": "fresh", "train-teacher/passt_tiny": "fresh", "train-teacher/ast_tiny": "fresh",
                      "train-teacher/cnn": "missing", "extract/passt_tiny": "fresh", "extract/ast_tiny": "fresh",
                      "extract/cnn": "missing", "extract-teachers": "stale", "train-student": "missing",
                      "evaluate": "missing"}
    reweighted = make(small_demo, cache, "teachers.1.weight=1.0")
    stale = [name for name in reweighted.stages if reweighted.status(name).state == "stale"]
    assert stale == ["extract-teachers"]
    assert reweighted.status("extract-teachers").reasons == ("weights.ast_tiny: 3.0 -> 1.0",)


def test_dask_engine_equals_local_engine(built, small_demo, tmp_path):
    pipeline, store = built
    # the cluster kdpipe starts itself (one worker is enough: tests/test_dask_cluster.py runs several)
    distributed = make(small_demo, pipeline.config.cache_dir, "extract.engine=dask", "extract.dask_workers=1")
    assert distributed.key("extract/passt_tiny") == pipeline.key("extract/passt_tiny")  # engine is not a parameter
    out = distributed.ensure("extract/passt_tiny", force=True)
    np.testing.assert_array_equal(zarr.open_group(out / "logits.zarr", mode="r")["logits"][:],
                                  store["teachers/passt_tiny/logits"][:])


def test_kill_9_then_resume_is_bit_identical(built, small_demo, tmp_path):
    pipeline, store = built
    source = pipeline.config.cache_dir
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for stage in ("prepare", "train-teacher"):  # reuse the upstream stages built above
        shutil.copytree(source / stage, killed / stage)
        shutil.copytree(source / stage, clean / stage)
    command = [sys.executable, "-m", "kdpipe", "extract-teachers",
               *[f"--set={item}" for item in settings(small_demo, killed, "extract.chunk_clips=2")]]
    helpers.kill_after_chunks(command, killed, 3, 32)  # both teachers: 32 chunks of two clips
    helpers.resume_and_run_clean(command, killed, clean)
    a = zarr.open_group(next(killed.glob("extract-teachers/*/teachers.zarr")), mode="r")
    b = zarr.open_group(next(clean.glob("extract-teachers/*/teachers.zarr")), mode="r")
    for name in ("teachers/passt_tiny/logits", "teachers/ast_tiny/logits", "ensemble/logits"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_nan_logits_fail_loudly_with_the_clip_id(small_demo, tmp_path):
    model = create_model("mn_tiny", num_classes=12)
    state = model.state_dict()
    state["classifier.5.bias"][3] = float("nan")
    checkpoint = tmp_path / "broken.pt"
    torch.save(state, checkpoint)
    pipeline = make(small_demo, tmp_path, f"teachers.0.checkpoint={checkpoint}", "teachers.0.arch=mn_tiny")
    with pytest.raises(KdpipeError, match=r"NaN or Inf logits for clip demo_train_0000"):
        pipeline.ensure("extract/mn_tiny")
    assert pipeline.cache.record("extract/mn_tiny", pipeline.key("extract/mn_tiny")) is None


def test_teacher_with_other_classes_is_refused(small_demo, tmp_path):
    checkpoint = tmp_path / "mn527.pt"
    torch.save(create_model("mn_tiny").state_dict(), checkpoint)
    pipeline = make(small_demo, tmp_path, f"teachers.0.checkpoint={checkpoint}", "teachers.0.arch=mn_tiny")
    with pytest.raises(KdpipeError, match="predicts 527 classes but the data has 12"):
        pipeline.ensure("extract/mn_tiny")


def test_export_then_import_round_trips_through_efficientat_files(built, small_demo, tmp_path):
    pipeline, store = built
    args = [f"--set={item}" for item in settings(small_demo, pipeline.config.cache_dir)]
    runner = CliRunner()
    exported = runner.invoke(app, ["export-logits", str(tmp_path / "out"), "--split", "train", *args])
    assert exported.exit_code == 0, exported.output
    npy, index = tmp_path / "out" / "ensemble_logits.npy", tmp_path / "out" / "fname_to_index.pkl"
    waveforms = WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")
    train = waveforms.rows("train")
    rows = read_index(index)
    assert sorted(rows) == sorted(waveforms.column("clip_id")[train].tolist())
    logits = np.load(npy)
    assert logits.dtype == np.float16 and logits.shape == (len(train), 12)
    first = waveforms.column("clip_id")[train[0]]
    np.testing.assert_array_equal(logits[rows[first]], store["ensemble/logits"][train[0]].astype(np.float16))

    checked = runner.invoke(app, ["import-logits", str(npy), str(index), "--name", "exported", *args])
    assert checked.exit_code == 0, checked.output
    assert f"train: logits for {len(train)} of {len(train)} clips" in checked.output
    assert "eval: logits for 0 of 8 clips" in checked.output and "logits_index:" in checked.output
    imported = make(small_demo, pipeline.config.cache_dir, "teachers.2.name=exported", f"teachers.2.logits={npy}",
                    f"teachers.2.logits_index={index}")
    assert "train-teacher/exported" not in imported.stages
    values = zarr.open_group(imported.ensure("extract/exported") / "logits.zarr", mode="r")["logits"][:]
    np.testing.assert_array_equal(values[train], store["ensemble/logits"][:][train])
    assert np.isnan(values[waveforms.rows("eval")]).all()


def test_an_index_pickle_cannot_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    path = tmp_path / "fname_to_index.pkl"
    path.write_bytes(pickle.dumps({"--4gqARaEJE": Exploit()}))
    with pytest.raises(KdpipeError, match="refusing to load posix.system"):
        read_index(path)
    path.write_bytes(pickle.dumps({"--4gqARaEJE": np.int64(3)}))
    assert read_index(path) == {"--4gqARaEJE": 3}


def test_garbage_logits_and_indexes_are_clear_errors(tmp_path):
    from kdpipe.interop import import_logits

    index = tmp_path / "fname_to_index.pkl"
    index.write_bytes(pickle.dumps({"a": 0, "b": "1"}))
    with pytest.raises(KdpipeError, match="the row of 'b' is '1', not an integer"):
        read_index(index)
    index.write_bytes(pickle.dumps({"a": 0}))
    ids = np.array(["a"])
    cases = {"garbage.npy": lambda p: p.write_bytes(os.urandom(300)),
             "objects.npy": lambda p: np.save(p, np.array([[{"x": 1}]], dtype=object)),
             "strings.npy": lambda p: np.save(p, np.array([["1", "2"]]))}
    for name, write in cases.items():
        write(tmp_path / name)
        with pytest.raises(KdpipeError, match=f"{name}: (not a readable .npy|expected float logits)"):
            import_logits(tmp_path / name, index, ids, 2)
