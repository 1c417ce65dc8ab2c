"""Decode one audio clip into a fixed-length int16 waveform, or say clearly why it can't be.

Bad clips are common at AudioSet scale (dead downloads, cut files, silence), so
every failure is an `AudioError` whose `reason` code can be counted and listed
in a skip report, and whose message tells the user which file and what to do.

Decoders: soundfile (libsndfile: wav, flac, ogg vorbis/opus, mp3) first, PyAV
(ffmpeg) for what libsndfile can't open (m4a/aac, webm/opus, ...) or fails on.
Behaviours found with libsndfile 1.2.2 and PyAV 18 (ffmpeg 8) that shape the code:

- A WAV cut short: libsndfile shrinks `frames` to the data actually present,
  so neither `info` nor `read` reveals the cut. We read the RIFF header's
  declared data size ourselves (`_wav_declared_frames`).
- An MP3 cut short: `frames` keeps the Xing/LAME header's count and `read`
  returns fewer frames; comparing the two catches it.
- A FLAC or Ogg file cut short: libsndfile refuses it ("lost sync",
  "malformed"); PyAV decodes up to the cut and then raises. Audio followed by a
  decoder error is reported as truncated.
- Other compressed formats (m4a, webm, ...) carry no frame count we trust, so a
  cut there is only caught by the too_short check.
- libsndfile's seek is not sample-accurate for MP3 and Ogg Vorbis (garbage or a
  64-sample offset after seeking), so those are decoded from the start and the
  head is thrown away; WAV/FLAC are seeked. See `_read_span` for two more
  libsndfile quirks (MP3 read-call boundaries, Ogg Opus pre-skip). PyAV seeks only containers with
  per-packet timestamps (mp4, matroska/webm, ogg), with pre-roll so the decoder
  is warmed up, and trims to the exact sample using the frame timestamps.
- Both decoders drop the MP3 encoder delay and padding given in the LAME tag,
  so decoded MP3 is sample-aligned with the original signal.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import soundfile as sf

from kdpipe import frontends
from kdpipe.errors import KdpipeError

REASONS = ("missing", "empty", "corrupt", "truncated", "too_short", "silent", "nonfinite")

# Header frame counts of compressed files may be off by a codec frame or two,
# or by ~1 % when estimated from the bitrate; shortfalls within this margin are
# not a truncation.
TRUNCATION_TOLERANCE = 0.01
TRUNCATION_MIN_FRAMES = 2 * 1152

# libsndfile formats whose seek lands on the wrong sample (see module docstring).
_INEXACT_SEEK_FORMATS = frozenset({"MP3", "OGG"})
# ffmpeg demuxers whose packets carry exact timestamps, so seeking is safe.
_TIMESTAMPED_CONTAINERS = frozenset({"mov", "mp4", "matroska", "webm", "ogg"})
# Decode this much before a seek target so codec state (overlap, bit reservoir) is warm.
_PREROLL_SECONDS = 0.5
# RIFF WAVE format tags whose data chunk holds exactly block_align bytes per frame.
_PCM_FORMAT_TAGS = frozenset({0x0001, 0x0003, 0xFFFE})

Source = Path | bytes


class AudioError(KdpipeError):
    """Bad input audio; `reason` is a short machine-readable code, str(e) a human message."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown AudioError reason {reason!r}; expected one of {REASONS}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # Keeps the exception picklable, so it survives the trip back from a worker process.
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class _Decoded:
    audio: np.ndarray  # float32 (channels, frames)
    sample_rate: int
    expected_frames: int | None  # frames the file's header promises for the requested span
    error: str | None = None  # decoder error that stopped decoding after some audio


class _NoAudioStream(Exception):
    pass


