"""The synthetic demo dataset: reproducible, well-formed, format-diverse, and learnable."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kdpipe.demo_data import DEMO_CLASSES, DemoDataset, complete_labels, write_demo_dataset

N_TRAIN, N_EVAL, SECONDS = 36, 24, 1.5
MIDS = {mid for mid, _ in DEMO_CLASSES}
NAME_TO_MID = {name: mid for mid, name in DEMO_CLASSES}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    root = tmp_path_factory.mktemp("demo")
    return write_demo_dataset(root, n_train=N_TRAIN, n_eval=N_EVAL, clip_seconds=SECONDS, seed=3)


@pytest.fixture(scope="module")
def rows(demo: DemoDataset) -> list[dict[str, str]]:
    with demo.manifest.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _mids(row: dict[str, str]) -> list[str]:
    labels = row["labels"].split(";")
    return labels if row["split"] == "eval" else [NAME_TO_MID[name] for name in labels]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    kwargs = dict(n_train=14, n_eval=12, clip_seconds=0.5, seed=7)
    write_demo_dataset(tmp_path / "a", **kwargs)
    write_demo_dataset(tmp_path / "b", **kwargs)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert any(name.endswith(".ogg") for name in a)  # the one container libsndfile randomises
    assert a == b
    assert _digests(write_demo_dataset(tmp_path / "c", **{**kwargs, "seed": 8}).root) != a


def test_rewriting_the_same_root_overwrites(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, n_train=20, n_eval=12, clip_seconds=0.5)
    before = _digests(tmp_path)
    ds = write_demo_dataset(tmp_path, n_train=13, n_eval=12, clip_seconds=0.5)
    after = _digests(tmp_path)
    assert ds.n_clips == 25
    assert len(after) == 25 + 2  # stale clips from the larger first run are gone
    clips = {name: digest for name, digest in after.items() if name.startswith("audio/")}
    # Per-clip seeding: surviving clips (all of eval, despite the new n_train) are unchanged.
    assert all(before[name] == digest for name, digest in clips.items())


def test_too_short_clips_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clip_seconds"):
        write_demo_dataset(tmp_path, n_train=1, n_eval=1, clip_seconds=0.01)


def test_class_list_matches_audioset_layout(demo: DemoDataset) -> None:
    lines = demo.class_list.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "index,mid,display_name"
    assert lines[1] == '0,/demo/low_tone,"Low tone"'
    with demo.class_list.open(newline="", encoding="utf-8") as f:
        parsed = [(r["mid"], r["display_name"]) for r in csv.DictReader(f)]
    assert tuple(parsed) == DEMO_CLASSES
    assert len(MIDS) == len(NAME_TO_MID) == 12


def test_manifest_rows_are_valid(demo: DemoDataset, rows: list[dict[str, str]]) -> None:
    assert demo.n_clips == len(rows) == N_TRAIN + N_EVAL
    assert demo.manifest == demo.root / "manifest.csv"
    assert list(rows[0]) == ["clip_id", "path", "labels", "split"]
    assert len({r["clip_id"] for r in rows}) == len(rows)
    for row in rows:
        assert (demo.manifest.parent / row["path"]).is_file()
        assert row["clip_id"] == Path(row["path"]).stem
        assert row["split"] in {"train", "eval"}
        labels = row["labels"].split(";")
        assert set(labels) <= (set(NAME_TO_MID) if row["split"] == "train" else MIDS)
        assert 1 <= len(set(labels)) == len(labels) <= 3
    counts = {split: {mid: 0 for mid in MIDS} for split in ("train", "eval")}
    for row in rows:
        for mid in _mids(row):
            counts[row["split"]][mid] += 1
    assert all(n >= 2 for per_split in counts.values() for n in per_split.values())
    assert any(len(r["labels"].split(";")) > 1 for r in rows)  # genuinely multi-label


def test_formats_vary_and_every_clip_has_the_requested_duration(
    demo: DemoDataset, rows: list[dict[str, str]]
) -> None:
    rates, channels, containers = set(), set(), set()
    for row in rows:
        path = demo.root / row["path"]
        audio, sr = sf.read(path, always_2d=True)
        rates.add(sr)
        channels.add(audio.shape[1])
        containers.add(sf.info(path).format)
        assert abs(audio.shape[0] - SECONDS * sr) <= 1
        assert np.sqrt(np.mean(audio**2)) > 1e-3
        assert 0.25 < np.max(np.abs(audio)) < 0.95
    assert len(rates) > 1 and 32000 in rates
    assert 2 in channels
    assert {"WAV", "FLAC", "OGG"} <= containers


def _band_energy_fraction(path: Path, lo: float, hi: float) -> float:
    audio, sr = sf.read(path, always_2d=True)
    power = np.abs(np.fft.rfft(audio.mean(axis=1))) ** 2
    freqs = np.fft.rfftfreq(audio.shape[0], 1 / sr)
    return float(power[(freqs >= lo) & (freqs <= hi)].sum() / power.sum())


@pytest.mark.parametrize(
    ("mid", "lo", "hi"), [("/demo/low_tone", 85, 155), ("/demo/high_tone", 2150, 3250)]
)
def test_labels_match_the_audio(
    demo: DemoDataset, rows: list[dict[str, str]], mid: str, lo: float, hi: float
) -> None:
    """Independent spectral check: clips labelled with a tone carry far more energy in its band.

    With labels unrelated to the audio the two group means would be about equal.
    """
    fractions = {True: [], False: []}
    for row in rows:
        fractions[mid in _mids(row)].append(_band_energy_fraction(demo.root / row["path"], lo, hi))
    with_tone, without_tone = np.array(fractions[True]), np.array(fractions[False])
    assert with_tone.mean() > 5 * without_tone.mean()
    assert np.median(with_tone) > np.percentile(without_tone, 90)


def test_missing_labels_drop_train_events_only_and_leave_the_audio_alone(tmp_path: Path) -> None:
    def read(root: Path, missing: float) -> tuple[dict[str, set[str]], dict[str, str]]:
        dataset = write_demo_dataset(root, n_train=60, n_eval=6, clip_seconds=0.2, missing_labels=missing)
        with open(dataset.manifest, newline="") as handle:
            rows = list(csv.DictReader(handle))
        labels = {row["clip_id"]: set(row["labels"].split(";")) for row in rows}
        audio = {row["clip_id"]: hashlib.sha256((root / row["path"]).read_bytes()).hexdigest() for row in rows}
        return labels, audio

    (complete, audio), (weak, weak_audio) = read(tmp_path / "complete", 0.0), read(tmp_path / "weak", 0.5)
    assert audio == weak_audio
    assert all(weak[clip] and weak[clip] <= complete[clip] for clip in complete)
    assert all(weak[clip] == complete[clip] for clip in complete if "_eval_" in clip)
    dropped = sum(len(complete[c]) - len(weak[c]) for c in complete)
    extra = sum(len(complete[c]) - 1 for c in complete if "_train_" in c)
    assert 0.3 * extra < dropped < 0.7 * extra  # about half of the extra train events
    # complete_labels replays the draws: it finds exactly the labels the generator gave before dropping any
    clips = sorted(complete)
    replayed = complete_labels(np.array(clips))
    names = [name for _, name in DEMO_CLASSES]
    for clip, row in zip(clips, replayed):
        given = {names[c] if "_train_" in clip else DEMO_CLASSES[c][0] for c in np.flatnonzero(row)}
        assert given == complete[clip], clip
