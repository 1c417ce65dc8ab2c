"""Decoding, validation and fixed-length conversion of single clips (kdpipe.audio_io, kdpipe.frontends)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from kdpipe import frontends
from kdpipe.audio_io import REASONS, AudioError, decode, fit_length, load_clip, to_int16

from helpers import tone

SR = 16000


def chirp(seconds: float, sr: int = SR) -> np.ndarray:
    """Broadband and never periodic, so an offset of even one sample shows up."""
    t = np.arange(round(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * (200 * t + 300 * t**2))).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)])


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def write(path: Path, data: np.ndarray, sr: int = SR, **kwargs) -> Path:
    sf.write(path, data, sr, **kwargs)
    return path


def write_pyav(path: Path, data: np.ndarray, sr: int, codec: str, container: str) -> Path:
    """Encode mono float audio with ffmpeg (formats libsndfile cannot read)."""
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=sr, layout="mono")
        frame = av.AudioFrame.from_ndarray(data[None, :], format="fltp", layout="mono")
        frame.sample_rate = sr
        to_codec = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=sr)
        for converted in to_codec.resample(frame):
            out.mux(stream.encode(converted))
        out.mux(stream.encode(None))
    return path


def reason_of(source, **kwargs) -> str:
    with pytest.raises(AudioError) as caught:
        load_clip(source, sample_rate=SR, clip_samples=SR, **kwargs)
    return caught.value.reason


# --- formats -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "options"),
    [
        (".wav", {"subtype": "PCM_16"}),
        (".wav", {"subtype": "FLOAT"}),
        (".flac", {}),
        (".ogg", {}),
        (".mp3", {"format": "MP3"}),
    ],
)
def test_soundfile_formats_decode_to_the_written_signal(tmp_path, suffix, options):
    signal = chirp(2.0)
    audio, sr = decode(write(tmp_path / f"clip{suffix}", signal, **options))
    assert sr == SR and audio.dtype == np.float32 and audio.shape == (1, len(signal))
    # Lossy codecs too come back sample-aligned: libsndfile drops the mp3 encoder delay/padding.
    threshold = 0.9999 if suffix in (".wav", ".flac") else 0.99
    assert correlation(audio[0], signal) > threshold


@pytest.mark.parametrize(
    ("suffix", "codec", "container", "sr"), [(".m4a", "aac", "mp4", 32000), (".webm", "libopus", "webm", 48000)]
)
def test_pyav_fallback_decodes_what_soundfile_cannot(tmp_path, suffix, codec, container, sr):
    path = write_pyav(tmp_path / f"clip{suffix}", tone(440, 2.0, sr), sr, codec, container)
    with pytest.raises(sf.LibsndfileError):
        sf.info(path)
    audio, got_sr = decode(path)
    assert got_sr == sr
    assert abs(audio.shape[1] - 2 * sr) <= 2048  # AAC keeps its 1024-sample priming, plus frame padding
    assert abs(peak_hz(audio[0], sr) - 440) < 2


def test_ffmpeg_written_ogg_opus_is_sample_aligned(tmp_path):
    # libsndfile reads this one, but applies the Opus pre-skip only after a seek.
    signal = chirp(2.0, 48000)
    audio, sr = decode(write_pyav(tmp_path / "clip.opus", signal, 48000, "libopus", "ogg"))
    assert sr == 48000 and audio.shape == (1, len(signal))
    assert correlation(audio[0], signal) > 0.99


def test_bytes_input_is_an_in_memory_file(tmp_path):
    path = write(tmp_path / "clip.mp3", chirp(2.0), format="MP3")
    from_bytes, _ = decode(path.read_bytes())
    from_path, _ = decode(path)
    np.testing.assert_array_equal(from_bytes, from_path)


# --- each AudioError reason from a real bad file ------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(AudioError) as caught:
        decode(tmp_path / "nowhere.wav")
    assert caught.value.reason == "missing" and "nowhere.wav" in str(caught.value)


def test_a_folder_is_skipped_with_a_reason(tmp_path):
    (tmp_path / "clip.wav").mkdir()
    with pytest.raises(AudioError) as caught:
        decode(tmp_path / "clip.wav")
    assert caught.value.reason == "missing" and "is a folder" in str(caught.value)


def test_zero_byte_file_zero_frame_wav_and_empty_bytes_are_empty(tmp_path):
    (tmp_path / "zero.wav").touch()
    assert reason_of(tmp_path / "zero.wav") == "empty"
    assert reason_of(write(tmp_path / "no_frames.wav", np.zeros(0, np.float32))) == "empty"
    assert reason_of(b"") == "empty"


@pytest.mark.parametrize("suffix", [".flac", ".ogg", ".mp3"])
def test_garbage_with_an_audio_extension_is_corrupt_not_empty(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    assert reason_of(path) == "corrupt"


def test_whole_ogg_files_are_not_truncated(tmp_path):
    for suffix, options in ((".ogg", {"subtype": "VORBIS"}), (".opus", {"format": "OGG", "subtype": "OPUS"})):
        audio, _ = decode(write(tmp_path / f"whole{suffix}", chirp(3.0), **options))
        assert audio.shape[1] > 0


def test_garbage_with_wav_extension_is_corrupt_and_names_both_decoders(tmp_path):
    path = tmp_path / "garbage.wav"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioError) as caught:
        decode(path)
    message = str(caught.value)
    assert caught.value.reason == "corrupt"
    assert "garbage.wav" in message and "soundfile:" in message and "PyAV:" in message


@pytest.mark.parametrize(
    ("suffix", "options"), [(".wav", {"subtype": "PCM_16"}), (".mp3", {"format": "MP3"}), (".flac", {}),
                            (".ogg", {"subtype": "VORBIS"}), (".opus", {"format": "OGG", "subtype": "OPUS"})]
)
def test_file_cut_in_half_is_truncated(tmp_path, suffix, options):
    # Ogg (Vorbis, Opus): decoders stop quietly at the cut; the last page lacks the end-of-stream flag.
    # WAV: libsndfile hides the cut, caught from the RIFF header's data size.
    # MP3: read() returns fewer frames than the Xing header promises.
    # FLAC: libsndfile refuses it, PyAV decodes up to the cut and then errors.
    seconds = 10.0 if suffix in (".ogg", ".opus") else 3.0  # Ogg: cut in the audio pages, past the headers
    whole = write(tmp_path / f"whole{suffix}", chirp(seconds), **options).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(AudioError) as caught:
        decode(cut)
    assert caught.value.reason == "truncated" and f"cut{suffix}" in str(caught.value)


def test_segment_inside_the_intact_part_of_a_cut_wav_is_fine(tmp_path):
    whole = write(tmp_path / "whole.wav", chirp(4.0), subtype="PCM_16").read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole[: len(whole) // 2])
    audio, _ = decode(cut, start=0.5, end=1.5)
    assert audio.shape == (1, SR)
    assert reason_of(cut, start=1.0, end=3.0) == "truncated"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_float_wav_with_nan_or_inf_is_nonfinite(tmp_path, bad):
    signal = tone(440, 2.0)
    signal[1000] = bad
    assert reason_of(write(tmp_path / "bad.wav", signal, subtype="FLOAT")) == "nonfinite"


def test_short_file_is_too_short(tmp_path):
    path = write(tmp_path / "short.wav", tone(440, 0.2))
    assert reason_of(path, min_seconds=1.0) == "too_short"
    clip, info = load_clip(path, sample_rate=SR, clip_samples=SR, min_seconds=0.1)
    assert info["orig_seconds"] == pytest.approx(0.2)


def test_all_zero_file_is_silent(tmp_path):
    assert reason_of(write(tmp_path / "zeros.wav", np.zeros(2 * SR, np.float32))) == "silent"


def test_segment_past_the_end_is_empty(tmp_path):
    assert reason_of(write(tmp_path / "clip.wav", tone(440, 2.0)), start=5.0, end=6.0) == "empty"


def test_audio_error_checks_reason_and_pickles():
    assert set(REASONS) == {"missing", "empty", "corrupt", "truncated", "too_short", "silent", "nonfinite"}
    with pytest.raises(ValueError):
        AudioError("bad_reason", "x")
    copy = pickle.loads(pickle.dumps(AudioError("silent", "clip.wav: silent")))
    assert copy.reason == "silent" and str(copy) == "clip.wav: silent"


# --- resampling, length, scaling, downmix --------------------------------------


@pytest.mark.parametrize("orig_sr", [44100, 48000, 22050, 8000])
def test_resampled_tone_keeps_its_frequency_and_level(tmp_path, orig_sr):
    path = write(tmp_path / "tone.wav", tone(1000, 1.5, orig_sr), orig_sr, subtype="FLOAT")
    clip, info = load_clip(path, sample_rate=32000, clip_samples=48000)
    assert clip.shape == (48000,) and clip.dtype == np.int16
    assert info == {"orig_sample_rate": orig_sr, "orig_channels": 1, "orig_seconds": pytest.approx(1.5)}
    body = clip[2000:-2000] / 32767
    assert abs(peak_hz(body, 32000) - 1000) < 1
    assert np.sqrt(np.mean(body**2)) == pytest.approx(0.5 / math.sqrt(2), rel=0.01)


def test_resample_length_and_identity():
    x = tone(1000, 1.0, 44100)
    assert frontends.resample(x, 44100, 32000).shape == (math.ceil(44100 * 32000 / 44100),)
    assert frontends.resample(np.stack([x, x]), 44100, 32000).shape == (2, 32000)
    assert frontends.resample(x, 44100, 44100) is x


def test_crop_keeps_the_start_and_pad_appends_zeros(tmp_path):
    pcm = (chirp(2.0) * 32767).astype(np.int16)
    path = write(tmp_path / "clip.wav", pcm, subtype="PCM_16")
    cropped, _ = load_clip(path, sample_rate=SR, clip_samples=SR)
    assert np.abs(cropped.astype(int) - pcm[:SR]).max() <= 1
    padded, _ = load_clip(path, sample_rate=SR, clip_samples=3 * SR)
    assert np.abs(padded[: 2 * SR].astype(int) - pcm).max() <= 1
    assert not padded[2 * SR :].any()


def test_fit_length_and_int16_scaling():
    np.testing.assert_array_equal(fit_length(np.arange(5.0), 3), [0, 1, 2])
    np.testing.assert_array_equal(fit_length(np.arange(2.0), 4), [0, 1, 0, 0])
    scaled = to_int16(np.array([0.0, 0.5, 1.0, -1.0, 2.0, -3.0], np.float32))
    np.testing.assert_array_equal(scaled, [0, 16384, 32767, -32768, 32767, -32768])
    assert scaled.dtype == np.int16


def test_stereo_is_downmixed_to_the_channel_mean(tmp_path):
    stereo = np.stack([tone(440, 2.0), tone(1000, 2.0, amp=0.3)], axis=1)
    clip, info = load_clip(write(tmp_path / "stereo.wav", stereo, subtype="FLOAT"), sample_rate=SR, clip_samples=2 * SR)
    assert info["orig_channels"] == 2
    np.testing.assert_array_equal(clip, to_int16(stereo.mean(axis=1)))


# --- segments ------------------------------------------------------------------


def test_segment_selects_the_right_half(tmp_path):
    path = write(tmp_path / "two_tones.flac", np.concatenate([tone(440, 2.0), tone(2000, 2.0)]))
    first, _ = load_clip(path, sample_rate=SR, clip_samples=2 * SR, start=0.0, end=2.0)
    second, info = load_clip(path, sample_rate=SR, clip_samples=2 * SR, start=2.0, end=4.0)
    assert abs(peak_hz(first / 32767, SR) - 440) < 1
    assert abs(peak_hz(second / 32767, SR) - 2000) < 1
    assert info["orig_seconds"] == pytest.approx(2.0)


PYAV_WRITTEN = {".m4a": ("aac", "mp4"), ".webm": ("libopus", "webm"), ".opus": ("libopus", "ogg")}


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3", ".m4a", ".webm", ".opus"])
def test_segment_is_sample_exact_slice_of_full_decode(tmp_path, suffix):
    # Guards the decoder quirks worked around in audio_io: inexact libsndfile seeks
    # (mp3, ogg), mp3 read-call glitches, and PyAV seek + timestamp trimming (m4a, webm).
    if suffix in PYAV_WRITTEN:
        path = write_pyav(tmp_path / f"clip{suffix}", chirp(5.0, 48000), 48000, *PYAV_WRITTEN[suffix])
    else:
        path = write(tmp_path / f"clip{suffix}", chirp(5.0), format=suffix[1:].upper())
    full, sr = decode(path)
    segment, _ = decode(path, start=3.0, end=4.0)
    assert segment.shape == (1, sr)
    # After a seek the AAC decoder's state differs in the last float bits (~1e-5);
    # a one-sample offset of this chirp would be off by ~0.05.
    np.testing.assert_allclose(segment, full[:, 3 * sr : 4 * sr], atol=1e-4)


def test_end_past_the_file_end_is_clipped(tmp_path):
    audio, _ = decode(write(tmp_path / "clip.wav", tone(440, 2.0)), start=1.5, end=10.0)
    assert audio.shape == (1, SR // 2)
