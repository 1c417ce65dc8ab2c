"""Child processes die with their parent: no orphan keeps writing after a `kill -9`.

Decode workers, loader workers and a local dask cluster's nannies and workers call
`die_with_parent` as they start. On Linux it asks the kernel (prctl PR_SET_PDEATHSIG) to
send SIGKILL when the parent goes, however it goes; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Called in a child as it starts, with its parent's pid: SIGKILL when that parent dies.

    Passing the pid the parent had (a pool's initargs) also catches a parent that died while
    the child was still starting, before the request took effect.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def loader_worker_dies_with_parent(worker_id: int) -> None:
    """A torch DataLoader's worker_init_fn."""
    die_with_parent(os.getppid())
