"""Worker processes that end with their parent.

A preempted job is often killed with SIGKILL, which a process cannot catch: DataLoader and
decoding workers would then linger, holding memory and file handles. On Linux the kernel
can send them SIGKILL when their parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a Slurm allocation's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def die_with_parent(*_: object) -> None:
    """Call first thing in a worker process (a DataLoader worker_init_fn or a Pool initializer)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