def decode(source: Source, *, start: float | None = None, end: float | None = None) -> tuple[np.ndarray, int]:
    """Decode a file (or an in-memory encoded file) to float32 (channels, frames) and its sample rate.

    `start`/`end` in seconds select a segment; an `end` past the end of the
    audio is clipped to it. Raises AudioError (missing, empty, corrupt, truncated).
    """
    _check_span(start, end)
    if not isinstance(source, bytes):
        source = Path(source)
    name = _describe(source)
    _check_present(source, name)
    declared = _wav_declared_frames(source)
    try:
        decoded = _decode_soundfile(source, start, end, declared)
    except sf.SoundFileError as sf_error:
        try:
            decoded = _decode_pyav(source, start, end, declared)
            # ffmpeg "opens" some garbage and finds no audio in it: corrupt, not empty
            if decoded.audio.shape[1] == 0 and start is None and not _ogg_cut_short(source):
                raise _NoAudioStream("no decodable audio")
        except (av.error.FFmpegError, _NoAudioStream) as av_error:
            if _ogg_cut_short(source):
                raise AudioError("truncated", f"{name}: the Ogg stream is cut short before any audio; "
                                 "re-download it") from av_error
            raise AudioError(
                "corrupt",
                f"{name}: not a readable audio file (soundfile: {sf_error}; PyAV: {av_error}); "
                "re-download or re-encode it",
            ) from av_error
    if _ogg_cut_short(source):
        seconds = decoded.audio.shape[1] / decoded.sample_rate
        raise AudioError("truncated", f"{name}: the Ogg stream stops after {seconds:.2f} s without its "
                         "end-of-stream page; the file was cut short, re-download it")
    _check_complete(decoded, name, start, end)
    return decoded.audio, decoded.sample_rate


def _ogg_cut_short(source: Source) -> bool:
    """An Ogg file (Vorbis, Opus) whose last page is incomplete or lacks the end-of-stream flag.

    Ogg declares no total length, and decoders stop quietly at a cut; but a complete stream
    ends with a whole page flagged end-of-stream (RFC 3533, header type bit 0x04).
    """
    with _open_binary(source) as handle:
        if handle.read(4) != b"OggS":
            return False
        size = handle.seek(0, io.SEEK_END)
        handle.seek(max(0, size - 65536 - 282))  # a page is at most 27 + 255 + 255 * 255 bytes
        tail = handle.read()
    last = tail.rfind(b"OggS")
    if last < 0 or len(tail) - last < 27:
        return True
    header_type, segments = tail[last + 5], tail[last + 26]
    table = tail[last + 27:last + 27 + segments]
    complete = len(table) == segments and last + 27 + segments + sum(table) == len(tail)
    return not (complete and header_type & 0x04)


def load_clip(
    source: Source,
    *,
    sample_rate: int,
    clip_samples: int,
    start: float | None = None,
    end: float | None = None,
    min_seconds: float = 1.0,
    silence_threshold: float = 1e-4,
) -> tuple[np.ndarray, dict]:
    """Decode, validate, downmix, resample and pad/crop one clip to int16 (clip_samples,).

    The info dict records what the file was (orig_sample_rate, orig_channels,
    orig_seconds) for reports. Raises AudioError for any bad input.
    """
    if clip_samples <= 0:
        raise ValueError(f"clip_samples must be positive, got {clip_samples}")
    audio, orig_sr = decode(source, start=start, end=end)
    _validate(audio, orig_sr, _describe(source), min_seconds, silence_threshold)
    mono = frontends.resample(audio.mean(axis=0), orig_sr, sample_rate)
    info = {
        "orig_sample_rate": orig_sr,
        "orig_channels": audio.shape[0],
        "orig_seconds": audio.shape[1] / orig_sr,
    }
    return to_int16(fit_length(mono, clip_samples)), info


def fit_length(waveform: np.ndarray, length: int) -> np.ndarray:
    """Crop the tail, or append zeros, so a 1-D waveform has exactly `length` samples."""
    if len(waveform) >= length:
        return waveform[:length]
    return np.pad(waveform, (0, length - len(waveform)))


def to_int16(waveform: np.ndarray) -> np.ndarray:
    """Float audio to int16 at the decoders' scale (int16 / 32768), so 16-bit PCM round-trips exactly.

    +1.0 and overshoot clip to 32767, -1.0 is -32768.
    """
    return np.clip(np.round(waveform * 32768.0), -32768, 32767).astype(np.int16)


def _describe(source: Source) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes of encoded audio>"
    return str(source)


def _check_span(start: float | None, end: float | None) -> None:
    if start is not None and start < 0:
        raise ValueError(f"segment start must be >= 0, got {start}")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"segment end ({end}) must be after its start ({start})")


