"""How a model stage splits a task's cores between decode workers and torch threads (curation.cluster.workers)."""

import os

import torch

from curation.cluster.workers import CORES_PER_DECODE_WORKER, cpu_split, task_cores, torch_threads


def test_cpu_split_gives_the_model_the_cores_on_cpu_and_leaves_cuda_alone():
    assert cpu_split("cuda", 4, cores=2) == (4, None)  # the GPU computes: every configured decode worker
    assert cpu_split("cuda:1", 0, cores=64) == (0, None)
    assert cpu_split("cpu", 4, cores=2) == (0, 2)  # 2 cores: decode inline, both cores for the model
    assert cpu_split("cpu", 4, cores=CORES_PER_DECODE_WORKER) == (1, CORES_PER_DECODE_WORKER - 1)
    assert cpu_split("cpu", 4, cores=16) == (2, 14)
    assert cpu_split("cpu", 1, cores=64) == (1, 63)  # never more than configured
    assert cpu_split("cpu", 0, cores=1) == (0, 1)


def test_task_cores_outside_ray_is_the_affinity_mask():
    assert task_cores() == len(os.sched_getaffinity(0))
    workers, threads = cpu_split("cpu", 4)
    assert workers + threads == task_cores()


def test_torch_threads_restores_the_previous_count():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
