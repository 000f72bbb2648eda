"""Lloyd k-means over a partitioned pool (cluster-based retrieval and hierarchical k-means at scale).

Each iteration, every partition's worker (:class:`curation.distributed_knn.PartitionWorker`, a Ray actor or a
local object) assigns its vectors to the current centroids and returns per-centroid float64 sums and counts; the
driver adds them up in partition order and divides.  A centroid that receives no vector keeps its position.
Initialisation is k-means++ (:func:`curation.retrieval.kmeans_pp_init`) on a uniform sample of the pool drawn by
global row, so it is the same however the pool is partitioned.  Stops after ``niter`` iterations or when the
centroids no longer move.

Training on a sample only is an explicit option (``train_sample``): the Lloyd steps then run on that many rows
drawn uniformly (held by the driver), and only the final assignment visits every partition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation.distributed_knn import Workers
from curation.partitions import PartitionPlan
from curation.retrieval import assign, kmeans_pp_init


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [k, d]
    labels: np.ndarray  # int64 [rows]: nearest centroid of every pool row (global row order)
    iterations: int
    inertia: float  # summed squared distance at the last Lloyd step


def take_rows(plan: PartitionPlan, workers: Workers, rows) -> np.ndarray:
    """The vectors at global `rows` (any order), fetched from the partitions that hold them."""
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    got = _sorted_rows(plan, workers, rows[order])
    out = np.empty_like(got)
    out[order] = got
    return out


def _sorted_rows(plan: PartitionPlan, workers: Workers, rows: np.ndarray) -> np.ndarray:
    out = []
    for w, wave in enumerate(workers.waves):
        local = [rows[(rows >= p.offset) & (rows < p.offset + p.rows)] - p.offset for p in wave]
        with workers.opened(w) as handles:
            out += workers.call_each(handles, "take", local)
    return np.concatenate(out) if out else np.zeros((0, plan.dim), np.float32)


def partitioned_kmeans(plan: PartitionPlan, workers: Workers, k: int, niter: int = 20, seed: int = 0,
                       init_sample: int = 0, train_sample: int = 0) -> KMeansResult:
    """k-means (L2) of every row of `plan`; k is clamped to the number of rows."""
    n = plan.rows
    k = max(1, min(int(k), n))
    rng = np.random.default_rng(seed)
    m = min(n, init_sample or 64 * k)
    sample = _sorted_rows(plan, workers, np.sort(rng.choice(n, m, replace=False)))
    init = kmeans_pp_init(sample, k, rng)
    cents = init if init is not None else sample[np.sort(rng.choice(m, k, replace=False))]
    cents = np.ascontiguousarray(cents, np.float32)
    train = None
    if train_sample and train_sample < n:
        train = _sorted_rows(plan, workers, np.sort(rng.choice(n, train_sample, replace=False)))
    it = inertia = 0
    for it in range(1, niter + 1):
        if train is not None:
            labels, d2 = assign(train, cents, device="cpu")
            sums = np.zeros(cents.shape, np.float64)
            np.add.at(sums, labels, train.astype(np.float64))
            counts = np.bincount(labels, minlength=k)
            inertia = float(d2.astype(np.float64).sum())
        else:
            stats = workers.map("lloyd_stats", cents)
            sums = sum(s[0] for s in stats)
            counts = sum(s[1] for s in stats)
            inertia = float(sum(s[2] for s in stats))
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], cents).astype(np.float32)
        moved = not np.array_equal(new, cents)
        cents = new
        if not moved:
            break
    labels = np.concatenate(workers.map("assign", cents)) if n else np.zeros(0, np.int64)
    return KMeansResult(cents, labels, it, inertia)
