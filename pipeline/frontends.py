"""Signal-processing front ends: the only module in kdpipe allowed to import torchaudio.

torchaudio 2.11 is its final release, so it will have to be replaced (by
hand-written torch code or another library) while kdpipe lives on. Every
torchaudio call therefore sits here, behind a numpy-in, numpy-out resampler for
the waveform store and torch modules (tensor in, tensor out) for model inputs,
and replacing torchaudio must stay a one-file change: do not import it anywhere
else.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _torchaudio() -> SimpleNamespace:
    """torchaudio's modules, imported on first use rather than with this module.

    A torchaudio build that does not match torch fails as it is imported; importing it here
    stops only the commands that compute features, and the CLI names the mismatch
    (kdpipe.torch_stack), while --help, config show and status keep working.
    """
    import torchaudio.compliance.kaldi
    import torchaudio.functional
    import torchaudio.transforms

    return SimpleNamespace(kaldi=torchaudio.compliance.kaldi, functional=torchaudio.functional,
                           transforms=torchaudio.transforms)

# Windowed-sinc resampling with a Kaiser window (beta 14.77, torchaudio's Kaiser
# default), close to resampy's "kaiser_best". Rolloff 0.945 puts the cutoff (the -6 dB
# point) at 94.5 % of the lower Nyquist frequency (15.1 kHz for 32 kHz output). With 64
# zero crossings the transition band is narrow enough that, 44.1 -> 32 kHz, the
# passband is flat to 14 kHz and tones from 16.5 kHz up (which would alias) are
# attenuated by ~105 dB; 16 zero crossings only gave ~19 dB there. Cost measured
# on one CPU core: ~12 ms per 10 s clip from 44.1 or 48 kHz.
RESAMPLING_METHOD = "sinc_interp_kaiser"
LOWPASS_FILTER_WIDTH = 64
ROLLOFF = 0.945
KAISER_BETA = 14.769656459379492


def resample(waveform: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling of (frames,) or (channels, frames) float32 audio.

    Returns the input itself (no copy) when the rates already match. The output
    has ceil(frames * new_sr / orig_sr) frames.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    if orig_sr == new_sr:
        return waveform
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    tensor = torch.from_numpy(np.ascontiguousarray(waveform))
    out = _torchaudio().functional.resample(
        tensor,
        orig_sr,
        new_sr,
        lowpass_filter_width=LOWPASS_FILTER_WIDTH,
        rolloff=ROLLOFF,
        resampling_method=RESAMPLING_METHOD,
        beta=KAISER_BETA,
    )
    return out.numpy()


# --------------------------------------------------------------------------------------
# Model-input frontends. They run batched on the training/inference device, always in
# fp32 with autocast off: the log of small mel energies is badly rounded in fp16/bf16,
# and the reference frontends (PaSST/EfficientAT, AST) compute their features in fp32.
# --------------------------------------------------------------------------------------


CPU_SUB_BATCH = 4


def int16_to_float(waves: torch.Tensor) -> torch.Tensor:
    """Stored int16 waveforms as the float input frontends take, at the decoders' scale
    (int16 / 32768, the inverse of `audio_io.to_int16`), so stored and decoded audio give the same features."""
    return waves.float() / 32768.0


class _Fp32Frontend(nn.Module):
    """Base: (batch, samples) float waveforms in, features out, computed in fp32."""

    sample_rate: int

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if waveforms.dim() != 2:
            raise ValueError(f"expected (batch, samples) waveforms, got shape {tuple(waveforms.shape)}")
        with torch.autocast(waveforms.device.type, enabled=False):
            # Not while exporting or tracing: reading the batch size would fix it in the exported graph.
            exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()
            if not exporting and waveforms.device.type == "cpu" and len(waveforms) > CPU_SUB_BATCH:
                # Elementwise passes over a large batch leave the CPU caches: small pieces run ~1.7x faster.
                return torch.cat([self.compute(part.float()) for part in waveforms.split(CPU_SUB_BATCH)])
            return self.compute(waveforms.float())

    def compute(self, waveforms: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def num_frames(self, num_samples: int) -> int:
        """Time frames produced for a clip of num_samples samples at self.sample_rate."""
        raise NotImplementedError


class Resample(_Fp32Frontend):
    """On-device resampling with the same filter as resample(), for models whose rate differs from the store's.

    The filter kernel is computed once, in fp32 like torchaudio's resample computes it for fp32 input (so the
    output is bit-identical), and kept as a buffer: no per-batch recomputation, and an exported graph
    holds a constant kernel (ONNX has no Bessel function to build the Kaiser window with).
    """

    def __init__(self, orig_sr: int, new_sr: int):
        super().__init__()
        self.orig_sr, self.sample_rate = orig_sr, new_sr
        self.resampler = _torchaudio().transforms.Resample(
            orig_sr,
            new_sr,
            resampling_method=RESAMPLING_METHOD,
            lowpass_filter_width=LOWPASS_FILTER_WIDTH,
            rolloff=ROLLOFF,
            beta=KAISER_BETA,
            dtype=torch.float32,
        )
        # Derived from the rates like every frontend buffer here, so kept out of state dicts.
        self.resampler.register_buffer("kernel", self.resampler.kernel, persistent=False)

    def compute(self, waveforms: torch.Tensor) -> torch.Tensor:
        return self.resampler(waveforms)


PREEMPHASIS = 0.97


class _PowerSpectrogram(nn.Module):
    """Pre-emphasis then |STFT|^2, as EfficientAT/PaSST's AugmentMelSTFT computes it.

    Pre-emphasis is a valid conv with kernel [-0.97, 1] (y[n] = x[n+1] - 0.97 x[n]), so the
    signal loses one sample and a 10 s clip at hop 320 gives 1000 frames, not 1001: the frame
    count the pretrained EfficientAT/PaSST models saw. The symmetric Hann window of win_length
    is zero-padded to n_fft by torch.stft (centred), with reflect padding at the clip edges.
    """

    def __init__(self, n_fft: int, win_length: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(win_length, periodic=False), persistent=False)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, samples) fp32 -> (batch, n_fft // 2 + 1, frames) power."""
        # The same valid 2-tap filter as a slice difference: a conv1d over 320 k samples is ~10x slower on CPUs.
        x = waveforms[:, 1:] - PREEMPHASIS * waveforms[:, :-1]
        spec = torch.stft(
            x,
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.window.numel(),
            window=self.window.to(x.device),
            center=True,
            pad_mode="reflect",
            normalized=False,
            return_complex=True,
        )
        return spec.real.square() + spec.imag.square()

    def num_frames(self, num_samples: int) -> int:
        return 1 + (num_samples - 1) // self.hop_length


