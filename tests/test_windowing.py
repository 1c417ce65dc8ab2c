"""Clips longer than a model's input are covered whole, the same way in training, extraction and predict."""

import numpy as np
import torch
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.extraction import Teacher, TeacherSpec
from kdpipe.frontends import build_frontend
from kdpipe.models import create_model
from kdpipe.models.windowing import clip_forward

STORE_RATE = 32000


def ast_teacher(tmp_path) -> tuple[torch.nn.Module, Teacher]:
    torch.manual_seed(0)
    model = create_model("ast_tiny", num_classes=6).eval()
    checkpoint = tmp_path / "ast_tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    spec = TeacherSpec("ast_tiny", "ast_tiny", (checkpoint,), {"num_classes": 6}, precision="fp32")
    return model, Teacher(spec, STORE_RATE, torch.device("cpu"), batch_size=4)


def by_hand(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The documented rule, written out: pad half a window each side (reflect), windows every quarter
    window plus one aligned to the end, mean of the windows' logits."""
    window = model.max_frames
    padded = torch.nn.functional.pad(features, (window // 2, window // 2, 0, 0), mode="reflect")
    length = padded.shape[-1]
    starts = list(np.arange(0, length - window + 1, window // 4))
    if starts[-1] + window < length:
        starts.append(length - window)
    with torch.no_grad():
        return torch.stack([model(padded[..., s : s + window]) for s in starts]).mean(0)


def test_extraction_covers_a_clip_longer_than_the_teachers_input(tmp_path):
    model, teacher = ast_teacher(tmp_path)
    assert model.max_frames == 256  # ast_tiny: 2.56 s of 16 kHz fbank frames
    rng = np.random.default_rng(0)
    waves = torch.from_numpy((rng.standard_normal((2, 6 * STORE_RATE)) * 3000).astype(np.int16))
    logits = teacher.logits(waves)
    frontend = build_frontend(model.frontend_config, STORE_RATE).eval()
    features = frontend(waves.float() / 32768.0)
    assert features.shape[-1] == 598  # all 6 s, not cropped to 256 frames
    torch.testing.assert_close(logits, by_hand(model, features), rtol=1e-4, atol=1e-5)
    changed_tail = waves.clone()
    changed_tail[:, -STORE_RATE:] = 0  # the last second: beyond the first window
    assert not torch.allclose(teacher.logits(changed_tail), logits, atol=1e-4)


def test_training_backpropagates_through_every_window(tmp_path):
    model, _ = ast_teacher(tmp_path)
    model.train()
    features = build_frontend(model.frontend_config, STORE_RATE)(torch.randn(2, 6 * STORE_RATE) * 0.1)
    features.requires_grad_(True)
    clip_forward(model, features).sum().backward()
    tail = features.grad[..., -100:]
    assert features.grad.shape[-1] == 598 and tail.abs().sum() > 0  # the clip's end shapes the update


def test_status_and_config_show_say_how_long_clips_reach_each_model(tmp_path):
    settings = ["--set", f"cache_dir={tmp_path}", "--set", "data.clip_seconds=4", "--set", "teachers.0.arch=ast_tiny",
                "--set", "teachers.1.arch=mn_tiny"]
    status = CliRunner().invoke(app, ["status", *settings])
    assert status.exit_code == 0, status.output
    text = " ".join(status.output.split())
    assert "teacher ast_tiny: input 256 frames (2.56 s) is shorter than a 4 s clip (398 frames): 8 windows, hop 64 frames" in text
    assert "mn_tiny" not in text.split("teacher ast_tiny")[1]  # CNNs take any length
    shown = CliRunner().invoke(app, ["config", "show", *settings])
    assert shown.exit_code == 0 and "teacher ast_tiny: input 256 frames" in " ".join(shown.output.split())
