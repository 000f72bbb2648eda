"""How many CPUs a stage's task has, how many DataLoader workers it may start, and how a model stage splits its
cores between decoding and the model.

* :func:`loader_workers`: at most the CPUs this process may run on.  More workers than CPUs only adds processes
  that wait for each other (and torch warns "This DataLoader will create N worker processes in total ... suggested
  max ... is 2" on every unit); torch suggests ``len(sched_getaffinity)``, which inside a container or a
  CPU-pinned Ray worker is the allotted CPUs, and so does this.  Results do not depend on the worker count (each
  stream splits its samples by worker id and the outputs are sorted by key).
* :func:`task_cores`: what Ray assigned to the running task (``num_cpus`` of the task, from the runtime context),
  else :func:`usable_cpus`.
* :func:`cpu_split`, for a stage that decodes images and runs a model (sscd, embed): how many decode processes to
  start and how many intra-op threads torch gets.  On CUDA the model runs on the GPU and the cores only decode: the
  configured workers, torch threads unchanged.  On CPU the model is the bottleneck: a ResNet-50 forward at 320 px
  costs ~0.4 s of one core per image, decoding and resizing a 640x480 JPEG ~10 ms, so decoding is a few percent of
  the work, and each decode process takes its share of the task's cores away from the model.  So a task gets one
  decode process per :data:`CORES_PER_DECODE_WORKER` cores (none on 2 cores: it decodes inline, between batches),
  at most the configured number, and torch gets the remaining cores.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

CORES_PER_DECODE_WORKER = 8


def usable_cpus() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def loader_workers(requested: int) -> int:
    """`requested` DataLoader workers, capped at the usable CPUs (0 stays 0: decode in the calling process)."""
    return min(int(requested), usable_cpus())


def task_cores() -> int:
    """CPU cores this worker may use: the CPUs Ray assigned to its actor (or task), else the process's usable CPUs."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    except Exception:  # noqa: BLE001 - not inside a Ray worker, or an old Ray: fall back to the affinity mask
        pass
    return usable_cpus()


def cpu_split(device: str, workers: int, cores: int | None = None) -> tuple[int, int | None]:
    """(decode workers, torch intra-op threads or None to leave them) for a model stage on `device`."""
    if not str(device).startswith("cpu"):
        return workers, None
    cores = task_cores() if cores is None else max(1, int(cores))
    n = min(workers, cores // CORES_PER_DECODE_WORKER)
    return n, max(1, cores - n)


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` torch intra-op threads (None: unchanged), restoring the previous count after."""
    import torch

    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
