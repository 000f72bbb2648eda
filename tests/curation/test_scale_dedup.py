"""The dedup stage searches its pool by partitions of the worker budget (one when it fits) and reaches the same
verdicts and tables at any budget (copy duplicates and evaluation contamination)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from curation.pipeline import accounting
from curation.config import load_config
from curation.pipeline.runner import run_pipeline
from tests.synthetic_pool import planted_pool
from curation.pipeline.storage import write_table
from curation.data.vectors import descriptor_table

N, D, SHARD = 3000, 64, 250
THRESHOLD = 0.75  # planted copies ~0.86-0.93; random 64-d pairs stay far below


def dedup_inputs(tmp, worker_memory_gb=None) -> tuple[dict, np.ndarray]:
    """The run's inputs written under `tmp`: (its config dict, the planted group of every pool vector)."""
    x, group = planted_pool(N, D, n_sources=200, copies=2, seed=3)
    rng = np.random.default_rng(9)
    originals = np.flatnonzero(group == np.arange(N))[:10]  # 10 planted groups
    evals = x[originals] + 0.02 * rng.standard_normal((10, D)).astype(np.float32)
    evals /= np.linalg.norm(evals, axis=1, keepdims=True)
    root = tmp / "run"
    keys = [f"{i:010d}" for i in range(N)]
    urls = tmp / "urls.csv"
    tmp.mkdir(parents=True, exist_ok=True)
    urls.write_text("url\nhttp://x.test/a\n")
    accounting.write_ledger(root, "filter", "00000",
                            accounting.make_ledger("filter", keys, [f"u{k}" for k in keys], [None] * N))
    for i, s in enumerate(range(0, N, SHARD)):
        write_table(root / "sscd" / "pool" / f"part-{i:05d}.parquet",
                    descriptor_table(keys[s:s + SHARD], x[s:s + SHARD], "pool"), "descriptors")
    write_table(root / "sscd" / "eval" / "ev" / "part-00000.parquet",
                descriptor_table([f"e{i}" for i in range(10)], evals, "eval/ev"), "descriptors")
    data = {"run_root": str(root), "input": {"url_list": str(urls)}, "ray": {"local": True}, "stages": ["dedup"],
            "dedup": {"threshold": THRESHOLD, "eval_threshold": THRESHOLD, "k": 8, "eval_sets": [{"name": "ev", "path": str(tmp)}]}}
    if worker_memory_gb:
        data["scale"] = {"worker_memory_gb": worker_memory_gb}
    return data, group


def _dedup_run(tmp, worker_memory_gb=None):
    data, group = dedup_inputs(tmp, worker_memory_gb)
    run_pipeline(load_config(data=data), progress=False)
    return Path(data["run_root"]), group


def test_dedup_stage_by_partitions_reaches_the_in_process_verdicts(tmp_path):
    whole, group = _dedup_run(tmp_path / "whole")
    parts, _ = _dedup_run(tmp_path / "parts", worker_memory_gb=3 * SHARD * D * 4 * 3 / 2**30)  # 4 partitions
    assert len(list((parts / "dedup" / "_partitioned" / "self" / "edges").glob("block-*.parquet"))) == 4
    a = {r["key"]: r for r in accounting.read_ledger(whole, "dedup").to_pylist()}
    b = {r["key"]: r for r in accounting.read_ledger(parts, "dedup").to_pylist()}
    assert a.keys() == b.keys()
    for k in a:  # same verdict, same kept image named (cosines printed to 3 decimals)
        assert (a[k]["kept"], a[k]["reason"], a[k]["detail"]) == (b[k]["kept"], b[k]["reason"], b[k]["detail"])
    reasons = [r["reason"] for r in a.values()]
    assert reasons.count("eval_contamination") == 30  # the 10 groups with an evaluation copy, 3 images each
    assert reasons.count("copy_duplicate") == 2 * 190  # the other 190 planted triples keep one each
    # one engine at both budgets: the same table, similarities included, bit for bit
    for table in ("dedup/components.parquet", "stats/dedup_thresholds.parquet", "stats/component_sizes.parquet"):
        assert pq.read_table(whole / table).equals(pq.read_table(parts / table)), table
