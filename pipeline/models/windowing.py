"""Clips longer than a model's input: one rule for training, extraction, evaluation and predict.

A transformer's positional embedding fixes the longest input it takes (`model.max_frames`);
CNNs take any length and are never windowed. When a clip's features are longer, the clip is
covered whole: it is reflect-padded by half a window at both ends (so the edges are seen by as
many windows as the middle), cut into windows of `max_frames` frames every quarter window, plus
one window aligned to the end when the hop misses a tail; the model runs on every window of the
batch in one pass, and the clip's logits are the mean of its windows' logits (as hear21passt's
scene embeddings). Training backpropagates through that mean, so a model trains on what it is
scored on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def window_starts(frames: int, window: int, hop: int | None = None, pad: bool = True) -> list[int]:
    """First frame of each window over `frames` frames (after the half-window padding when `pad`)."""
    hop = hop or window // 4
    length = frames + 2 * (window // 2) if pad else frames
    starts = list(range(0, length - window + 1, hop))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def windowed_forward(
    model: nn.Module,
    x: torch.Tensor,
    window_frames: int | None = None,
    hop_frames: int | None = None,
    pad: bool = True,
    return_embedding: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean logits (and embedding) over the windows of (B, 1, F, T) features; the module docstring's rule.

    Defaults: window = `model.max_frames`, hop = window / 4. Inputs no longer than a window
    are passed through unchanged.
    """
    window = window_frames or model.max_frames
    if x.shape[-1] <= window:
        return model(x, return_embedding=return_embedding) if return_embedding else model(x)
    starts = window_starts(x.shape[-1], window, hop_frames, pad)
    if pad:
        x = nn.functional.pad(x, (window // 2, window // 2, 0, 0), mode="reflect")
    windows = torch.cat([x[..., s : s + window] for s in starts])  # (windows * B, 1, F, window)
    if not return_embedding:
        return model(windows).view(len(starts), x.shape[0], -1).mean(0)
    logits, embedding = model(windows, return_embedding=True)
    return (logits.view(len(starts), x.shape[0], -1).mean(0), embedding.view(len(starts), x.shape[0], -1).mean(0))


def clip_forward(model: nn.Module, features: torch.Tensor, max_frames: int | None = None) -> torch.Tensor:
    """Logits of whole clips: `model(features)`, windowed when the clips are longer than `max_frames`.

    `max_frames` defaults to the model's own; pass it for a wrapped model (DDP, torch.compile),
    which does not carry its module's attributes. A model without one takes any length.
    """
    max_frames = max_frames or getattr(model, "max_frames", None)
    if max_frames is not None and features.shape[-1] > max_frames:
        return windowed_forward(model, features, window_frames=max_frames)
    return model(features)


def coverage(model: nn.Module, frontend_config: dict[str, Any], clip_seconds: float) -> str | None:
    """How a clip of `clip_seconds` reaches `model`, when it takes less than the whole clip at once."""
    from kdpipe.frontends import frames_for

    max_frames = getattr(model, "max_frames", None)
    frames = frames_for(clip_seconds, frontend_config)
    if max_frames is None or frames <= max_frames:
        return None
    frames_per_second = (frames_for(2 * clip_seconds, frontend_config) - frames) / clip_seconds
    window_seconds = max_frames / frames_per_second
    count = len(window_starts(frames, max_frames))
    return (f"input {max_frames} frames ({window_seconds:.2f} s) is shorter than a {clip_seconds:g} s clip "
            f"({frames} frames): {count} windows, hop {max_frames // 4} frames, mean of their logits "
            f"(longer input: options.input_tdim / frontend.target_frames, or a checkpoint trained on longer clips)")
