"""Where models run and in which precision: the one meaning of `device: auto` and `precision: auto`.

`precision: auto` is bf16 autocast on CUDA and fp32 everywhere else, for training, extraction,
evaluation and benchmarks alike. On a GPU bf16 roughly doubles throughput and the stored
targets (float16) lose nothing that matters. On a CPU it would pay only where the chip has
bf16 units (AVX512-BF16, AMX) and would make a run's numbers depend on which CPU it landed
on; so CPUs run fp32 unless a config asks for `bf16` explicitly.
"""

from __future__ import annotations

import torch

from kdpipe import distributed
from kdpipe.distributed import SINGLE, Ranks

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str, ranks: Ranks = SINGLE) -> torch.device:
    """`auto` means the first GPU when there is one; under DDP each rank takes its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return distributed.device_for(ranks, torch.device(name))


def resolve_precision(precision: str, device: torch.device) -> str:
    """'bf16' or 'fp32': what `precision` means on `device` (see the module docstring for `auto`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision
