"""Placement of a global step on a one-GPU Ray cluster: the stage worker that drives it holds no GPU, each searcher
holds the one GPU (one wave at a time) and, CUDA being absent here, searches on its CPU; the verdicts equal the
in-process run.  A searcher that cannot be placed is an error naming what it asked for, not a hang.

The Ray head is started with a logical ``num_gpus=1`` (Ray counts it; no CUDA device exists) and a custom
resource, so the placement itself is exercised on a machine without a GPU."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from curation.pipeline import accounting

from curation.cluster import gpu
from curation.config import load_config
from curation.engine.distributed_knn import Placement, Workers
from curation.engine.partitions import plan_partitions
from curation.pipeline.runner import run_pipeline
from tests.curation.test_scale_dedup import D, SHARD, dedup_inputs


@pytest.mark.slow
@pytest.mark.skipif(gpu.cuda_available(), reason="exercises the CPU fallback of a searcher on a logical GPU")
def test_one_gpu_cluster_runs_dedup_with_gpu_searchers_falling_back_to_cpu(tmp_path):
    import ray

    budget = 3 * SHARD * D * 4 * 3 / 2**30  # 4 partitions
    local, _ = dedup_inputs(tmp_path / "local", budget)
    run_pipeline(load_config(data=local), progress=False)

    # a private Ray head in this process (address "local": never one of the machine's other clusters)
    ray.init(address="local", num_cpus=2, num_gpus=1, resources={"gpu_node": 1}, logging_level="WARNING",
             _temp_dir=tempfile.mkdtemp(prefix="lvdray-", dir="/tmp"))
    try:
        assert ray.cluster_resources().get("GPU") == 1 and ray.cluster_resources().get("gpu_node") == 1
        data, _ = dedup_inputs(tmp_path / "ray", budget)
        data["ray"] = {"max_retries": 0}  # the run uses the connection above
        run_pipeline(load_config(data=data), progress=False)  # the stage worker asks num_gpus=0, searchers 1 each
        a = accounting.read_ledger(tmp_path / "local" / "run", "dedup").sort_by("key")
        b = accounting.read_ledger(tmp_path / "ray" / "run", "dedup").sort_by("key")
        assert a.equals(b)

        paths = sorted((tmp_path / "ray" / "run" / "sscd" / "pool").glob("part-*.parquet"))
        plan = plan_partitions(paths, budget)
        with Workers(plan, Placement(use_ray=True)) as w:
            assert w.resources()["num_gpus"] == 1 and w.width == 1  # one GPU: one searcher at a time
            hits = w.map("search", np.eye(D, dtype=np.float32)[:2], 3)
            assert len(hits) == 4
            assert {i["device"] for i in w.infos} <= {"cpu"}
            w.release()
            assert [i["device"] for i in w.infos] == ["cpu"] * len(w.infos) and w.infos
        # two searchers at once on one GPU: the second can never be placed
        with pytest.raises(RuntimeError, match=r"partitions \[1\] asking .*'num_gpus': 1.*could not be placed"):
            with Workers(plan, Placement(use_ray=True, searchers=2, place_timeout_s=20)) as w:
                w.map("search", np.eye(D, dtype=np.float32)[:2], 3)
    finally:
        ray.shutdown()