def _check_present(source: Source, name: str) -> None:
    if isinstance(source, bytes):
        if not source:
            raise AudioError("empty", f"{name}: no data; the stored audio is empty")
        return
    if not source.exists():
        raise AudioError("missing", f"{name}: file not found; check the path or download it")
    if not source.is_file():
        raise AudioError("missing", f"{name}: is a folder, not an audio file; check the manifest's path")
    if source.stat().st_size == 0:
        raise AudioError("empty", f"{name}: file is empty (0 bytes); the download probably failed")


def _open_binary(source: Source) -> BinaryIO:
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def _decoder_input(source: Source) -> str | io.BytesIO:
    return io.BytesIO(source) if isinstance(source, bytes) else str(source)


def _frame_at(seconds: float | None, sample_rate: int) -> int:
    return 0 if seconds is None else round(seconds * sample_rate)


def _span(total: int, start: float | None, end: float | None, sample_rate: int) -> tuple[int, int]:
    """Frames [first, stop) of the requested segment, clipped to a file of `total` frames."""
    first = min(_frame_at(start, sample_rate), total)
    stop = total if end is None else min(_frame_at(end, sample_rate), total)
    return first, stop


def _span_length(total: int, start: float | None, end: float | None, sample_rate: int) -> int:
    first, stop = _span(total, start, end, sample_rate)
    return stop - first


def _wav_declared_frames(source: Source) -> int | None:
    """Frames a PCM/float RIFF WAVE header promises, or None if not such a file or unknown.

    libsndfile hides a cut data chunk (it reports only the frames present), so
    the header's own data size is the only record of what should be there.
    """
    with _open_binary(source) as stream:
        riff = stream.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            return None
        format_tag = block_align = None
        while len(header := stream.read(8)) == 8:
            chunk_id, size = header[:4], int.from_bytes(header[4:], "little")
            if chunk_id == b"data":
                streaming = size in (0, 0xFFFFFFFF)  # writers that couldn't seek back leave these
                if format_tag not in _PCM_FORMAT_TAGS or not block_align or streaming:
                    return None
                return size // block_align
            body = stream.read(size + size % 2)
            if chunk_id == b"fmt " and len(body) >= 14:
                format_tag = int.from_bytes(body[0:2], "little")
                block_align = int.from_bytes(body[12:14], "little")
    return None


def _decode_soundfile(source: Source, start: float | None, end: float | None, declared: int | None) -> _Decoded:
    with sf.SoundFile(_decoder_input(source)) as f:
        sample_rate = f.samplerate
        first, stop = _span(f.frames if declared is None else declared, start, end, sample_rate)
        audio = _read_span(f, first, stop)
    return _Decoded(np.ascontiguousarray(audio.T), sample_rate, expected_frames=stop - first)


def _read_span(f: sf.SoundFile, first: int, stop: int) -> np.ndarray:
    """Frames [first, stop) as float32 (frames, channels), in one read call.

    Where libsndfile's seek is inexact, read from frame 0 and drop the head.
    One call, because libsndfile 1.2.2 glitches at read-call boundaries on
    some MP3s (those it wrote itself); the rewind, because on an Ogg Opus file
    from ffmpeg it applies the codec pre-skip only after a seek, so a read
    straight after opening comes out 312 samples late.
    """
    if f.format in _INEXACT_SEEK_FORMATS:
        f.seek(0)
        return f.read(stop, dtype="float32", always_2d=True)[first:]
    f.seek(min(first, f.frames))  # a cut WAV has fewer frames than its header declares
    return f.read(stop - first, dtype="float32", always_2d=True)


def _decode_pyav(source: Source, start: float | None, end: float | None, declared: int | None) -> _Decoded:
    """Decode with ffmpeg. Keeps the audio decoded before a mid-stream error, noting the error."""
    with av.open(_decoder_input(source)) as container:
        if not container.streams.audio:
            raise _NoAudioStream("no audio stream in the file")
        stream = container.streams.audio[0]
        seek_to = _pyav_seek(container, stream, start)
        chunks, sample_rate, origin, error = _pyav_collect(container, stream, seek_to, end)
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
    offset = round(origin * sample_rate)
    first = max(_frame_at(start, sample_rate) - offset, 0)
    stop = None if end is None else max(_frame_at(end, sample_rate) - offset, 0)
    expected = None if declared is None else _span_length(declared, start, end, sample_rate)
    return _Decoded(np.ascontiguousarray(audio[:, first:stop]), sample_rate, expected, error)


