"""The retrieve stage searches and clusters its pool by partitions of the worker budget: a pool within the budget is
one partition of the same engine, and a smaller budget (more partitions) gives the same tables."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.pipeline import accounting
from curation.config import load_config
from curation.pipeline.runner import run_pipeline
from curation.pipeline.storage import write_table
from curation.data.vectors import descriptor_table
from tests.curation.fakerun import make_run, random_images

N, D, SHARD = 2400, 32, 400
EPS32 = np.finfo(np.float32).eps


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def retrieve_inputs(tmp, worker_memory_gb=None, ray_address=None, **retrieve) -> tuple[dict, np.ndarray]:
    """A clustered pool of N vectors in N / SHARD embed files and two anchor sets written under `tmp`: (the config
    dict of a run of the retrieve stage on them, in-process unless `ray_address`; the pool vectors)."""
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    centers = _unit(rng.normal(size=(30, D)))
    pool = _unit(centers[rng.integers(0, 30, N)] + 0.3 * rng.normal(size=(N, D)))
    anchors = _unit(centers[rng.integers(0, 10, 60)] + 0.3 * rng.normal(size=(60, D)))
    images = random_images(N, size=(8, 8))
    sets = [{"name": "near", "path": str(tmp / "near"), "method": "sample", "k": 4},
            {"name": "topics", "path": str(tmp / "topics"), "method": "cluster", "clusters": 20,
             "min_anchors_per_cluster": 1, "per_cluster": 30}]
    extra = {"scale": {"worker_memory_gb": worker_memory_gb}} if worker_memory_gb else {}
    if ray_address:
        extra["ray"] = {"address": ray_address, "max_retries": 0}
    cfg = make_run(tmp, images, shard_size=SHARD, stages=["retrieve"],
                   retrieve={"anchor_sets": sets, "kmeans_iters": 8, **retrieve}, **extra)
    root = tmp / "run"
    keys = [k for k, _ in images]
    for i, s in enumerate(range(0, N, SHARD)):
        write_table(root / "embed" / "pool" / f"part-{i:05d}.parquet",
                    descriptor_table(keys[s:s + SHARD], pool[s:s + SHARD], "pool"), "descriptors")
    for name in ("near", "topics"):
        write_table(root / "embed" / "anchors" / name / "part-00000.parquet",
                    descriptor_table([f"a{i:05d}" for i in range(60)], anchors, f"anchors/{name}"), "descriptors")
        (tmp / name).mkdir(exist_ok=True)
    return cfg, pool


def retrieve_run(tmp, worker_memory_gb=None, ray_address=None, **retrieve):
    """Run the retrieve stage on :func:`retrieve_inputs`; returns (run root, pool vectors)."""
    cfg, pool = retrieve_inputs(tmp, worker_memory_gb, ray_address, **retrieve)
    run_pipeline(load_config(data=cfg), progress=False)
    return tmp / "run", pool


def three_partitions_gb():
    return 2 * SHARD * D * 4 * 3 / 2**30  # a third of it holds two shards


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    whole = retrieve_run(tmp_path_factory.mktemp("whole"))
    parts = retrieve_run(tmp_path_factory.mktemp("parts"), three_partitions_gb())
    return whole, parts


def _neighbors(root):
    t = pq.read_table(root / "retrieve" / "neighbors.parquet").to_pylist()
    return {(r["anchor_key"], r["rank"]): (r["pool_key"], r["similarity"]) for r in t}


def test_sample_retrieval_by_partitions_equals_the_one_partition_search(runs):
    (whole, _), (parts, _) = runs
    assert_same_sample_retrieval(whole, parts, 60 * 4)
    # exact search rescored, ties to the smaller key: the same neighbours and similarities, bit for bit
    assert _neighbors(whole) == _neighbors(parts)


def assert_same_sample_retrieval(whole, parts, matches=None, dim=D):
    assert list((parts / "retrieve" / "_partitioned" / "near").glob("block-*.parquet"))
    a, b = _neighbors(whole), _neighbors(parts)
    assert a.keys() == b.keys() and len(a) == (matches or len(a)) > 0
    tol = 4 * dim * EPS32  # float32 rounding of a dot product of unit vectors over dim terms
    for key in a:
        assert abs(a[key][1] - b[key][1]) <= tol
    # ids may differ only between neighbours whose similarities tie within rounding
    differ = [k for k in a if a[k][0] != b[k][0]]
    for anchor, rank in differ:
        assert abs(a[(anchor, rank)][1] - a.get((anchor, rank + 1), a.get((anchor, rank - 1)))[1]) <= 2 * tol
    sel = lambda r: {x["key"] for x in pq.read_table(r / "retrieve" / "sets" / "near" / "selection.parquet").to_pylist()}  # noqa: E731
    if not differ:
        assert sel(whole) == sel(parts)
    stats = pq.read_table(parts / "stats" / "retrieval_stats.parquet").to_pylist()
    assert {s["anchor_set"]: s["recall_at_k_vs_exact"] for s in stats}["near"] == 1.0


def test_cluster_retrieval_by_partitions_runs_lloyd_over_them(runs):
    _, (parts, pool) = runs
    cache = list((parts / "retrieve" / "_kmeans").glob("*.npz"))
    assert len(cache) == 1
    z = np.load(cache[0])
    cents, labels = z["centroids"], z["labels"]
    assert cents.shape == (20, D) and labels.shape == (N,)
    d2 = ((pool[:, None, :] - cents[None]) ** 2).sum(-1)  # pool rows are in file order = key order here
    assert (d2[np.arange(N), labels] <= d2.min(1) + 16 * D * EPS32).all()
    cl = pq.read_table(parts / "stats" / "cluster_stats.parquet").to_pylist()
    assert sum(r["size"] for r in cl) == N
    sel = pq.read_table(parts / "retrieve" / "sets" / "topics" / "selection.parquet").to_pylist()
    anchors_of = {r["cluster"]: r["anchors"] for r in cl}
    assert sel and all(anchors_of[r["cluster"]] > 1 for r in sel)
    assert all(r["similarity"] is not None and r["anchor_key"] for r in sel)


def test_ivf_by_partitions_measures_recall(tmp_path):
    root, _ = retrieve_run(tmp_path, three_partitions_gb(), index="ivf_flat", nlist=8, nprobe=1, recall_sample=60)
    stats = {s["anchor_set"]: s for s in pq.read_table(root / "stats" / "retrieval_stats.parquet").to_pylist()}
    assert 0.0 < stats["near"]["recall_at_k_vs_exact"] < 1.0
    summary = json.loads((root / "retrieve" / "sets" / "near" / "summary.json").read_text())
    assert summary["index"].startswith("IVF8,Flat") and summary["index"].endswith("per partition x3")


def test_demo_corpus_retrieval_by_four_partitions_equals_the_one_partition_run(demo_corpus, tmp_path):
    """The demo corpus's pool (embed stage, pixels embedder) retrieved by >= 4 partitions: the same sample matches,
    cluster selection and balanced selection as the one-partition run, table for table."""
    from curation.engine.partitions import plan_partitions
    from tests.curation.fakerun import corpus_pool

    images, _ = corpus_pool(demo_corpus)
    anchors = demo_corpus / "anchors"
    sets = [{"name": "near", "path": str(anchors / "objects"), "method": "sample", "k": 4},
            {"name": "topics", "path": str(anchors / "scenes"), "method": "cluster", "clusters": 12,
             "min_anchors_per_cluster": 1, "per_cluster": 25}]
    balanced = {"name": "even", "levels": [12, 3], "target_size": 60, "resampling_steps": 1}

    def run(sub, **extra):
        (tmp_path / sub).mkdir()
        cfg = make_run(tmp_path / sub, images, shard_size=16, stages=["embed", "retrieve"],
                       retrieve={"anchor_sets": sets, "balanced": balanced}, **extra)
        run_pipeline(load_config(data=cfg), progress=False)
        return tmp_path / sub / "run"

    whole = run("whole")
    files = sorted((whole / "embed" / "pool").glob("part-*.parquet"))
    rows = max(pq.ParquetFile(f).metadata.num_rows for f in files)
    dim = len(pq.read_table(files[0])["embedding"][0])
    gb = 2 * rows * dim * 4 * 3 / 2**30  # a partition holds two files
    assert len(plan_partitions(files, gb).partitions) >= 4
    parts = run("parts", scale={"worker_memory_gb": gb, "searchers": 3})
    assert_same_sample_retrieval(whole, parts, 12 * 4, dim)  # 12 object anchors, k = 4

    def selected(root, name):
        t = pq.read_table(root / "retrieve" / "sets" / name / "selection.parquet")
        return sorted(zip(t["key"].to_pylist(), t["cluster"].to_pylist()))

    assert selected(whole, "topics") and selected(whole, "topics") == selected(parts, "topics")
    assert selected(whole, "even") and selected(whole, "even") == selected(parts, "even")
    for table in ("neighbors.parquet", "selection.parquet", "sets/even/selection.parquet"):
        a, b = (pq.read_table(r / "retrieve" / table).to_pylist() for r in (whole, parts))
        assert a == b, table
    for stat in ("cluster_stats", "retrieval_stats", "funnel"):
        a, b = (pq.read_table(r / "stats" / f"{stat}.parquet").to_pylist() for r in (whole, parts))
        assert a == b, stat
    ledger = lambda r: sorted(accounting.read_ledger(r, "retrieve").to_pylist(), key=lambda x: x["key"])  # noqa: E731
    assert ledger(whole) == ledger(parts)
