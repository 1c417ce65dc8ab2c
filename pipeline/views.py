"""Augmented views of a clip in the waveform domain, reproducible anywhere (issue 15).

Consistent distillation (CED) runs the teachers on K augmented *views* of every
clip and trains the student, at epoch e, on view e mod K against that view's
stored target. That only works if the student's training loop rebuilds exactly
the audio the teachers saw, so a view here is a pure function of

    (store row, view index, view_seed, ViewAugment settings, sample rate, clip length)

and of nothing else: not the batch, its order or size, the process, the worker
or the device. Views are made on the waveform, before any frontend, so the
same augmented audio reaches every teacher's and every student's features
(PaSST/mn mel at 32 kHz, AST fbank at 16 kHz alike); CED's masks live on one
model's spectrogram, which kdpipe's mixed frontends cannot share.

Random parameters (`view_params`, host-side numpy). View v of row r draws
64-bit words from Philox4x64-10 with key (view_seed, r * 2**32 + v) and counter
0 (`numpy.random.Philox(key=...).random_raw`), each word w turned into
u = (w >> 11) * 2**-53, uniform in [0, 1). Word positions are fixed, so
switching one augmentation off (or adding masks) leaves the others unchanged:

    u[0]         shift = floor(u * (2m + 1)) - m samples, m = round(shift_s * rate)
    u[1]         gain_db = (2u - 1) * gain_db
    u[2], u[3]   band-limited when u[2] < lowpass_p, at lo + u[3] * (hi - lo) Hz
    u[4 + 2j]    mask j length = floor(u * (L + 1)) samples, L = min(round(time_mask_s * rate), n)
    u[5 + 2j]    mask j start = floor(u * (n - length + 1))

Only float64 multiplies, adds and floors enter (IEEE: the same on every
machine), so the parameters are identical everywhere; they are small arrays,
fit to store or log. The one libm call, the gain factor 10 ** (gain_db / 20),
is rounded to float32, which hides the last-bit differences between C libraries.

Applying (`apply_views`), in this order, to float32 waveforms in [-1, 1]:
1. shift by `shift` samples (positive: later in time), rolled around the
   clip end (`roll=True`, CED's and EfficientAT's choice) or zero-filled;
2. band-limiting: every rfft bin at or above the cutoff is zeroed (a brick-wall
   low-pass, the waveform stand-in for masking the top mel bands);
3. gain: multiplied by the float32 factor, not clipped (the frontends take floats);
4. time masks: the spans [start, start + length) set to exactly 0.
View index CLEAN (-1) is the clean clip: every step is the identity, so the
output equals the input bit for bit and callers can mix clean and augmented rows.

Determinism: shift, gain and masks are copies, one float32 multiply per sample
and stores, exact on every device. The FFT is taken per row, because a batched
FFT differs from a single-row one in the last bits (measured with torch 2.11
on CPU for n = 16000 and 320000). On CPU it runs in numpy's pocketfft rather
than torch.fft: torch's CPU FFT (MKL) also changes its last bits with the
intra-op thread count (measured at n = 16000, 1 against 2 threads), which
differs between the extraction workers and the training process.
On CUDA it is torch.fft (cuFFT), one row at a time. Hence: on one device type a
clip's view is bit-identical whatever batch it sits in; across device types
(CPU and CUDA, or two GPU generations) views agree to float32 rounding
(about 1e-6 of the signal) where band-limited, and exactly elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.view_plan import ViewAugment

CLEAN = -1  # the view index of the clean, unaugmented clip

_FIXED_WORDS = 4  # shift, gain, band-limit on/off, cutoff; then two words per time mask


@dataclass(frozen=True, eq=False)
class ViewParams:
    """The drawn parameters of a batch of views, one entry per (row, view)."""

    rows: np.ndarray  # (B,) int64 store rows
    views: np.ndarray  # (B,) int64 view indexes, CLEAN for the clean clip
    shift: np.ndarray  # (B,) int64 samples, positive moves the audio later
    gain_db: np.ndarray  # (B,) float64
    cutoff_hz: np.ndarray  # (B,) float64, inf where not band-limited
    mask_start: np.ndarray  # (B, time_masks) int64 samples
    mask_length: np.ndarray  # (B, time_masks) int64 samples, 0: no span
    sample_rate: int
    n_samples: int
    roll: bool

    @property
    def gain(self) -> np.ndarray:
        """(B,) float32 amplitude factors, 10 ** (gain_db / 20) rounded once to float32."""
        return (10.0 ** (self.gain_db / 20.0)).astype(np.float32)

    @property
    def kept_bins(self) -> np.ndarray:
        """(B,) int64 rfft bins kept, those below the cutoff (n // 2 + 1 where not band-limited)."""
        all_bins = self.n_samples // 2 + 1
        below = np.ceil(np.minimum(self.cutoff_hz, self.sample_rate) * self.n_samples / self.sample_rate)
        return np.minimum(below, all_bins).astype(np.int64)


def _uniforms(view_seed: int, row: int, view: int, count: int) -> np.ndarray:
    """The first `count` uniforms of one view's counter-based stream (see the module docstring)."""
    key = np.array([view_seed, (row << 32) | view], dtype=np.uint64)
    words = np.random.Philox(key=key).random_raw(count)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def view_params(rows: np.ndarray | list[int], views: np.ndarray | list[int] | int, view_seed: int,
                augment: ViewAugment, sample_rate: int, n_samples: int) -> ViewParams:
    """Parameters of the views (rows[i], views[i]) of clips of n_samples at sample_rate.

    `views` may be one index for every row. Rows are waveform-store rows, views
    0 <= v < 2**32 or CLEAN, view_seed 0 <= seed < 2**64.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    views = np.broadcast_to(np.asarray(views, dtype=np.int64), rows.shape)
    if rows.size and (rows.min() < 0 or rows.max() >= 2 ** 32):
        raise ValueError("rows must be in [0, 2**32)")
    if views.size and (views.min() < CLEAN or views.max() >= 2 ** 32):
        raise ValueError(f"views must be in [0, 2**32) or CLEAN ({CLEAN})")
    if not 0 <= view_seed < 2 ** 64:
        raise ValueError(f"view_seed must be in [0, 2**64), got {view_seed}")
    if sample_rate <= 0 or n_samples <= 0:
        raise ValueError("sample_rate and n_samples must be positive")

    n_words = _FIXED_WORDS + 2 * augment.time_masks
    u = np.zeros((rows.size, n_words))
    augmented = views != CLEAN
    for i in np.flatnonzero(augmented):
        u[i] = _uniforms(view_seed, int(rows[i]), int(views[i]), n_words)

    max_shift = round(augment.shift_s * sample_rate)
    shift = np.floor(u[:, 0] * (2 * max_shift + 1)).astype(np.int64) - max_shift
    gain_db = (2.0 * u[:, 1] - 1.0) * augment.gain_db
    low, high = augment.lowpass_hz
    band_limited = augmented & (u[:, 2] < augment.lowpass_p)
    cutoff_hz = np.where(band_limited, low + u[:, 3] * (high - low), np.inf)
    max_length = min(round(augment.time_mask_s * sample_rate), n_samples)
    mask_length = np.floor(u[:, _FIXED_WORDS::2] * (max_length + 1)).astype(np.int64)
    mask_start = np.floor(u[:, _FIXED_WORDS + 1::2] * (n_samples - mask_length + 1)).astype(np.int64)

    clean = ~augmented
    shift[clean] = 0
    gain_db[clean] = 0.0
    mask_start[clean] = 0
    mask_length[clean] = 0
    return ViewParams(rows=rows, views=views.copy(), shift=shift, gain_db=gain_db, cutoff_hz=cutoff_hz,
                      mask_start=mask_start, mask_length=mask_length, sample_rate=sample_rate,
                      n_samples=n_samples, roll=augment.roll)


def _shifted(row: torch.Tensor, shift: int, roll: bool) -> torch.Tensor:
    """One clip moved by `shift` samples, rolled around or zero-filled."""
    if roll:
        return torch.roll(row, shift)
    n = row.shape[0]
    out = torch.zeros_like(row)
    if abs(shift) < n:
        if shift > 0:
            out[shift:] = row[:n - shift]
        else:
            out[:n + shift] = row[-shift:]
    return out


def _low_passed(row: torch.Tensor, kept_bins: int) -> torch.Tensor:
    """One clip with every rfft bin from `kept_bins` on zeroed (numpy on CPU, see the module docstring)."""
    n = row.shape[0]
    if row.device.type == "cpu":
        spectrum = np.fft.rfft(row.detach().numpy())
        spectrum[kept_bins:] = 0
        return torch.from_numpy(np.fft.irfft(spectrum, n=n).astype(np.float32, copy=False))
    spectrum = torch.fft.rfft(row)
    spectrum[kept_bins:] = 0
    return torch.fft.irfft(spectrum, n=n)


def apply_views(waves: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """The views `params` describes of (B, n_samples) float32 clips, on the clips' device.

    Returns a new float32 tensor of the same shape; `waves` is not modified.
    """
    if waves.dtype != torch.float32:
        raise ValueError(f"waves must be float32 (int16 clips / 32768), got {waves.dtype}")
    if tuple(waves.shape) != (params.rows.size, params.n_samples):
        raise ValueError(f"waves have shape {tuple(waves.shape)}, "
                         f"the parameters describe {(params.rows.size, params.n_samples)}")
    out = waves.clone()
    all_bins = params.n_samples // 2 + 1
    kept_bins = params.kept_bins
    for i in range(params.rows.size):
        if params.shift[i]:
            out[i] = _shifted(out[i], int(params.shift[i]), params.roll)
        if kept_bins[i] < all_bins:
            out[i] = _low_passed(out[i], int(kept_bins[i]))
    out.mul_(torch.from_numpy(params.gain).to(out.device)[:, None])
    for i, j in zip(*np.nonzero(params.mask_length)):
        start = int(params.mask_start[i, j])
        out[i, start:start + int(params.mask_length[i, j])] = 0.0
    return out