def _pyav_collect(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, seek_to: float, end: float | None
) -> tuple[list[np.ndarray], int, float, str | None]:
    """Decoded chunks up to `end`, their sample rate, the time of the first one, and any mid-stream error."""
    chunks, sample_rate, origin, decoded = [], stream.codec_context.sample_rate, seek_to, 0
    try:
        for frame in _pyav_float_frames(container, stream):
            if not chunks:
                sample_rate = frame.sample_rate
                origin = _pyav_frame_seconds(frame, stream, default=seek_to)
            chunks.append(frame.to_ndarray())
            decoded += frame.samples
            if end is not None and origin + decoded / sample_rate >= end:
                break
    except av.error.FFmpegError as exc:
        if not chunks:
            raise
        return chunks, sample_rate, origin, str(exc)
    return chunks, sample_rate, origin, None


def _pyav_seek(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, start: float | None
) -> float:
    """Seek near `start` (minus pre-roll) where timestamps are exact; returns where decoding starts."""
    target = (start or 0.0) - _PREROLL_SECONDS
    demuxers = set(container.format.name.split(","))
    if target <= 0 or not demuxers & _TIMESTAMPED_CONTAINERS:
        return 0.0
    origin = stream.start_time or 0
    container.seek(origin + int(target / stream.time_base), stream=stream, backward=True)
    return target


def _pyav_float_frames(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream
) -> Iterator[av.AudioFrame]:
    """Decoded frames converted to planar float32, keeping channel layout and rate."""
    converter = av.AudioResampler(format="fltp")
    for packet in container.demux(stream):
        for frame in packet.decode():
            yield from converter.resample(frame)
    yield from converter.resample(None)


def _pyav_frame_seconds(frame: av.AudioFrame, stream: av.audio.stream.AudioStream, default: float) -> float:
    """A frame's time on the decoded-audio timeline (stream start time, e.g. codec delay, removed)."""
    if frame.pts is None:
        return default
    return max(float((frame.pts - (stream.start_time or 0)) * stream.time_base), 0.0)


def _check_complete(decoded: _Decoded, name: str, start: float | None, end: float | None) -> None:
    """Raise truncated when the file promised more audio than could be decoded, empty when there is none."""
    got = decoded.audio.shape[1]
    if decoded.expected_frames is not None:
        missing = decoded.expected_frames - got
        if missing > max(TRUNCATION_TOLERANCE * decoded.expected_frames, TRUNCATION_MIN_FRAMES):
            raise AudioError(
                "truncated",
                f"{name}: header promises {decoded.expected_frames} frames but only {got} could be decoded; "
                "the file was cut short, re-download it",
            )
    elif decoded.error is not None:
        raise AudioError(
            "truncated",
            f"{name}: decoding stopped after {got / decoded.sample_rate:.2f} s ({decoded.error}); "
            "the file is cut short or damaged, re-download it",
        )
    if got == 0:
        span = "" if start is None and end is None else f" in segment [{start}, {end}) s"
        raise AudioError("empty", f"{name}: no audio{span}; check the file and the segment times")


def _validate(audio: np.ndarray, sample_rate: int, name: str, min_seconds: float, silence_threshold: float) -> None:
    """Reject decoded audio that would poison training: NaN/Inf, too little of it, or silence."""
    if not np.isfinite(audio).all():
        raise AudioError("nonfinite", f"{name}: contains NaN or infinite samples; re-export it as PCM")
    seconds = audio.shape[1] / sample_rate
    if seconds < min_seconds:
        raise AudioError("too_short", f"{name}: {seconds:.2f} s of audio, less than the minimum {min_seconds} s")
    peak = float(np.abs(audio).max())
    if peak < silence_threshold:
        raise AudioError(
            "silent", f"{name}: silent (peak amplitude {peak:.2g} < {silence_threshold}); check the recording"
        )
