"""Synthetic multi-label audio-tagging dataset for ``kdpipe demo``.

The demo must run anywhere without downloading AudioSet, so it generates a small,
deterministic dataset on the fly: 12 clearly different synthetic sound events,
1-3 per clip over low-level background noise, written in a mix of sample rates,
channel counts and containers so the decoder and resampler are exercised too.
"""

from __future__ import annotations

import csv
import struct
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf

from kdpipe.config import Config, check_input_files, load_config

EventFn = Callable[[np.random.Generator, int, int], np.ndarray]  # (rng, n_samples, sample_rate)


@dataclass(frozen=True)
class DemoDataset:
    """Where a generated demo dataset lives, in the layout the data stages expect."""

    root: Path
    manifest: Path  # root / "manifest.csv"
    class_list: Path  # root / "class_labels_indices.csv"
    n_clips: int
    unlabelled: Path | None = None  # root / "unlabelled.csv": train clips whose labels are not given


@dataclass(frozen=True)
class _ClipFormat:
    sample_rate: int
    channels: int
    container: str  # soundfile format name; lower-cased it is also the file extension


# --- event generators: (rng, n_samples, sample_rate) -> signal with peak ~1 ----------


def _sweep(f: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Sine following the per-sample frequency track ``f`` (Hz), from a random phase."""
    return np.sin(2 * np.pi * np.cumsum(f) / sr + rng.uniform(0, 2 * np.pi))


def _tone(lo: float, hi: float) -> EventFn:
    return lambda rng, n, sr: _sweep(np.full(n, rng.uniform(lo, hi)), sr, rng)


def _chirp(f_start: tuple[float, float], f_end: tuple[float, float]) -> EventFn:
    def gen(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
        f0, f1 = rng.uniform(*f_start), rng.uniform(*f_end)
        return _sweep(f0 * (f1 / f0) ** (np.arange(n) / n), sr, rng)  # exponential sweep

    return gen


def _white_noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, n)


def _brown_noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    knee = rng.uniform(150, 300)
    spectrum /= np.maximum(np.fft.rfftfreq(n, 1 / sr), knee)  # flat below the knee, 1/f above
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n)


def _click_train(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    impulses = np.zeros(n)
    impulses[:: max(1, round(sr / rng.uniform(8, 25)))] = 1.0
    t = np.arange(round(0.004 * sr)) / sr
    tick = np.exp(-t / 0.0006) * np.cos(2 * np.pi * rng.uniform(1500, 2500) * t)
    return np.convolve(impulses, tick)[:n]


def _harmonic_stack(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f0 = rng.uniform(180, 320)
    t = np.arange(n) / sr
    partials = np.arange(1, min(20, int(0.45 * sr / f0)) + 1)
    phases = rng.uniform(0, 2 * np.pi, len(partials))
    return sum(np.sin(2 * np.pi * k * f0 * t + p) / k for k, p in zip(partials, phases))


def _am_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    rate, depth = rng.uniform(4, 10), rng.uniform(0.6, 0.95)
    modulator = 1 + depth * np.sin(2 * np.pi * rate * np.arange(n) / sr)
    return modulator * _tone(700, 1100)(rng, n, sr)


def _fm_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    carrier, rate, depth = rng.uniform(500, 900), rng.uniform(5, 8), rng.uniform(0.03, 0.08)
    return _sweep(carrier * (1 + depth * np.sin(2 * np.pi * rate * np.arange(n) / sr)), sr, rng)


def _bird_trill(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    period = sr / rng.uniform(12, 20)  # one fast down-chirp syllable per period
    f_hi, f_lo, duty = rng.uniform(4500, 5500), rng.uniform(2500, 3200), 0.6
    u = np.minimum((np.arange(n) % period) / period / duty, 1.0)  # 1 = gap between syllables
    return np.sin(np.pi * u) ** 2 * _sweep(f_hi + (f_lo - f_hi) * u, sr, rng)


def _doorbell(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f_first, half = rng.uniform(600, 800), n // 2
    out = np.zeros(n)
    for start, f in ((0, f_first), (half, f_first * 0.8)):  # "ding" then "dong", a major third down
        t = np.arange(n - start) / sr
        note = sum(a * np.sin(2 * np.pi * k * f * t) for k, a in ((1, 1.0), (2, 0.4), (3, 0.2)))
        out[start:] += note * np.exp(-t / rng.uniform(0.15, 0.3))
    return out


_CLASSES: tuple[tuple[str, str, EventFn], ...] = (
    ("/demo/low_tone", "Low tone", _tone(90, 150)),
    ("/demo/high_tone", "High tone", _tone(2200, 3200)),
    ("/demo/up_chirp", "Up-chirp", _chirp((300, 500), (2500, 3500))),
    ("/demo/down_chirp", "Down-chirp", _chirp((2500, 3500), (300, 500))),
    ("/demo/white_noise", "White noise burst", _white_noise),
    ("/demo/brown_noise", "Brown noise burst", _brown_noise),
    ("/demo/click_train", "Click train", _click_train),
    ("/demo/harmonic_stack", "Harmonic stack", _harmonic_stack),
    ("/demo/am_tone", "AM tone", _am_tone),
    ("/demo/fm_tone", "FM tone", _fm_tone),
    ("/demo/bird_trill", "Bird trill", _bird_trill),
    ("/demo/doorbell", "Doorbell", _doorbell),
)
DEMO_CLASSES: tuple[tuple[str, str], ...] = tuple((mid, name) for mid, name, _ in _CLASSES)

_SPLIT_SEEDS = {"train": 0, "eval": 1, "unlabelled": 2, "val": 3}
_OGG_SERIAL = 0x6B647069  # fixed stream serial: libsndfile picks a random one per file


# --- clip assembly ----------------------------------------------------------------------


def _clip_format(index: int) -> _ClipFormat:
    """Deterministic format mix: mostly 32 kHz mono WAV, with other rates, stereo, FLAC, OGG."""
    sample_rate = 44100 if index % 7 == 3 else 16000 if index % 9 == 4 else 32000
    channels = 2 if index % 10 == 6 else 1
    container = {5: "FLAC", 11: "OGG"}.get(index % 12, "WAV")
    return _ClipFormat(sample_rate, channels, container)


def _choose_classes(rng: np.random.Generator, index: int) -> list[int]:
    """The first class cycles through all classes (so every split covers each), plus 0-2 extra."""
    first = index % len(_CLASSES)
    others = [c for c in range(len(_CLASSES)) if c != first]
    extra = rng.choice(others, size=rng.integers(0, 3), replace=False)
    return sorted([first, *extra.tolist()])


def _envelope(n: int, attack: int, release: int) -> np.ndarray:
    """Raised-cosine attack and release so events start and stop without clicks."""
    envelope = np.ones(n)
    for ramp, view in ((attack, envelope), (release, envelope[::-1])):
        ramp = min(max(ramp, 1), n // 2)
        view[:ramp] *= 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    return envelope


def _render_event(rng: np.random.Generator, cls: int, n_clip: int, sr: int) -> np.ndarray:
    """One event of class ``cls`` at a random onset, duration and level, as a full-clip track."""
    n = min(n_clip, round(rng.uniform(0.3, 1.2) * sr))
    signal = _CLASSES[cls][2](rng, n, sr)
    attack, release = rng.uniform(0.005, 0.05), rng.uniform(0.02, 0.1)
    envelope = _envelope(n, round(attack * sr), round(release * sr))
    onset = rng.integers(0, n_clip - n + 1)
    out = np.zeros(n_clip)
    out[onset : onset + n] = signal * envelope * rng.uniform(0.4, 1.0) / np.max(np.abs(signal))
    return out


def _render_clip(
    rng: np.random.Generator, classes: list[int], fmt: _ClipFormat, seconds: float
) -> np.ndarray:
    """Mix the events (randomly panned if stereo) over background noise, then peak-normalise."""
    n = round(seconds * fmt.sample_rate)
    mix = 0.01 * rng.standard_normal((n, fmt.channels))
    for cls in classes:
        pan = rng.uniform(0.3, 1.0, fmt.channels)
        mix += _render_event(rng, cls, n, fmt.sample_rate)[:, None] * pan
    mix *= rng.uniform(0.3, 0.9) / np.max(np.abs(mix))
    return mix if fmt.channels > 1 else mix[:, 0]


def _crc_table_entry(byte: int) -> int:
    crc = byte << 24
    for _ in range(8):
        crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


_OGG_CRC_TABLE = tuple(_crc_table_entry(b) for b in range(256))


def _ogg_crc(page: bytes) -> int:
    """Ogg's page checksum: CRC-32, polynomial 0x04C11DB7, unreflected, zero init."""
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC_TABLE[(crc >> 24) ^ byte]
    return crc


def _fix_ogg_serial(path: Path) -> None:
    """Rewrite every page's stream serial (and CRC) so OGG output is byte-reproducible."""
    data, pos = bytearray(path.read_bytes()), 0
    while pos < len(data):
        n_segments = data[pos + 26]
        end = pos + 27 + n_segments + sum(data[pos + 27 : pos + 27 + n_segments])
        struct.pack_into("<I", data, pos + 14, _OGG_SERIAL)
        struct.pack_into("<I", data, pos + 22, 0)  # the CRC is computed with its own field zeroed
        struct.pack_into("<I", data, pos + 22, _ogg_crc(bytes(data[pos:end])))
        pos = end
    path.write_bytes(bytes(data))


def _write_clip(path: Path, audio: np.ndarray, fmt: _ClipFormat) -> None:
    """Write one clip with soundfile (float -> PCM_16 / Vorbis), OGG made reproducible."""
    subtype = "VORBIS" if fmt.container == "OGG" else "PCM_16"
    sf.write(path, audio, fmt.sample_rate, format=fmt.container, subtype=subtype)
    if fmt.container == "OGG":
        _fix_ogg_serial(path)


def _write_manifest(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("clip_id", "path", "labels", "split"))
        writer.writerows(rows)


def _write_class_list(path: Path) -> None:
    """AudioSet's ``class_labels_indices.csv`` layout, display names always quoted."""
    lines = ["index,mid,display_name"]
    lines += [f'{i},{mid},"{name}"' for i, (mid, name) in enumerate(DEMO_CLASSES)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _weak_labels(rng: np.random.Generator, classes: list[int], missing_labels: float) -> list[int]:
    """AudioSet-style weak labels: each event but the clip's first goes unlabelled with this probability."""
    return [c for i, c in enumerate(classes) if i == 0 or rng.random() >= missing_labels]


def write_demo_dataset(
    root: Path, *, n_train: int = 240, n_eval: int = 80, n_val: int = 0, clip_seconds: float = 2.0, seed: int = 0,
    missing_labels: float = 0.0, n_unlabelled: int = 0,
) -> DemoDataset:
    """Generate (or regenerate, overwriting) the demo dataset under ``root``.

    Each clip draws from its own ``SeedSequence([seed, split, index])`` so the output is
    byte-identical for the same arguments, independent of generation order, and the eval
    clips do not change when ``n_train`` does. Train labels are display names, eval labels
    are mids, so both spellings the manifest accepts are exercised. `missing_labels` leaves
    events of train clips unlabelled, as AudioSet's annotators often did; eval labels stay complete.
    `n_val` clips form a validation split `val` (complete labels, like eval) for choosing checkpoints.
    `n_unlabelled` more train clips go to `unlabelled.csv` with their labels listed (for checking);
    a source with `labels: none` reads them as unlabelled audio.
    """
    if clip_seconds < 0.1:
        raise ValueError(f"clip_seconds must be at least 0.1, got {clip_seconds}")
    root = Path(root)
    audio_dir = root / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    for stale in audio_dir.glob("demo_*"):  # clips left by an earlier, larger run
        stale.unlink()
    rows: dict[str, list[tuple[str, str, str, str]]] = {"train": [], "eval": [], "val": [], "unlabelled": []}
    for split, n_clips in (("train", n_train), ("eval", n_eval), ("val", n_val), ("unlabelled", n_unlabelled)):
        for index in range(n_clips):
            rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_SEEDS[split], index]))
            fmt, classes = _clip_format(index), _choose_classes(rng, index)
            clip_id = f"demo_{split}_{index:04d}"
            rel_path = f"audio/{clip_id}.{fmt.container.lower()}"
            _write_clip(root / rel_path, _render_clip(rng, classes, fmt, clip_seconds), fmt)
            labelled = _weak_labels(rng, classes, missing_labels) if split == "train" else classes
            labels = [DEMO_CLASSES[c][1 if split == "train" else 0] for c in labelled]
            rows[split].append((clip_id, rel_path, ";".join(labels), "train" if split == "unlabelled" else split))
    manifest, class_list = root / "manifest.csv", root / "class_labels_indices.csv"
    _write_manifest(manifest, rows["train"] + rows["eval"] + rows["val"])
    _write_class_list(class_list)
    unlabelled = root / "unlabelled.csv"
    if n_unlabelled:
        _write_manifest(unlabelled, rows["unlabelled"])
    else:
        unlabelled.unlink(missing_ok=True)
    return DemoDataset(root=root, manifest=manifest, class_list=class_list, n_clips=n_train + n_eval + n_val,
                       unlabelled=unlabelled if n_unlabelled else None)


