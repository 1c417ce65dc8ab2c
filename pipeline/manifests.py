"""Manifests: the single description of the data (which clips, where their audio is, their labels).

Three source formats are read into one list of `Clip`s:
  - our CSV manifest `clip_id,path,labels[,start,end,split]` (labels: mids or
    class names joined by `;`, paths relative to the manifest);
  - an official AudioSet segment CSV (`YTID, start, end, "mid,mid"`) plus a
    folder of audio files named after the YouTube ids;
  - a PaSST/EfficientAT HDF5 file (mp3 bytes and packed targets).
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from kdpipe.classes import ClassList, read_class_list
from kdpipe.config import DataConfig, SourceConfig
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.hdf5_source import read_hdf5_index

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a", ".aac", ".webm")
LABEL_SEPARATOR = ";"


@dataclass(frozen=True)
class Clip:
    clip_id: str
    audio: Path
    """An audio file, or an HDF5 file when `hdf5_row` is set."""
    labels: tuple[str, ...]
    split: str
    labelled: bool = True
    """False for unlabelled audio (a source with `labels: none`): `labels` says nothing about it. A labelled
    clip with empty `labels` is a negative for every class."""
    start: float | None = None
    end: float | None = None
    hdf5_row: int | None = None


def read_csv_manifest(path: Path, default_split: str | None = None) -> list[Clip]:
    """Our CSV manifest; audio paths are relative to the manifest's folder.

    A malformed manifest is a usage error (exit 2) naming the file, the line and what is wrong.
    UTF-8 with or without a byte-order mark is read; anything else is refused.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return _read_csv_rows(path, csv.DictReader(handle), default_split)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the manifest as UTF-8") \
            from None


def _read_csv_rows(path: Path, reader: csv.DictReader, default_split: str | None) -> list[Clip]:
    if reader.fieldnames is None:
        raise ConfigError(f"{path}: the file is empty; a manifest has a header clip_id,path,labels[,start,end,split]")
    columns = set(reader.fieldnames)
    missing = {"clip_id", "path", "labels"} - columns
    if missing:
        raise ConfigError(f"{path}, line 1: missing column(s) {', '.join(sorted(missing))}; "
                          "a manifest has clip_id,path,labels[,start,end,split]")
    if "split" not in columns and default_split is None:
        raise ConfigError(f"{path}: no split column; give the source a `split:` in the config")
    clips, seen = [], {}
    for line, row in enumerate(reader, start=2):
        if None in row.values() or None in row:
            raise ConfigError(f"{path}, line {line}: {len([v for v in row.values() if v is not None])} fields where "
                              f"the header has {len(reader.fieldnames)}")
        try:
            clip = Clip(
                clip_id=row["clip_id"].strip(),
                audio=Path(os.path.normpath(path.parent / row["path"].strip())),
                labels=_split_labels(row["labels"], LABEL_SEPARATOR),
                split=(row.get("split") or default_split or "").strip(),
                start=_optional_float(row.get("start")),
                end=_optional_float(row.get("end")),
            )
        except ValueError as exc:
            raise ConfigError(f"{path}, line {line}: {exc}") from None
        if not clip.clip_id:
            raise ConfigError(f"{path}, line {line}: empty clip_id")
        if clip.clip_id in seen:
            raise ConfigError(f"{path}, line {line}: clip_id {clip.clip_id!r} already on line {seen[clip.clip_id]}")
        seen[clip.clip_id] = line
        clips.append(clip)
    if not clips:
        raise ConfigError(f"{path}: a header and no clips")
    return clips


