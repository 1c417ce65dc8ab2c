"""Data-parallel training across processes and machines (torchrun / DDP), kept out of the training loop's way.

`kdpipe train-student --gpus N` relaunches itself under torchrun; each rank then
runs the same command. With `--nnodes M --node-rank R --rdzv-endpoint HOST:PORT`
the same command, started on each of M machines, joins them: node 0 hosts the
rendezvous at HOST:PORT (torchrun's static rendezvous, so node ranks are the
ones given) and its first process is rank 0. Rank 0 alone brings upstream stages
up to date, holds the cache lock and writes outputs and the cache record; the
other ranks receive the stage's context from it and join the training, so every
node must see the cache at the same path. A single process is the world of size
one, so the training loop calls the same functions either way.

Failures end every process with one line: a node whose peers never come says whom
it waited for, where, and how long; a rank that loses contact with the others (one
died, or its machine) says so, and every node's rerun resumes from the last saved
epoch.
"""

from __future__ import annotations

import os
import socket
import time
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


@dataclass(frozen=True)
class Nodes:
    """This machine's place among the machines that train one student together."""

    count: int = 1
    rank: int = 0
    endpoint: str = ""  # HOST:PORT where node 0 hosts the rendezvous
    join_timeout: float = 600.0  # seconds a node waits for the others to start


ONE_NODE = Nodes()


def launch(nproc: int, argv: list[str], nodes: Nodes = ONE_NODE) -> None:
    """Run `kdpipe <argv>` as `nproc` torchrun ranks on this machine, joined with the other nodes' ranks.

    torchrun runs in this process, so a rendezvous that never completes or a rank that fails is one
    KdpipeError saying which and what to do, not an agent's traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from kdpipe.errors import KdpipeError

    if nodes.count == 1:
        where = ["--standalone"]
    else:
        if nodes.rank > 0:
            _wait_for_node_zero(nodes)
        where = [f"--nnodes={nodes.count}", f"--node-rank={nodes.rank}", "--rdzv-backend=static",
                 f"--rdzv-endpoint={nodes.endpoint}", f"--rdzv-conf=timeout={round(nodes.join_timeout)}"]
    try:
        run(parse_args([*where, f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "kdpipe", *argv]))
    except ChildFailedError as exc:
        failed = ", ".join(f"rank {rank} ({_ended(failure.exitcode)})" for rank, failure in sorted(exc.failures.items()))
        raise KdpipeError(f"{_node(nodes)}training stopped: {failed}. Rerun the same command"
                          f"{' on every node' if nodes.count > 1 else ''} to resume from the last saved epoch") from None
    except dist.DistError as exc:  # the rendezvous: node 0 alone, its store waiting for the others
        raise KdpipeError(f"{_node(nodes)}waited {nodes.join_timeout:g} s at {nodes.endpoint} for the other "
                          f"nodes ({str(exc).splitlines()[0]}): start the same command with --node-rank "
                          f"1..{nodes.count - 1} on them, or raise --join-timeout") from None


def _wait_for_node_zero(nodes: Nodes) -> None:
    """Wait until node 0's rendezvous answers at the endpoint (torchrun would raise a C++ trace instead)."""
    from kdpipe.errors import KdpipeError

    host, _, port = nodes.endpoint.rpartition(":")
    deadline = time.monotonic() + nodes.join_timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise KdpipeError(f"{_node(nodes)}waited {nodes.join_timeout:g} s for node 0's rendezvous at "
                                  f"{nodes.endpoint} and nothing answered: start the same command with "
                                  "--node-rank 0 on that host, or raise --join-timeout") from None
            time.sleep(0.5)


def _node(nodes: Nodes) -> str:
    return f"node {nodes.rank} of {nodes.count}: " if nodes.count > 1 else ""


def _ended(exitcode: int) -> str:
    if exitcode < 0:
        import signal

        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def lost_contact(exc: BaseException, ranks: Ranks) -> str | None:
    """What a collective's failure means to the user, when another rank stopped (None: another error)."""
    text = str(exc)
    peer_gone = isinstance(exc, dist.DistError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))
    if not (ranks.distributed and peer_gone):
        return None
    return (f"rank {ranks.rank} lost contact with the other ranks ({text.splitlines()[0][:200]}): a rank or its "
            "machine stopped. Rerun the same command on every node to resume from the last saved epoch")


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