def complete_labels(clip_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, C) bool: every event mixed into each demo clip (its id names split and index), labelled or not;
    replays the clip's draws, so it needs no file beside the data."""
    complete = np.zeros((len(clip_ids), len(_CLASSES)), dtype=bool)
    for row, clip_id in enumerate(clip_ids):
        _, split, index = str(clip_id).rsplit("_", 2)
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_SEEDS[split], int(index)]))
        complete[row, _choose_classes(rng, int(index))] = True
    return complete


DEMO_SPLITS = {"n_train": 240, "n_eval": 400, "n_val": 48}
"""The demo's clips per split: `val` chooses checkpoints (teacher_training.keep / student.keep: best), `eval` scores."""


def demo_config(out: Path, overrides: list[str], missing_labels: float, unlabelled: int = 0,
                clips: dict[str, int] | None = None) -> tuple[Config, int]:
    """configs/demo.yaml with its data and cache under `out` (and, with `unlabelled` clips, a second source of
    unlabelled audio), and the number of clips generated for it (0 when the data is already there).
    `clips`: clips per split (write_demo_dataset's n_train, n_val, n_eval; default DEMO_SPLITS)."""
    clips = clips or DEMO_SPLITS
    data = out / "data"
    sources = [f"data.sources.0.path={data / 'manifest.csv'}"]
    if unlabelled:
        sources += [f"data.sources.1.path={data / 'unlabelled.csv'}", "data.sources.1.labels=none"]
    with resources.as_file(resources.files("kdpipe.configs").joinpath("demo.yaml")) as path:
        config = load_config(path, [f"cache_dir={out / 'cache'}", *sources,
                                    f"data.class_list={data / 'class_labels_indices.csv'}", *overrides],
                             check_files=False)
    written = 0
    have = len(_manifest_rows(data / "unlabelled.csv"))
    if len(_manifest_rows(data / "manifest.csv")) != sum(clips.values()) or have != unlabelled:
        dataset = write_demo_dataset(data, clip_seconds=config.data.clip_seconds, seed=config.seed,
                                     missing_labels=missing_labels, n_unlabelled=unlabelled, **clips)
        written = dataset.n_clips + unlabelled
    check_input_files(config)
    out.mkdir(parents=True, exist_ok=True)
    return config, written


def _manifest_rows(path: Path) -> list[str]:
    """The data rows of a manifest (none when it does not exist)."""
    return path.read_text().splitlines()[1:] if path.is_file() else []
