"""How many DataLoader worker processes a stage may start: at most the CPUs this process may run on.

More workers than CPUs only adds processes that wait for each other (and torch warns "This DataLoader will create
N worker processes in total ... suggested max ... is 2" on every unit); torch suggests ``len(sched_getaffinity)``,
which inside a container or a CPU-pinned Ray worker is the allotted CPUs, and so does this.  Results do not depend
on the worker count (each stream splits its samples by worker id and the outputs are sorted by key).
"""

from __future__ import annotations

import os


def usable_cpus() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def loader_workers(requested: int) -> int:
    """`requested` DataLoader workers, capped at the usable CPUs (0 stays 0: decode in the calling process)."""
    return min(int(requested), usable_cpus())