def kaldi_mel_banks(n_mels: int, n_fft: int, sample_rate: int, fmin: float, fmax: float) -> torch.Tensor:
    """Kaldi mel triangles (peak 1, no area normalisation), (n_mels, n_fft // 2 + 1).

    Kaldi builds n_fft // 2 columns; the Nyquist column is appended as zeros, as both
    EfficientAT/PaSST and Kaldi's own fbank do. No VTLN warping (factor 1).
    """
    banks, _ = _torchaudio().kaldi.get_mel_banks(n_mels, n_fft, float(sample_rate), float(fmin), float(fmax),
                                                 100.0, -500.0, 1.0)
    return F.pad(banks, (0, 1))


class MelFrontend(_Fp32Frontend):
    """EfficientAT/PaSST AugmentMelSTFT: the input of PaSST teachers and MobileNet students.

    Output (batch, 1, n_mels, frames) = (log(mel + 1e-5) + 4.5) / 5. In training mode the mel
    range is jittered once per batch (fmin + U{0..fmin_aug_range-1}, fmax + U{-r/2+1..r/2}
    for r = fmax_aug_range) and optional iid SpecAugment masks of up to freqm bins / timem
    frames are drawn per clip (0 = off, the EfficientAT default). Eval mode uses fmin and
    fmax exactly (0 and 15 kHz by default) and is deterministic.
    """

    def __init__(
        self,
        sample_rate: int = 32000,
        n_mels: int = 128,
        n_fft: int = 1024,
        win_length: int = 800,
        hop_length: int = 320,
        fmin: float = 0.0,
        fmax: float | None = None,
        fmin_aug_range: int = 10,
        fmax_aug_range: int = 2000,
        freqm: int = 0,
        timem: int = 0,
    ):
        super().__init__()
        # Default fmax leaves room for the upward jitter below Nyquist: 15 kHz at 32 kHz.
        fmax = sample_rate // 2 - fmax_aug_range // 2 if fmax is None else fmax
        if fmax + fmax_aug_range // 2 > sample_rate / 2:
            raise ValueError(f"fmax {fmax} + fmax_aug_range/2 exceeds Nyquist ({sample_rate / 2} Hz)")
        self.sample_rate, self.n_mels, self.n_fft = sample_rate, n_mels, n_fft
        self.fmin, self.fmax = fmin, fmax
        self.fmin_aug_range, self.fmax_aug_range = fmin_aug_range, fmax_aug_range
        self.freqm, self.timem = freqm, timem
        self.spectrogram = _PowerSpectrogram(n_fft, win_length, hop_length)
        self.register_buffer("mel_banks", kaldi_mel_banks(n_mels, n_fft, sample_rate, fmin, fmax), persistent=False)

    def _banks(self) -> torch.Tensor:
        if not self.training:
            return self.mel_banks
        fmin = self.fmin + (int(torch.randint(self.fmin_aug_range, ())) if self.fmin_aug_range else 0)
        fmax = self.fmax + (
            self.fmax_aug_range // 2 - int(torch.randint(self.fmax_aug_range, ())) if self.fmax_aug_range else 0
        )
        return kaldi_mel_banks(self.n_mels, self.n_fft, self.sample_rate, fmin, fmax)

    def compute(self, waveforms: torch.Tensor) -> torch.Tensor:
        power = self.spectrogram(waveforms)
        mel = torch.matmul(self._banks().to(power.device), power)
        logmel = torch.log(mel + 1e-5).unsqueeze(1)
        if self.training:
            logmel = _torchaudio().functional.mask_along_axis_iid(logmel, self.freqm, 0.0, axis=2)
            logmel = _torchaudio().functional.mask_along_axis_iid(logmel, self.timem, 0.0, axis=3)
        return (logmel + 4.5) / 5.0

    def num_frames(self, num_samples: int) -> int:
        return self.spectrogram.num_frames(num_samples)


