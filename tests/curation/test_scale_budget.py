"""The global steps give the same result at any memory budget and number of searchers: a pool of 50,000 vectors cut
into 1, 4 and 20 partitions (searched 1, 2 and 3 partitions at a time) yields the same duplicate graph, neighbours,
k-means, hierarchical k-means and balanced selection, bit for bit - exact duplicates included, whose equal
similarities are ordered by key."""

from __future__ import annotations

import numpy as np
import pytest

from curation.engine import retrieval as R
from curation.engine.distributed_knn import Placement
from curation.engine.partitioned_dedup import partitioned_dedup_graph
from curation.engine.partitioned_pool import PartitionedPool
from curation.engine.partitions import plan_partitions
from tests.synthetic_pool import planted_pool, write_shards

N, D, SHARD = 50_000, 32, 1_250
THRESHOLD = 0.75


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    x, _ = planted_pool(N, D, n_sources=2_000, copies=2, seed=11)
    rng = np.random.default_rng(12)
    twins = rng.choice(N, 600, replace=False)
    x[twins[:300]] = x[twins[300:]]  # exact duplicates: equal similarities that only the key can order
    out = tmp_path_factory.mktemp("pool")
    return x, write_shards(x, out, SHARD)


def _plan(paths, partitions: int):
    rows = N // partitions
    plan = plan_partitions(paths, 3 * rows * D * 4 / 2**30)
    assert len(plan.partitions) == partitions
    return plan


CUTS = [(1, 1), (4, 2), (20, 3)]  # (partitions, searchers held at once)


@pytest.mark.slow
def test_every_global_step_is_the_same_at_1_4_and_20_partitions(pool, tmp_path):
    x, paths = pool
    rng = np.random.default_rng(13)
    evals = x[rng.choice(N, 20, replace=False)] + 0.01 * rng.standard_normal((20, D)).astype(np.float32)
    evals /= np.linalg.norm(evals, axis=1, keepdims=True)
    anchors = x[rng.choice(N, 50, replace=False)]
    results = []
    for parts, searchers in CUTS:
        plan = _plan(paths, parts)
        placement = Placement(searchers=searchers, seed=5)
        g = partitioned_dedup_graph(plan, evals, 8, THRESHOLD, 0.6, tmp_path / f"g{parts}", placement,
                                    block=4_096)
        with PartitionedPool(plan, tmp_path / f"p{parts}", placement, block=4_096) as p:
            search = p.search(anchors, 10, "near")
            km = p.kmeans(40, 6, seed=5)
            levels = R.hierarchical_kmeans(p, [40, 6], resampling_steps=1, niter=6, seed=5)
        balanced = R.balanced_sample(levels, 3_000, seed=5)
        closest = R.balanced_sample(levels, 3_000, seed=5, strategy="closest")
        results.append({
            **{k: v for k, v in g.items() if isinstance(v, np.ndarray)},
            "search_sims": search.sims, "search_ids": search.ids, "km_centroids": km.centroids,
            "km_labels": km.labels, "km_d2": km.d2, "balanced": balanced, "closest": closest,
            **{f"level{i}_{f}": getattr(lv, f) for i, lv in enumerate(levels) for f in ("centroids", "assignment")},
        })
    ref = results[0]
    # the graph is not trivial: planted copies and exact twins join components, evaluation copies are found
    assert len(np.unique(ref["labels"])) < N - 2_000 and (ref["eval_sims"][:, 0] > 0.6).sum() >= 15
    for (parts, _), got in zip(CUTS[1:], results[1:]):
        assert got.keys() == ref.keys()
        for name in ref:
            assert np.array_equal(got[name], ref[name]), f"{name} differs at {parts} partitions"


def test_every_backend_gives_the_same_neighbours_bit_for_bit(pool):
    """faiss and torch matmul + top-k (here on CPU tensors; on CUDA in production), fp32 or fp16 candidate scoring:
    the rescoring makes the neighbours and similarities identical, exact twins ordered by key."""
    from curation.engine.knn import knn_search

    x, _ = pool
    q, db = x[:300], x[:20_000]
    ref = knn_search(q, db, 10, device="cpu", backend="faiss")
    for backend, dtype in (("torch", "float32"), ("torch", "bfloat16")):
        got = knn_search(q, db, 10, device="cpu", backend=backend, dtype=dtype, query_chunk=128, db_chunk=4_096)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]), (backend, dtype)
    # ties: a query with an exact twin finds itself and the twin at the same similarity, the smaller row first
    s, i = ref
    tied = np.flatnonzero(s[:, 0] == s[:, 1])
    assert tied.size and (i[tied, 0] < i[tied, 1]).all()