def read_audioset_segments(path: Path, audio_dir: Path, split: str) -> list[Clip]:
    """An official AudioSet segment CSV; each clip's audio is looked up by YouTube id in `audio_dir`.

    The audio files are taken to be the downloaded 10 s segments themselves
    (`Y<id>.wav`, `<id>.flac`, `<id>_<start>.mp3`, ...), so start/end are not applied.
    Clips whose file is absent keep a non-existent path and are reported as missing.
    """
    files = index_audio_folder(audio_dir)
    clips = []
    with open(path, newline="") as handle:
        rows = csv.reader((line for line in handle if not line.startswith("#")), skipinitialspace=True)
        for row in rows:
            if not row:
                continue
            if len(row) != 4:
                raise KdpipeError(f"{path}: expected `YTID, start, end, \"labels\"`, got {row}")
            ytid = row[0]
            clips.append(Clip(
                clip_id=ytid,
                audio=files.get(ytid, audio_dir / f"{ytid}.wav"),
                labels=_split_labels(row[3], ","),
                split=split,
            ))
    return clips


def index_audio_folder(audio_dir: Path) -> dict[str, Path]:
    """YouTube id -> audio file, for the usual AudioSet download names."""
    found: dict[str, Path] = {}
    for root, _dirs, names in os.walk(audio_dir):
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in AUDIO_EXTENSIONS:
                found.setdefault(_ytid_of(stem), Path(root) / name)
    return found


def _ytid_of(stem: str) -> str:
    """`Y--4gqARaEJE` -> `--4gqARaEJE`; `--4gqARaEJE_30.000` or `_30000` -> `--4gqARaEJE`."""
    stem = re.sub(r"_\d+(\.\d+)?(_\d+(\.\d+)?)?$", "", stem)
    if len(stem) == 12 and stem.startswith("Y"):
        stem = stem[1:]
    return stem


def read_hdf5_source(path: Path, classes: ClassList, split: str) -> list[Clip]:
    clips = []
    for entry in read_hdf5_index(path, num_classes=len(classes)):
        labels = tuple(classes.mids[i] for i in entry.target.nonzero()[0])
        clips.append(Clip(clip_id=entry.clip_id, audio=path, labels=labels, split=split, hdf5_row=entry.index))
    return clips


def read_source(source: SourceConfig, classes: ClassList | None) -> list[Clip]:
    if source.format == "csv":
        return read_csv_manifest(source.path, source.split)
    split = source.split or "train"
    if source.format == "audioset":
        assert source.audio_dir is not None  # checked when the config was loaded
        return read_audioset_segments(source.path, source.audio_dir, split)
    if classes is None:
        raise KdpipeError("data.class_list: an HDF5 source stores targets by class index, so it needs a class list")
    return read_hdf5_source(source.path, classes, split)


def load_clips(data: DataConfig) -> tuple[ClassList, list[Clip]]:
    """Every clip of every source, and the class list (given, or the labels found, sorted)."""
    if not data.sources:
        raise KdpipeError("data.sources is empty: list at least one manifest in the config")
    classes = read_class_list(data.class_list) if data.class_list else None
    clips = [clip if source.labels == "given" else replace(clip, labels=(), labelled=False)
             for source in data.sources for clip in read_source(source, classes)]
    duplicates = [clip_id for clip_id, count in Counter(c.clip_id for c in clips).items() if count > 1]
    if duplicates:
        raise ConfigError(f"{len(duplicates)} clip id(s) appear in more than one source, "
                          f"e.g. {', '.join(duplicates[:5])}")
    if classes is None:
        found = sorted({label for clip in clips for label in clip.labels})
        classes = ClassList(tuple(found), tuple(found))
    return classes, clips


def write_csv_manifest(clips: list[Clip], path: Path) -> None:
    """Write clips as our CSV manifest, paths relative to its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clip_id", "path", "labels", "start", "end", "split"])
        for clip in clips:
            writer.writerow([
                clip.clip_id,
                os.path.relpath(clip.audio, path.parent),
                LABEL_SEPARATOR.join(clip.labels),
                "" if clip.start is None else clip.start,
                "" if clip.end is None else clip.end,
                clip.split,
            ])


def _split_labels(text: str, separator: str) -> tuple[str, ...]:
    return tuple(label.strip() for label in text.split(separator) if label.strip())


def _optional_float(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None