class MfccFrontend(MelFrontend):
    """MFCCs for multi-representation KD: orthonormal DCT-II of MelFrontend's output.

    The DCT is orthonormal, so with n_mfcc == n_mels it preserves each frame's energy and the
    coefficients stay on the normalised log-mel scale without dataset statistics. Training-mode
    jitter and masks are MelFrontend's. Output (batch, 1, n_mfcc, frames).
    """

    def __init__(self, n_mfcc: int = 40, **mel_options: Any):
        super().__init__(**mel_options)
        if not 0 < n_mfcc <= self.n_mels:
            raise ValueError(f"n_mfcc must be in 1..n_mels ({self.n_mels}), got {n_mfcc}")
        dct = _torchaudio().functional.create_dct(n_mfcc, self.n_mels, "ortho").T.contiguous()
        self.register_buffer("dct", dct, persistent=False)

    def compute(self, waveforms: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.dct.to(waveforms.device), super().compute(waveforms))


class LogStftFrontend(_Fp32Frontend):
    """Log linear-frequency power spectrogram for multi-representation KD.

    Same pre-emphasis, window, hop and frame count as MelFrontend (1000 frames for 10 s), and
    the same log offset and (x + 4.5) / 5 scaling. n_bins pools the n_fft // 2 + 1 bins
    (513) by averaging power over adjacent bins; None keeps them all.
    Output (batch, 1, bins, frames).
    """

    def __init__(
        self,
        sample_rate: int = 32000,
        n_fft: int = 1024,
        win_length: int = 800,
        hop_length: int = 320,
        n_bins: int | None = None,
    ):
        super().__init__()
        self.sample_rate, self.n_bins = sample_rate, n_bins
        self.spectrogram = _PowerSpectrogram(n_fft, win_length, hop_length)

    def compute(self, waveforms: torch.Tensor) -> torch.Tensor:
        power = self.spectrogram(waveforms)
        if self.n_bins is not None:
            power = F.adaptive_avg_pool1d(power.transpose(1, 2), self.n_bins).transpose(1, 2)
        return ((torch.log(power + 1e-5) + 4.5) / 5.0).unsqueeze(1)

    def num_frames(self, num_samples: int) -> int:
        return self.spectrogram.num_frames(num_samples)


# AST's AudioSet log-fbank statistics (AudioMAE and EAT reuse them). AST divides by twice
# the std, so its divisor is 2 * 4.5689974 = 9.1379948.
AST_NORM_MEAN = -4.2677393
AST_NORM_STD = 2 * 4.5689974


