"""The one Lloyd k-means of the global steps (cluster retrieval, every level of hierarchical k-means), over a pool
held by partitions (one partition when it fits the budget; an array in memory is a plan of one partition too).

* **Initialisation**: k-means++ (:func:`kmeans_pp_seed`) on a uniform sample (:func:`seed_sample_rows`: 64 rows
  per centroid, at most SEED_SAMPLE_ROWS but never under 4 per centroid) drawn by global row (or by position in a
  row subset) with the seeded generator, so the seeds do not depend on the partitioning; beyond
  :data:`KMEANSPP_BUDGET` multiply-adds, k random rows.
* **Lloyd steps**: every partition's worker (:class:`curation.engine.distributed_knn.PartitionWorker`, a Ray actor or a
  local object) assigns its rows (:func:`curation.engine.knn.nearest_centroid`: exact distances, ties to the smaller
  centroid) and returns per-centroid sums in fixed point (int64) and counts, added up pairwise as a tree of Ray
  tasks (:meth:`curation.engine.distributed_knn.Workers.reduce_each`; integer addition: the same total in any
  grouping), so the driver receives one k x d total per wave, never one per partition; it divides.  A centroid
  that receives no row keeps its position.  Stops after ``niter`` steps or when the centroids no longer move (a
  fixed point stays fixed, so the result is the same as running every step).  Each step reads each partition once
  at most: while one wave holds every partition the searchers keep them in memory across steps.
* ``rows``: k-means of a subset of the pool (the resampling steps of hierarchical k-means), given as global rows;
  the final assignment still labels every row.

Memory: the driver holds k centroids, the sample, and two numbers per pool row (label, distance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation.engine.distributed_knn import FIXED_POINT, Workers, add_lloyd_stats, inertia_from_sums
from curation.engine.knn import cpu_threads
from curation.engine.partitions import PartitionPlan

KMEANSPP_BUDGET = 2e10  # multiply-adds allowed for k-means++ seeding; beyond it, random rows
SEED_BLOCK_ROWS = 16_384  # k-means++ sample rows updated by one thread at a time (a fixed cut: see kmeans_pp_seed)
# k-means++ is k sequential passes over its sample, each memory-bound (k x sample x dim reads): past this many rows
# it costs more than the Lloyd steps it saves (measured, 200k x 256, k = 1,000, 10 steps: a 64,000-row sample took
# 4.3 s of 13.2 s; with 16 rows per centroid the final objective was the same to 1e-3)
SEED_SAMPLE_ROWS = 16_384


def seed_sample_rows(n: int, k: int) -> int:
    """Rows of the k-means++ sample for k centroids of n rows."""
    return min(n, max(4 * k, min(64 * k, SEED_SAMPLE_ROWS)))


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [k, d]
    labels: np.ndarray  # int64 [rows]: nearest centroid of every pool row (global row order)
    d2: np.ndarray  # float32 [rows]: squared distance to it
    iterations: int
    inertia: float  # summed squared distance of the trained rows at the last Lloyd step


def kmeans_pp_seed(sample: np.ndarray, k: int, rng: np.random.Generator, threads: int = 0) -> np.ndarray:
    """k-means++ seeding of k centroids among the rows of `sample`.

    Random init puts most seeds in the dense regions and leaves small, well separated modes without a centroid,
    which is exactly what balanced sampling must not miss.

    Each of the k steps is a matrix-vector product over the whole sample (memory-bound), so the sample is cut into
    fixed blocks of SEED_BLOCK_ROWS rows, updated side by side on `threads` threads (0: as many as FAISS uses), one
    BLAS thread each (waking BLAS threads for each small product costs more than it gains, many times more on a busy
    host).  Each row's distance is its own dot product whichever block or thread computes it, and the draws are
    made in this thread from the whole array, so the seeds do not depend on the threads."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    m, d = sample.shape
    sq = (sample * sample).sum(1)
    cents = np.empty((k, d), np.float32)
    cents[0] = sample[rng.integers(m)]
    best = np.empty(m, sq.dtype)
    blocks = [slice(a, min(m, a + SEED_BLOCK_ROWS)) for a in range(0, m, SEED_BLOCK_ROWS)]

    def update(block: slice, c: np.ndarray, first: bool) -> None:
        # 2 (x @ c) == (2 x) @ c: no scaled copy of the sample
        dist = np.maximum(sq[block] - 2 * (sample[block] @ c) + c @ c, 0)
        best[block] = dist if first else np.minimum(best[block], dist)

    threads = cpu_threads(threads)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max(1, min(threads, len(blocks)))) as pool:
        def step(c: np.ndarray, first: bool) -> None:
            if len(blocks) == 1 or threads <= 1:
                for b in blocks:
                    update(b, c, first)
            else:
                list(pool.map(lambda b: update(b, c, first), blocks))

        step(cents[0], True)
        for i in range(1, k):
            total = best.sum()
            j = rng.choice(m, p=best / total) if total > 0 else rng.integers(m)
            cents[i] = sample[j]
            step(cents[i], False)
    return cents


