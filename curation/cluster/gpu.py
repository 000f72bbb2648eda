"""The one place that decides CPU vs GPU: every stage, searcher and the embedder asks here.

* :func:`resolve` - a process's device for a ``device`` setting: ``auto`` is CUDA when this process sees one, else
  the CPU; ``cuda`` without a visible CUDA device is an error naming the setting (a stage asked for it), unless
  ``fallback`` (a searcher actor placed on a GPU slot Ray counts but this process cannot use falls back to the CPU:
  the search is the same, only slower).
* :func:`cluster_gpus` - GPUs of the Ray cluster this process is connected to (else of this host).
* :func:`worker_gpus` - what a stage worker asks Ray for: 1 for ``cuda``, or ``auto`` on a cluster with GPUs.  The
  stage worker that drives a global step asks for none (its searchers hold the GPUs, one each).
* :func:`faiss_gpus` - GPUs faiss itself can use (faiss-gpu installed); 0 with faiss-cpu.
"""

from __future__ import annotations


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False


def resolve(device: str = "auto", setting: str | None = None, fallback: bool = False) -> str:
    """'cpu' or 'cuda' (or an explicit 'cuda:N') for a device setting, as this process can run it."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not cuda_available():
        if fallback:
            return "cpu"
        raise RuntimeError(f"{setting or 'device'} is {device!r} but no CUDA device is visible to this process")
    return device


def cluster_gpus() -> int:
    """GPUs of the Ray cluster this process is connected to, else CUDA devices of this host."""
    try:
        import ray

        if ray.is_initialized():
            return int(ray.cluster_resources().get("GPU", 0))
    except ImportError:  # pragma: no cover
        pass
    if not cuda_available():
        return 0
    import torch

    return torch.cuda.device_count()


def worker_gpus(device: str) -> int:
    """GPUs one stage worker asks Ray for under a ``device`` setting."""
    if device == "cpu":
        return 0
    if device.startswith("cuda"):
        return 1
    return int(cluster_gpus() > 0)


def searcher_gpus(device: str) -> int:
    """GPUs each searcher actor of a global step asks for: one where the device setting allows GPUs and the
    cluster has any, else none."""
    return int(device != "cpu" and cluster_gpus() > 0)


def faiss_gpus() -> int:
    try:
        import faiss

        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001 - faiss-cpu builds may lack the symbol
        return 0
