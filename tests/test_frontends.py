"""Model-input frontends (kdpipe.frontends): shapes, independent recomputation, dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from kdpipe import frontends
from kdpipe.audio_io import to_int16
from kdpipe.frontends import (
    FbankFrontend,
    LogStftFrontend,
    MelFrontend,
    MfccFrontend,
    build_frontend,
    frames_for,
    int16_to_float,
)


def clips(batch: int, seconds: float, sr: int, seed: int = 0) -> torch.Tensor:
    """Noise plus a tone: broadband, so every mel band and frame carries energy."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    x = 0.1 * rng.standard_normal((batch, t.size)) + 0.3 * np.sin(2 * np.pi * 440 * t)
    return torch.from_numpy(x.astype(np.float32))


def test_int16_to_float_inverts_the_decoders_scale():
    """Stored int16 reads back at audio_io.to_int16's scale: exact for 16-bit values, -32768 is -1.0."""
    audio = np.array([0.0, 0.5, -1.0, 1000 / 32768, 32767 / 32768], np.float32)
    back = int16_to_float(torch.from_numpy(to_int16(audio)))
    assert back.dtype == torch.float32
    np.testing.assert_array_equal(back.numpy(), audio)


@pytest.fixture(scope="module")
def ten_seconds() -> torch.Tensor:
    return clips(2, 10.0, 32000)


@pytest.fixture(scope="module")
def mel_eval(ten_seconds) -> torch.Tensor:
    return MelFrontend().eval()(ten_seconds)


def test_mel_shape_and_frame_count(mel_eval):
    # Pre-emphasis drops one sample, so 10 s at hop 320 gives 1000 frames, not 1001.
    assert mel_eval.shape == (2, 1, 128, 1000) and mel_eval.dtype == torch.float32
    assert frames_for(10.0, {"kind": "mel"}) == 1000


def test_mel_banks_are_kaldi_banks_with_a_zero_nyquist_column():
    banks, _ = kaldi.get_mel_banks(128, 1024, 32000.0, 0.0, 15000.0, 100.0, -500.0, 1.0)
    expected = torch.cat([banks, torch.zeros(128, 1)], dim=1)
    torch.testing.assert_close(MelFrontend().mel_banks, expected, rtol=0, atol=0)


def test_mel_matches_an_independent_numpy_computation(ten_seconds, mel_eval):
    x = ten_seconds[0].double().numpy()
    y = x[1:] - 0.97 * x[:-1]
    y = np.pad(y, 512, mode="reflect")
    n_frames = 1 + (y.size - 1024) // 320
    window = np.zeros(1024)
    window[112:912] = np.hanning(800)  # symmetric Hann, centred in the FFT frame
    frames = np.stack([y[i * 320 : i * 320 + 1024] for i in range(n_frames)]) * window
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    banks = MelFrontend().mel_banks.double().numpy()
    expected = (np.log(power @ banks.T + 1e-5) + 4.5) / 5
    assert n_frames == 1000
    np.testing.assert_allclose(mel_eval[0, 0].numpy(), expected.T, atol=2e-4)


def test_mel_train_mode_jitters_and_eval_is_deterministic(ten_seconds, mel_eval):
    frontend = MelFrontend()
    torch.testing.assert_close(frontend.eval()(ten_seconds), mel_eval, rtol=0, atol=0)
    torch.manual_seed(0)
    trained = [frontend.train()(ten_seconds) for _ in range(3)]
    assert trained[0].shape == mel_eval.shape
    assert any(not torch.equal(t, mel_eval) for t in trained)


def test_mel_train_masks_are_drawn_per_clip():
    x = clips(1, 2.0, 32000).repeat(8, 1)
    torch.manual_seed(0)
    out = MelFrontend(fmin_aug_range=0, fmax_aug_range=0, freqm=48, timem=50).train()(x)
    masked = out == 0.9  # masks write 0 in the log domain: (0 + 4.5) / 5
    assert masked.any() and not torch.equal(masked[0], masked[1])


def test_mel_is_fp32_under_autocast(ten_seconds, mel_eval):
    frontend = MelFrontend().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = frontend(ten_seconds)
        from_bf16 = frontend(ten_seconds.bfloat16())
    assert out.dtype == from_bf16.dtype == torch.float32
    torch.testing.assert_close(out, mel_eval, rtol=0, atol=0)


def ast_reference(clip: torch.Tensor, target_frames: int = 1024) -> torch.Tensor:
    """AST's dataloader, written out: kaldi.fbank of the mean-removed clip, pad/crop, normalise."""
    fbank = kaldi.fbank(
        (clip - clip.mean()).unsqueeze(0),
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max(0, target_frames - fbank.shape[0])))[:target_frames]
    return ((fbank + 4.2677393) / (4.5689974 * 2)).T