class FbankFrontend(_Fp32Frontend):
    """AST's input: Kaldi log-mel fbank at 16 kHz, padded to the model's input length, normalised.

    Equals, per clip, torchaudio.compliance.kaldi.fbank(x - x.mean(), htk_compat=True,
    sample_frequency=sample_rate, use_energy=False, window_type="hanning", num_mel_bins=n_mels,
    dither=0.0, frame_shift=10), vectorised over the batch: 25 ms frames every 10 ms (snip
    edges), per-frame DC removal, pre-emphasis 0.97 inside each frame, symmetric Hann, zero
    padding to a power-of-two FFT, power, Kaldi mel banks 20 Hz..Nyquist, log floored at
    float32 eps. (htk_compat only moves the energy column, which is off.) The waveform mean is
    removed per clip as AST's training dataloader does. Frames are zero-padded at the end (in
    the log domain, before normalisation) up to target_frames, then normalised as
    (x - norm_mean) / norm_std. norm_std is the divisor itself: AST's factor 2 is already in
    the default (2 * 4.5689974); teachers without it (PSLA, CAV-MAE) pass their std as is.

    Longer clips are never cropped (AST's dataloader would cut them silently): their frames all
    come out, and kdpipe.models.windowing covers them with windows of the model's input.

    Output (batch, 1, n_mels, max(target_frames, frames)): frequency before time. AST's dataloader yields
    (time, freq) and its forward transposes to (1, freq, time) before the patch conv; this
    frontend emits that post-transpose layout, so an AST teacher fed from here must skip the
    transpose.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mels: int = 128,
        target_frames: int = 1024,
        norm_mean: float = AST_NORM_MEAN,
        norm_std: float = AST_NORM_STD,
    ):
        super().__init__()
        self.sample_rate, self.target_frames = sample_rate, target_frames
        self.norm_mean, self.norm_std = norm_mean, norm_std
        self.frame_length = int(sample_rate * 0.025)
        self.frame_shift = int(sample_rate * 0.010)
        self.n_fft = 1 << (self.frame_length - 1).bit_length()
        self.register_buffer("window", torch.hann_window(self.frame_length, periodic=False), persistent=False)
        self.register_buffer(
            "mel_banks", kaldi_mel_banks(n_mels, self.n_fft, sample_rate, 20.0, 0.0), persistent=False
        )

    def compute(self, waveforms: torch.Tensor) -> torch.Tensor:
        x = waveforms - waveforms.mean(dim=1, keepdim=True)
        frames = x.unfold(1, self.frame_length, self.frame_shift)  # (batch, frames, frame_length)
        frames = frames - frames.mean(dim=2, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=2)
        frames = (frames - 0.97 * previous) * self.window.to(x.device)
        power = torch.fft.rfft(frames, n=self.n_fft).abs().pow(2)
        mel = torch.matmul(power, self.mel_banks.to(x.device).T)
        fbank = mel.clamp_min(torch.finfo(torch.float32).eps).log()  # (batch, frames, n_mels)
        fbank = F.pad(fbank, (0, 0, 0, max(0, self.target_frames - fbank.shape[1])))
        return ((fbank - self.norm_mean) / self.norm_std).transpose(1, 2).unsqueeze(1)

    def num_frames(self, num_samples: int) -> int:
        natural = 1 + (num_samples - self.frame_length) // self.frame_shift if num_samples >= self.frame_length else 0
        return max(self.target_frames, natural)


FRONTENDS: dict[str, type[_Fp32Frontend]] = {
    "mel": MelFrontend,
    "fbank": FbankFrontend,
    "mfcc": MfccFrontend,
    "stft": LogStftFrontend,
}


def _frontend(config: dict[str, Any]) -> _Fp32Frontend:
    options = dict(config)
    kind = options.pop("kind", None)
    if kind not in FRONTENDS:
        raise ValueError(f"unknown frontend kind {kind!r}; expected one of {sorted(FRONTENDS)}")
    try:
        return FRONTENDS[kind](**options)
    except TypeError as error:  # an option the frontend does not take
        raise ValueError(f"bad options for frontend kind {kind!r}: {error}") from error


def build_frontend(config: dict[str, Any], input_sample_rate: int) -> nn.Module:
    """The module that turns store-rate waveforms into a model's input, from its frontend_config.

    config: {"kind": "mel" | "fbank" | "mfcc" | "stft", plus that frontend's constructor
    options, e.g. "sample_rate", "n_mels", "target_frames", "norm_mean", "norm_std"}. When the
    frontend's sample_rate differs from input_sample_rate, on-device resampling runs first.
    """
    frontend = _frontend(config)
    if frontend.sample_rate == input_sample_rate:
        return frontend
    return nn.Sequential(Resample(input_sample_rate, frontend.sample_rate), frontend)


def frames_for(seconds: float, config: dict[str, Any]) -> int:
    """Time frames the frontend of config produces for a clip of this length (sizes models)."""
    frontend = _frontend(config)
    return frontend.num_frames(round(seconds * frontend.sample_rate))


REPRESENTATIONS = ("mel", "mfcc", "stft")


def representation_config(base: dict[str, Any], representation: str) -> dict[str, Any]:
    """A model's frontend config turned into another representation of the same shape.

    MFCC keeps n_mels coefficients and the STFT is pooled to n_mels bins, so every
    representation fits the same architecture (multi-representation students).
    """
    if base.get("kind") != "mel":
        raise ValueError(f"representations derive from a mel frontend; this model's is {base.get('kind')!r}")
    if representation == "mel":
        return dict(base)
    if representation == "mfcc":
        return {**base, "kind": "mfcc", "n_mfcc": base.get("n_mels", 128)}
    if representation == "stft":
        shared = {key: base[key] for key in ("sample_rate", "n_fft", "win_length", "hop_length") if key in base}
        return {"kind": "stft", **shared, "n_bins": base.get("n_mels", 128)}
    raise ValueError(f"unknown representation {representation!r}; expected one of {REPRESENTATIONS}")
