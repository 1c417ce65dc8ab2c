"""Data-parallel training across processes (torchrun / DDP), kept out of the training loop's way.

`kdpipe train-student --gpus N` relaunches itself under torchrun; each rank then
runs the same command. Rank 0 alone brings upstream stages up to date, holds the
cache lock and writes outputs and the cache record; the other ranks receive the
stage's context from it and join the training. A single process is the world of
size one, so the training loop calls the same functions either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Rank 0 may build upstream stages (hours at AudioSet scale) while the others wait in a collective.
UPSTREAM_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes building one stage together (DDP); a world of one by default."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def under_torchrun() -> bool:
    """True in a process that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def current() -> Ranks:
    """This process's place in the initialised process group (the world of one when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str) -> Ranks:
    """Join torchrun's process group: NCCL for CUDA, gloo on CPU; binds each rank to its local GPU."""
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=UPSTREAM_TIMEOUT)
    return current()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run `kdpipe <argv>` as `nproc` torchrun ranks on this machine; returns torchrun's exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "kdpipe", *argv]
    return subprocess.call(command)


def device_for(ranks: Ranks, device: torch.device) -> torch.device:
    """Each rank trains on its own GPU."""
    if ranks.distributed and device.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device


def shard(batches: list[np.ndarray], ranks: Ranks) -> list[np.ndarray]:
    """This rank's share of an epoch's batches: every world-th one, the same count on every rank.

    Batches of the global list that step together (one per rank) are consecutive, so a
    step of N ranks at batch size B sees exactly the clips of one batch of N·B.
    """
    usable = len(batches) - len(batches) % ranks.world
    return batches[ranks.rank:usable:ranks.world]


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """DDP around the model when there are several ranks (it averages gradients); the model itself otherwise."""
    if not ranks.distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast(value: Any, ranks: Ranks) -> Any:
    """Rank 0's `value` on every rank."""
    if not ranks.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `value`, by rank, on every rank."""
    if not ranks.distributed:
        return [value]
    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()
