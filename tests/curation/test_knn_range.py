"""Range search (every row above a radius) and reduced-precision scoring with its measured recall, on real FAISS and
torch on the CPU: exact results against a float64 brute-force loop, the same at any partitioning and backend."""

from __future__ import annotations

import numpy as np
import pytest

from curation.engine import knn
from curation.engine.distributed_knn import (Placement, PartitionWorker, partitioned_knn, partitioned_range_search)
from curation.engine.partitions import array_plan

RADIUS = 0.6


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _pool_with_near_radius_pairs(seed: int = 0, n: int = 1500, nq: int = 80, d: int = 48):
    """Random unit vectors, plus for each of the first 40 queries database rows planted at similarity radius +- a
    few float32 spacings, where a backend's float32 score can fall on either side of the radius."""
    rng = np.random.default_rng(seed)
    db = _unit(rng.standard_normal((n, d)))
    q = _unit(rng.standard_normal((nq, d)))
    planted = []
    for j in range(40):
        orth = rng.standard_normal(d)
        orth -= orth @ q[j].astype(np.float64) * q[j]
        orth /= np.linalg.norm(orth)
        for step in (-3, -1, 0, 1, 3):
            c = RADIUS + step * 2.0**-24
            planted.append(c * q[j] + np.sqrt(1 - c * c) * orth)
    db = np.vstack([db, np.asarray(planted, np.float32)])
    db = db[rng.permutation(len(db))]
    db[rng.choice(len(db), 30, replace=False)] = db[:30]  # exact duplicates: equal similarities, ties by id
    return q, np.ascontiguousarray(db)


def _brute_force(q: np.ndarray, db: np.ndarray, radius: float):
    """One float64 dot product per pair, rounded to float32, kept when > radius; sorted by similarity, then id."""
    lims, sims, ids = [0], [], []
    db64 = db.astype(np.float64)
    for row in q.astype(np.float64):
        s = np.array([row @ x for x in db64]).astype(np.float32)
        hit = np.flatnonzero(s > radius)
        order = sorted(hit, key=lambda i: (-s[i], i))
        sims += [s[i] for i in order]
        ids += order
        lims.append(len(ids))
    return np.array(lims, np.int64), np.array(sims, np.float32), np.array(ids, np.int64)


def _same(a, b) -> None:
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_range_search_matches_float64_brute_force_for_both_backends():
    q, db = _pool_with_near_radius_pairs()
    expected = _brute_force(q, db, RADIUS)
    assert 40 < expected[0][-1] < 200  # the planted pairs fall on both sides of the radius
    for backend in ("faiss", "torch"):
        _same(knn.range_search(q, db, RADIUS, device="cpu", backend=backend), expected)
    # small chunks: the chunking of queries and database does not change the result
    _same(knn.range_search(q, db, RADIUS, device="cpu", backend="torch", query_chunk=7, db_chunk=101), expected)


def test_partitioned_range_search_is_the_same_at_one_and_three_partitions():
    q, db = _pool_with_near_radius_pairs(seed=1)
    expected = _brute_force(q, db, RADIUS)
    for parts in (1, 3):
        _same(partitioned_range_search(q, array_plan(db, parts), RADIUS, block=32), expected)
    # the pool against itself: every row finds at least itself
    lims, _, ids = partitioned_range_search(array_plan(db, 3), array_plan(db, 3), RADIUS, block=500)
    assert all(r in ids[lims[r]:lims[r + 1]] for r in range(len(db)))


def test_range_search_empty_cases():
    q, db = _pool_with_near_radius_pairs(seed=2, n=200)
    for lims, sims, ids in (knn.range_search(q, db, 1.5, device="cpu"),  # above every similarity
                            knn.range_search(q[:0], db, RADIUS, device="cpu"),
                            knn.range_search(q, db[:0], RADIUS, device="cpu"),
                            partitioned_range_search(q, array_plan(db, 3), 1.5)):
        assert len(sims) == len(ids) == 0 and np.all(lims == 0)
    assert len(knn.range_search(q, db, 1.5, device="cpu")[0]) == len(q) + 1


def test_ivf_range_search_returns_only_exact_pairs():
    q, db = _pool_with_near_radius_pairs(seed=3, n=3000)
    exact = _brute_force(q, db, RADIUS)
    w = PartitionWorker(array_plan(db).partitions[0], device="cpu", index="ivf_flat", nlist=16, nprobe=4)
    lims, sims, ids = w.range_search(q, RADIUS)
    truth = {(r, i): s for r, i, s in zip(knn.range_rows(exact[0]), exact[2], exact[1])}
    found = list(zip(knn.range_rows(lims), ids))
    assert found and all(truth[p] == s for p, s in zip(found, sims))  # a subset, with exact similarities


def _near_ties(seed: int = 4, n: int = 2000, d: int = 32):
    """Groups of rows within 1e-3 of each other: bfloat16 (8 significant bits, spacing ~4e-3 near 1) cannot order
    them, so its top-k candidates miss true neighbours."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((20, d)))
    x = _unit(np.repeat(centres, n // 20, axis=0) + 1e-3 * rng.standard_normal((n, d)).astype(np.float32))
    return x[:100], x


def _independent_recall(q: np.ndarray, x: np.ndarray, k: int) -> float:
    """bfloat16 scores by a plain torch matmul, their k + TIE_MARGIN best rescored in float64, against the float64
    brute-force top-k (ties to the smaller id)."""
    import torch

    s16 = (torch.from_numpy(q).bfloat16() @ torch.from_numpy(x).bfloat16().T).float().numpy()
    cand = np.argsort(-s16, axis=1, kind="stable")[:, :k + knn.TIE_MARGIN]
    s64 = q.astype(np.float64) @ x.T.astype(np.float64)
    hits = total = 0
    for r in range(len(q)):
        c = cand[r]
        sc = s64[r, c].astype(np.float32)
        found = c[np.lexsort((c, -sc))[:k]]
        true = np.lexsort((np.arange(len(x)), -s64[r].astype(np.float32)))[:k]
        hits += len(np.intersect1d(found, true))
        total += k
    return hits / total


def test_reduced_precision_recall_is_measured_and_reported(tmp_path):
    q, x = _near_ties()
    k = 10
    m = 64  # the first 64 queries of each block are the sample
    run = partitioned_knn(q, array_plan(x), k, tmp_path / "bf16", block=len(q),
                          placement=Placement(score_dtype="bfloat16"))
    assert run.recall_sample == m * k
    assert 0 <= run.recall <= 1
    assert run.recall == pytest.approx(_independent_recall(q[:m], x, k), abs=0)
    assert run.recall < 1  # ~100 rows per near-tie group, 18 candidates: bfloat16 misses some true neighbours
    # every neighbour returned is exact anyway: its similarity is the float64 one
    sims, ids = run.results()
    np.testing.assert_array_equal(sims, np.einsum("qd,qkd->qk", q.astype(np.float64),
                                                  x[ids].astype(np.float64)).astype(np.float32))
    # float32 scoring: nothing to sample (reported 1.0), and the measurement itself finds every neighbour
    run32 = partitioned_knn(q, array_plan(x), k, tmp_path / "f32", block=len(q))
    assert run32.recall_sample == 0 and run32.recall == 1.0
    w = PartitionWorker(array_plan(x).partitions[0], device="cpu")
    w._measure_recall(q, k, *knn.candidates(q, x, k + knn.TIE_MARGIN, "faiss"))
    assert w.recall_sample == m * k and w.recall_hits == w.recall_sample
