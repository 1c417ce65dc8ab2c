"""The prepare stage end to end: decode, validate, store, skip report, resume after kill -9."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import zarr
from typer.testing import CliRunner

from kdpipe.classes import read_class_list
from kdpipe.config import load_config
from kdpipe.demo_data import write_demo_dataset
from kdpipe.errors import KdpipeError
from kdpipe.runner import Pipeline
from kdpipe.waveform_store import WaveformStore
from kdpipe.stages import build_stages
from kdpipe.cli import app, normalized_argv

from helpers import invoke

SR = 32000


def make_pipeline(manifest: Path, class_list: Path | None, cache: Path, *overrides: str) -> Pipeline:
    sets = [f"cache_dir={cache}", f"data.sources.0.path={manifest}", "data.clip_seconds=1.0",
            "data.sample_rate=32000", "prepare.min_seconds=0.5", "prepare.shard_clips=4", "prepare.workers=1",
            *overrides]
    if class_list is not None:
        sets.append(f"data.class_list={class_list}")
    config = load_config(None, sets)
    return Pipeline(build_stages(config), config)


def prepared_store(pipeline: Pipeline) -> WaveformStore:
    return WaveformStore.open(pipeline.ensure("prepare") / "waveforms.zarr")


@pytest.fixture()
def dataset_with_bad_files(small_demo, tmp_path) -> Path:
    """The small demo plus one file for every kind of bad input."""
    audio = tmp_path / "bad"
    audio.mkdir()
    t = np.arange(SR) / SR
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    (audio / "empty.wav").write_bytes(b"")
    (audio / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" + os.urandom(200))
    sf.write(audio / "full.wav", tone, SR, subtype="PCM_16")
    data = (audio / "full.wav").read_bytes()
    (audio / "truncated.wav").write_bytes(data[: len(data) // 2])
    sf.write(audio / "silent.wav", np.zeros(SR, np.float32), SR)
    sf.write(audio / "short.wav", tone[: SR // 10], SR)
    nan = tone.copy()
    nan[100] = np.nan
    sf.write(audio / "nan.wav", nan, SR, subtype="FLOAT")
    rows = list(csv.reader(open(small_demo.manifest)))
    header, body = rows[0], rows[1:]
    demo_dir = small_demo.manifest.parent
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for clip_id, path, labels, split in body:
            writer.writerow([clip_id, os.path.relpath(demo_dir / path, tmp_path), labels, split])
        for name in ("empty", "corrupt", "truncated", "silent", "short", "nan", "missing"):
            writer.writerow([f"bad_{name}", f"bad/{name}.wav", "Low tone", "train"])
        writer.writerow(["bad_label", "bad/full.wav", "Low tone;Kazoo", "train"])
    return manifest


def test_prepare_stores_every_good_clip_and_lists_every_bad_one(small_demo, dataset_with_bad_files, tmp_path):
    pipeline = make_pipeline(dataset_with_bad_files, small_demo.class_list, tmp_path / "cache")
    store = prepared_store(pipeline)
    ids = store.column("clip_id").tolist()
    status = dict(zip(ids, store.column("status").tolist()))
    expected_bad = {"bad_empty": "empty", "bad_corrupt": "corrupt", "bad_truncated": "truncated",
                    "bad_silent": "silent", "bad_short": "too_short", "bad_nan": "nonfinite",
                    "bad_missing": "missing", "bad_label": "unknown_label"}
    assert {k: v for k, v in status.items() if v != "ok"} == expected_bad
    assert store.n_clips == small_demo.n_clips + len(expected_bad)
    assert len(store.rows()) == small_demo.n_clips
    skipped = list(csv.DictReader(open(pipeline.ensure("prepare") / "skipped.csv")))
    assert {row["clip_id"]: row["reason"] for row in skipped} == expected_bad
    assert "Kazoo" in next(row["message"] for row in skipped if row["clip_id"] == "bad_label")
    record = pipeline.cache.record("prepare", pipeline.key("prepare"))
    assert record["summary"]["skipped"]["truncated"] == 1 and record["summary"]["decoded"] == small_demo.n_clips
    assert store.waveform.dtype == np.int16 and store.waveform.shape == (store.n_clips, SR)
    assert store.waveform.chunks == (1, SR) and store.waveform.shards == (4, SR)


def test_stored_waveforms_equal_an_independent_decode(small_demo, tmp_path):
    pipeline = make_pipeline(small_demo.manifest, small_demo.class_list, tmp_path / "cache")
    store = prepared_store(pipeline)
    classes = read_class_list(small_demo.class_list)
    assert store.classes == classes and store.sample_rate == SR
    rows = list(csv.DictReader(open(small_demo.manifest)))
    lookup = classes.lookup()
    labels = store.column("labels")
    exact = resampled = 0
    for i, row in enumerate(rows):
        expected = np.zeros(len(classes), np.uint8)
        expected[[lookup[label] for label in row["labels"].split(";")]] = 1
        np.testing.assert_array_equal(labels[i], expected)
        info = sf.info(small_demo.manifest.parent / row["path"])
        path = small_demo.manifest.parent / row["path"]
        stored = store.read(np.array([i]))[0]
        if info.samplerate == SR and info.channels == 1 and info.subtype == "PCM_16":
            np.testing.assert_array_equal(stored, sf.read(path, dtype="int16")[0][:SR])
            exact += 1
        elif info.samplerate != SR:
            audio = sf.read(path, dtype="float32", always_2d=True)[0].mean(axis=1)
            expected = fft_resample(audio, info.samplerate, SR)
            cutoff = 0.9 * min(info.samplerate, SR) / 2
            assert np.corrcoef(low_pass(stored / 32768, cutoff), low_pass(expected, cutoff))[0, 1] > 0.999
            resampled += 1
    assert exact >= 10 and resampled >= 3
    assert set(store.column("split")) == {"train", "eval", "val"}


def low_pass(audio: np.ndarray, cutoff: float) -> np.ndarray:
    """Compare below the resampler's roll-off (it may attenuate from 0.945 x the lower Nyquist)."""
    spectrum = np.fft.rfft(audio)
    spectrum[np.fft.rfftfreq(len(audio), 1 / SR) > cutoff] = 0
    return np.fft.irfft(spectrum, len(audio))