def test_fbank_equals_kaldi_fbank_with_ast_normalisation():
    x = clips(2, 10.0, 16000, seed=1)
    out = FbankFrontend()(x)
    assert out.shape == (2, 1, 128, 1024)
    for i in range(2):
        torch.testing.assert_close(out[i, 0], ast_reference(x[i]), rtol=0, atol=1e-4)
    # 10 s gives 998 frames; the last 26 are zero log-fbank, i.e. +0.467 after normalisation.
    torch.testing.assert_close(out[0, 0, :, 998:], torch.full((128, 26), 4.2677393 / 9.1379948))


def test_fbank_pads_to_target_frames_and_never_crops():
    short, long = clips(1, 2.0, 16000), clips(1, 12.0, 16000)
    assert FbankFrontend(target_frames=100)(short).shape == (1, 1, 128, 198)
    padded = FbankFrontend()(short)
    assert padded.shape == (1, 1, 128, 1024)
    torch.testing.assert_close(padded[0, 0], ast_reference(short[0]), rtol=0, atol=1e-4)
    whole = FbankFrontend()(long)  # 12 s: 1198 frames, more than AST's 1024, all kept
    assert whole.shape == (1, 1, 128, 1198)
    torch.testing.assert_close(whole[0, 0], ast_reference(long[0], target_frames=1198), rtol=0, atol=1e-4)
    assert frames_for(10.0, {"kind": "fbank", "target_frames": 1056}) == 1056
    assert frames_for(12.0, {"kind": "fbank", "target_frames": 1024}) == 1198


def test_fbank_from_32k_store_resamples_on_device_like_the_store():
    x = clips(2, 4.0, 32000)
    frontend = build_frontend({"kind": "fbank", "sample_rate": 16000}, input_sample_rate=32000)
    assert isinstance(frontend, torch.nn.Sequential)
    resampled = torch.from_numpy(frontends.resample(x.numpy(), 32000, 16000))
    assert resampled.shape == (2, 64000)
    torch.testing.assert_close(frontend(x), FbankFrontend()(resampled), rtol=0, atol=1e-4)


def test_mfcc_shape_and_orthonormal_dct_keeps_frame_energy():
    x = clips(2, 2.0, 32000)
    assert MfccFrontend()(x).shape == (2, 1, 40, 200)
    mel = MelFrontend().eval()(x)
    mfcc = MfccFrontend(n_mfcc=128).eval()(x)
    torch.testing.assert_close(mfcc.norm(dim=2), mel.norm(dim=2), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="n_mfcc"):
        MfccFrontend(n_mfcc=129)


def test_log_stft_shape_and_tone_peak():
    sr, freq = 32000, 3000.0  # bin 3000 * 1024 / 32000 = 96
    t = torch.arange(2 * sr) / sr
    tone = torch.sin(2 * torch.pi * freq * t).unsqueeze(0)
    out = LogStftFrontend()(tone)
    assert out.shape == (1, 1, 513, 200)
    assert (out[0, 0, :, 5:-5].argmax(dim=0) == 96).all()
    assert LogStftFrontend(n_bins=128)(tone).shape == (1, 1, 128, 200)


def test_build_frontend_dispatch_and_errors():
    passt = {"kind": "mel", "sample_rate": 32000, "n_mels": 128, "hop_length": 320}
    assert isinstance(build_frontend(passt, 32000), MelFrontend)
    ast = {"kind": "fbank", "sample_rate": 16000, "n_mels": 128, "target_frames": 1024,
           "norm_mean": -4.2677393, "norm_std": 2 * 4.5689974}  # norm_std is the divisor
    fbank = build_frontend(ast, 16000)
    assert isinstance(fbank, FbankFrontend) and fbank.norm_std == FbankFrontend().norm_std
    assert isinstance(build_frontend({"kind": "mfcc", "n_mfcc": 20}, 32000), MfccFrontend)
    assert isinstance(build_frontend({"kind": "stft", "n_bins": 256}, 32000), LogStftFrontend)
    mel_at_16k = build_frontend({"kind": "mel", "sample_rate": 16000, "fmax": 7000}, 32000)
    assert mel_at_16k(clips(1, 1.0, 32000)).shape == (1, 1, 128, 50)
    with pytest.raises(ValueError, match="unknown frontend kind 'cqt'"):
        build_frontend({"kind": "cqt"}, 32000)
    with pytest.raises(ValueError, match="unknown frontend kind None"):
        frames_for(10.0, {})
    with pytest.raises(ValueError, match="n_mels"):
        build_frontend({"kind": "stft", "n_mels": 128}, 32000)
    with pytest.raises(ValueError, match="Nyquist"):
        MelFrontend(fmax=16000)
    with pytest.raises(ValueError, match="batch, samples"):
        MelFrontend()(torch.zeros(32000))
