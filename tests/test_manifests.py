"""Manifests: our CSV format, the official AudioSet segment CSVs, and their errors."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kdpipe.classes import read_class_list
from kdpipe.config import DataConfig, SourceConfig
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.manifests import (
    index_audio_folder,
    load_clips,
    read_audioset_segments,
    read_csv_manifest,
    write_csv_manifest,
)


def write_wav(path: Path, seconds: float = 0.5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.full(int(16000 * seconds), 0.1, dtype=np.float32), 16000)


def test_official_eval_segments_with_audio_folder(audioset_metadata, tmp_path):
    segments = audioset_metadata / "eval_segments.csv"
    audio = tmp_path / "audio"
    # the usual download names, one each, some in sub-folders
    write_wav(audio / "Y--4gqARaEJE.wav")
    write_wav(audio / "part01" / "--BfvyPmVMo.flac")
    write_wav(audio / "--U7joUcTCo_0.000.wav")
    clips = read_audioset_segments(segments, audio, split="eval")
    assert len(clips) == 20371  # the header's num_segs
    assert sum(len(c.labels) for c in clips) == 51804  # the header's num_positive_labels
    classes = read_class_list(audioset_metadata / "class_labels_indices.csv")
    assert {label for c in clips for label in c.labels} <= set(classes.mids)
    first = clips[0]
    assert (first.clip_id, first.labels) == ("--4gqARaEJE", ("/m/068hy", "/m/07q6cd_", "/m/0bt9lr", "/m/0jbk"))
    found = {c.clip_id: c.audio for c in clips if c.audio.is_file()}
    assert found == {"--4gqARaEJE": audio / "Y--4gqARaEJE.wav", "--BfvyPmVMo": audio / "part01" / "--BfvyPmVMo.flac",
                     "--U7joUcTCo": audio / "--U7joUcTCo_0.000.wav"}


def test_audio_folder_names(tmp_path):
    for name in ("Y-abcdefghij.wav", "0123456789a_30000.mp3", "Zbcdefghijk.ogg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert set(index_audio_folder(tmp_path)) == {"-abcdefghij", "0123456789a", "Zbcdefghijk"}


def test_csv_manifest_paths_labels_segments(tmp_path):
    manifest = tmp_path / "sub" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text("clip_id,path,labels,start,end,split\n"
                        "a,audio/a.wav,Dog;Bark,,,train\n"
                        'b,../b.flac,"/m/0bt9lr; Cat",2.5,12.5,eval\n')
    a, b = read_csv_manifest(manifest)
    assert b.audio == tmp_path / "b.flac"
    assert a.audio == tmp_path / "sub" / "audio" / "a.wav" and a.labels == ("Dog", "Bark") and a.start is None
    assert b.labels == ("/m/0bt9lr", "Cat") and (b.start, b.end, b.split) == (2.5, 12.5, "eval")
    out = tmp_path / "elsewhere" / "copy.csv"
    write_csv_manifest([a, b], out)
    assert read_csv_manifest(out) == [a, b]


def test_csv_manifest_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("clip_id,file,labels\n")
    with pytest.raises(KdpipeError, match="missing column.*path"):
        read_csv_manifest(bad)
    no_split = tmp_path / "nosplit.csv"
    no_split.write_text("clip_id,path,labels\na,a.wav,x\n")
    with pytest.raises(KdpipeError, match="no split column"):
        read_csv_manifest(no_split)
    assert read_csv_manifest(no_split, default_split="train")[0].split == "train"
    bad_time = tmp_path / "time.csv"
    bad_time.write_text("clip_id,path,labels,start,split\na,a.wav,x,soon,train\n")
    with pytest.raises(KdpipeError, match="line 2"):
        read_csv_manifest(bad_time)


@pytest.mark.parametrize("content, expected", [
    (b"", "the file is empty"),
    (b"clip_id,path,labels,split\n", "a header and no clips"),
    (b"clip_id,path,split\na,a.wav,train\n", "line 1: missing column.*labels"),
    (b"clip_id,path,labels,split\na,a.wav,x,train\nb,b.wav\n", "line 3: 2 fields where the header has 4"),
    (b"clip_id,path,labels,split\na,a.wav,x,train\na,b.wav,y,eval\n", "line 3: clip_id 'a' already on line 2"),
    (b"clip_id,path,labels,split\ncaf\xe9,a.wav,x,train\n", "not UTF-8"),
])
def test_malformed_manifests_are_usage_errors_naming_file_and_line(tmp_path, content, expected):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as caught:
        read_csv_manifest(manifest)
    assert caught.value.exit_code == 2 and str(manifest) in str(caught.value)


def test_a_byte_order_mark_and_empty_labels_are_read(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("\ufeffclip_id,path,labels,split\na,a.wav,,train\nb,b.wav,x,eval\n".encode("utf-8"))
    clips = read_csv_manifest(manifest)
    assert [(c.clip_id, c.labels) for c in clips] == [("a", ()), ("b", ("x",))]
    assert all(c.labelled for c in clips)  # an empty labels field is a negative for every class, not unlabelled


def test_only_a_source_marked_labels_none_is_unlabelled(tmp_path):
    labelled, unlabelled = tmp_path / "m.csv", tmp_path / "u.csv"
    labelled.write_text("clip_id,path,labels,split\na,a.wav,,train\nb,b.wav,x,train\n")
    unlabelled.write_text("clip_id,path,labels,split\nc,c.wav,x,train\n")
    _, clips = load_clips(DataConfig(sources=[SourceConfig(path=labelled), SourceConfig(path=unlabelled,
                                                                                          labels="none")]))
    assert [(c.clip_id, c.labels, c.labelled) for c in clips] == [("a", (), True), ("b", ("x",), True),
                                                                   ("c", (), False)]


def test_duplicate_clip_ids_across_sources(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("clip_id,path,labels,split\na,a.wav,x,train\n")
    data = DataConfig(sources=[SourceConfig(path=manifest), SourceConfig(path=manifest)])
    with pytest.raises(KdpipeError, match="more than one source, e.g. a"):
        load_clips(data)


def test_class_list_defaults_to_sorted_labels(small_demo, tmp_path):
    classes, clips = load_clips(DataConfig(sources=[SourceConfig(path=small_demo.manifest)]))
    assert list(classes.names) == sorted({label for clip in clips for label in clip.labels})


def test_status_finds_a_malformed_manifest(tmp_path):
    from typer.testing import CliRunner

    from kdpipe.cli import app

    manifest = tmp_path / "m.csv"
    manifest.write_text("clip_id,path,labels,split\na,a.wav,x,train\nb,b.wav\n")
    result = CliRunner().invoke(app, ["status", "--set", f"data.sources.0.path={manifest}",
                                      "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 2 and "line 3: 2 fields where the header has 4" in " ".join(result.output.split())