def _local_rows(plan: PartitionPlan, rows: np.ndarray) -> dict[int, np.ndarray]:
    """Each partition's share of sorted global `rows`, as local rows."""
    out = {}
    for p in plan.partitions:
        lo, hi = np.searchsorted(rows, [p.offset, p.offset + p.rows])
        out[p.index] = rows[lo:hi] - p.offset
    return out


def take_rows(plan: PartitionPlan, workers: Workers, rows) -> np.ndarray:
    """The vectors at global `rows` (any order), fetched from the partitions that hold them."""
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    local = _local_rows(plan, rows[order])
    got = [g for g in workers.map_each("take", lambda p: (local[p.index],)) if len(g)]
    flat = np.concatenate(got) if got else np.zeros((0, plan.dim), np.float32)
    out = np.empty_like(flat)
    out[order] = flat
    return out


def assign_all(plan: PartitionPlan, workers: Workers, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, squared distance) of every pool row to its nearest centroid, in global row order."""
    if not plan.rows:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    res = workers.map("assign", np.ascontiguousarray(centroids, np.float32))
    return np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res])


def partitioned_kmeans(plan: PartitionPlan, workers: Workers, k: int, niter: int = 20, seed: int = 0,
                       rows: np.ndarray | None = None) -> KMeansResult:
    """k-means (L2) of the rows of `plan` (or of the global `rows`, in their given order for the seeding); k is
    clamped to the number of rows."""
    n = plan.rows if rows is None else len(rows)
    k = max(1, min(int(k), n))
    rng = np.random.default_rng(seed)
    pick = (lambda r: r) if rows is None else (lambda r: np.asarray(rows, np.int64)[r])
    it, inertia = 0, 0.0
    if k == n:  # every row its own centroid
        cents = take_rows(plan, workers, pick(np.arange(n)))
    else:
        m = seed_sample_rows(n, k)
        if float(k) * m * plan.dim > KMEANSPP_BUDGET:
            cents = take_rows(plan, workers, pick(np.sort(rng.choice(n, k, replace=False))))
        else:
            sample = take_rows(plan, workers, pick(np.arange(n) if m == n else rng.choice(n, m, replace=False)))
            cents = kmeans_pp_seed(sample, k, rng)
        cents = np.ascontiguousarray(cents, np.float32)
        local = None if rows is None else _local_rows(plan, np.sort(np.asarray(rows, np.int64)))
        for it in range(1, niter + 1):
            sums, counts, norms = workers.reduce_each(
                "lloyd_stats", lambda p: (cents, None if local is None else local[p.index]), add_lloyd_stats)
            inertia = inertia_from_sums(cents, sums, counts, norms)
            means = sums / (np.maximum(counts, 1)[:, None] * FIXED_POINT)
            new = np.where(counts[:, None] > 0, means, cents).astype(np.float32)
            moved = not np.array_equal(new, cents)
            cents = new
            if not moved:
                break
    labels, d2 = assign_all(plan, workers, cents)
    return KMeansResult(np.ascontiguousarray(cents, np.float32), labels, d2, it, inertia)
