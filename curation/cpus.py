"""How many CPU cores a unit task has, and how a model stage splits them between decoding and the model.

:func:`task_cores` is what Ray assigned to the running task (``num_cpus`` of the task, from the runtime context),
else this process's CPU affinity (a plain process, a container limited with ``--cpuset-cpus``).

:func:`cpu_split` decides, for a stage that decodes images and runs a model (sscd, embed), how many DataLoader
decode processes to start and how many intra-op threads torch gets:

* On CUDA the model runs on the GPU and the cores only decode: the configured workers, torch threads unchanged.
* On CPU the model is the bottleneck: a ResNet-50 forward at 320 px costs ~0.4 s of one core per image, decoding
  and resizing a 640x480 JPEG ~10 ms, so decoding is a few percent of the work.  Each decode process takes its
  share of the task's cores away from the model, so a task gets one decode process per
  :data:`CORES_PER_DECODE_WORKER` cores (none on 2 cores: it decodes inline, between batches), at most the
  configured number, and torch gets the remaining cores.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

CORES_PER_DECODE_WORKER = 8


def task_cores() -> int:
    """CPU cores this task may use: Ray's assigned CPUs inside a Ray task, else the process's CPU affinity."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    except Exception:  # noqa: BLE001 - not inside a Ray worker, or an old Ray: fall back to the affinity mask
        pass
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


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