def fft_resample(audio: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """An independent band-limited resampler: truncate or zero-pad the spectrum."""
    n_out = round(len(audio) * new_sr / orig_sr)
    spectrum = np.fft.rfft(audio)[: n_out // 2 + 1]
    return np.fft.irfft(spectrum, n_out) * n_out / len(audio)


def test_parallel_decoding_is_bit_identical_and_keyed_the_same(small_demo, tmp_path):
    one = make_pipeline(small_demo.manifest, small_demo.class_list, tmp_path / "a")
    two = make_pipeline(small_demo.manifest, small_demo.class_list, tmp_path / "b", "prepare.workers=2")
    assert one.key("prepare") == two.key("prepare")
    a, b = prepared_store(one), prepared_store(two)
    np.testing.assert_array_equal(a.waveform[:], b.waveform[:])


def test_on_error_fail_stops_with_the_clip_and_writes_no_record(small_demo, dataset_with_bad_files, tmp_path):
    pipeline = make_pipeline(dataset_with_bad_files, small_demo.class_list, tmp_path / "cache",
                             "prepare.on_error=fail")
    with pytest.raises(KdpipeError, match="bad_"):
        pipeline.ensure("prepare")
    assert pipeline.cache.record("prepare", pipeline.key("prepare")) is None


def test_hdf5_source(small_demo, tmp_path, audioset_metadata):
    """A PaSST-layout HDF5 file (mp3 bytes, packed targets) against the official 527-class list."""
    names, blobs, targets = [], [], []
    rng = np.random.default_rng(0)
    for i, ytid in enumerate(["--4gqARaEJE", "-0RWZT-miFs", "Y0123456789"]):
        path = tmp_path / f"{i}.mp3"
        sf.write(path, (0.3 * rng.standard_normal(SR)).astype(np.float32), SR, format="MP3")
        names.append(f"Y{ytid}.mp3".encode())
        blobs.append(np.frombuffer(path.read_bytes(), np.uint8))
        target = np.zeros(527, bool)
        target[[i, 100 + i]] = True
        targets.append(np.packbits(target))
    hdf5 = tmp_path / "eval_segments_mp3.hdf"
    with h5py.File(hdf5, "w") as f:
        f.create_dataset("audio_name", data=np.array(names, dtype="S20"))
        mp3 = f.create_dataset("mp3", (3,), dtype=h5py.vlen_dtype(np.uint8))
        for i, blob in enumerate(blobs):
            mp3[i] = blob
        f.create_dataset("target", data=np.stack(targets))
    config = load_config(None, [f"cache_dir={tmp_path / 'cache'}", f"data.class_list={audioset_metadata}/"
                                "class_labels_indices.csv", "data.clip_seconds=1.0", "prepare.workers=1"],
                         {"data.sources": [{"format": "hdf5", "path": str(hdf5), "split": "eval"}]})
    store = WaveformStore.open(Pipeline(build_stages(config), config).ensure("prepare") / "waveforms.zarr")
    assert store.column("clip_id").tolist() == ["--4gqARaEJE", "-0RWZT-miFs", "Y0123456789"]
    assert (store.column("status") == "ok").all() and len(store.classes) == 527
    assert [np.flatnonzero(row).tolist() for row in store.column("labels")] == [[0, 100], [1, 101], [2, 102]]
    assert np.abs(store.read(np.array([0]))[0]).max() > 1000


def test_audioset_source_reports_undownloaded_clips_as_missing(tmp_path, audioset_metadata):
    segments = tmp_path / "segments.csv"
    lines = (audioset_metadata / "eval_segments.csv").read_text().splitlines()
    segments.write_text("\n".join(lines[:3 + 5]) + "\n")  # header + 5 segments
    audio = tmp_path / "audio"
    audio.mkdir()
    ytids = [line.split(",")[0] for line in lines[3:5]]
    for ytid in ytids:
        sf.write(audio / f"Y{ytid}.flac", 0.2 * np.random.default_rng(1).standard_normal(44100), 44100)
    config = load_config(None, [f"cache_dir={tmp_path / 'cache'}", f"data.class_list={audioset_metadata}/"
                                "class_labels_indices.csv", "prepare.workers=1"],
                         {"data.sources": [{"format": "audioset", "path": str(segments), "audio_dir": str(audio),
                                            "split": "eval"}]})
    store = WaveformStore.open(Pipeline(build_stages(config), config).ensure("prepare") / "waveforms.zarr")
    assert store.column("status").tolist() == ["ok", "ok", "missing", "missing", "missing"]
    assert store.waveform.shape == (5, 320000)


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    """A real `kdpipe prepare` process killed mid-run resumes at the first unwritten shard."""
    dataset = write_demo_dataset(tmp_path / "data", n_train=88, n_eval=8, clip_seconds=1.0)  # 48 shards: time to kill
    common = [f"--set=data.sources.0.path={dataset.manifest}", f"--set=data.class_list={dataset.class_list}",
              "--set=data.clip_seconds=1.0", "--set=prepare.shard_clips=2", "--set=prepare.workers=1",
              "--set=prepare.min_seconds=0.5"]
    killed_cache, clean_cache = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-m", "kdpipe", "prepare", *common]
    process = subprocess.Popen([*command, f"--set=cache_dir={killed_cache}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    written = 0
    while time.monotonic() < deadline and process.poll() is None:
        stores = list(killed_cache.glob("prepare/*/waveforms.zarr"))
        if stores:
            try:
                written = int(zarr.open_group(stores[0], mode="r")["done"][:].sum())
            except Exception:  # the store is being created
                written = 0
            if written >= 2:
                break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 2 <= written < 48, f"kill landed after {written} of 48 shards"
    entry = next(killed_cache.glob("prepare/*"))
    assert not (entry / "record.json").exists()
    # the rerun and the uninterrupted run: the CLI in this process (only the killed run needs its own)
    resumed = CliRunner().invoke(app, [*command[3:], f"--set=cache_dir={killed_cache}"])
    assert resumed.exit_code == 0, resumed.output
    assert "shards already written" in resumed.output
    invoke(*command[3:], f"--set=cache_dir={clean_cache}")
    a = zarr.open_group(next(killed_cache.glob("prepare/*/waveforms.zarr")), mode="r")
    b = zarr.open_group(next(clean_cache.glob("prepare/*/waveforms.zarr")), mode="r")
    for name in ("waveform", "labels", "clip_id", "split", "status", "done"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_forced_rebuild_killed_mid_way_leaves_the_previous_output_committed_and_intact(tmp_path):
    """`kdpipe run --force prepare` builds beside the committed store and swaps only once done: killed with
    kill -9 half-way, the old store is still committed, verifies, and is bit-identical to before; the rerun
    rebuilds and commits in its place. `run --force` alone names the stages instead of forcing them all."""
    dataset = write_demo_dataset(tmp_path / "data", n_train=88, n_eval=8, clip_seconds=1.0)  # 48 shards
    common = [f"--set=data.sources.0.path={dataset.manifest}", f"--set=data.class_list={dataset.class_list}",
              "--set=data.clip_seconds=1.0", "--set=prepare.shard_clips=2", "--set=prepare.workers=1",
              "--set=prepare.min_seconds=0.5", f"--set=cache_dir={tmp_path / 'cache'}"]
    assert CliRunner().invoke(app, ["prepare", *common]).exit_code == 0
    entry = next((tmp_path / "cache").glob("prepare/*/record.json")).parent
    before = _files(entry)
    bare = CliRunner().invoke(app, normalized_argv(["run", *common, "--force"]))  # as `main` reads argv
    assert bare.exit_code == 2 and "needs a stage; name one or more of: prepare" in bare.output, bare.output
    process = subprocess.Popen([sys.executable, "-m", "kdpipe", "run", "--force", "prepare", *common],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rebuild, written, deadline = entry.with_name(entry.name + ".rebuild"), 0, time.monotonic() + 120
    while written < 2 and process.poll() is None and time.monotonic() < deadline:
        try:
            written = int(zarr.open_group(rebuild / "waveforms.zarr", mode="r")["done"][:].sum())
        except Exception:  # not created yet
            pass
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 2 <= written < 48, f"kill landed after {written} of 48 shards"
    assert _files(entry) == before  # record.json included: still committed, untouched
    verified = CliRunner().invoke(app, ["verify", *common])
    assert verified.exit_code == 0 and "damaged" not in verified.output, verified.output
    assert not rebuild.exists()  # verify holds the entry's lock: the unfinished rebuild is cleared
    rerun = CliRunner().invoke(app, ["run", "--force", "prepare", *common])
    assert rerun.exit_code == 0 and "rebuilding beside the committed output" in rerun.output, rerun.output
    after = _files(entry)
    assert after.keys() == before.keys() and all(after[name] == before[name] for name in before
                                                 if name != "record.json")
    assert not rebuild.exists() and not entry.with_name(entry.name + ".previous").exists()
