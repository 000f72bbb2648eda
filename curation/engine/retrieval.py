"""Retrieval algorithms on embeddings (pure functions of arrays; the retrieve stage does the I/O).

All embeddings are L2-normalised, so cosine similarity is the inner product.

* :func:`search`: k nearest database vectors of each query, exact or with a FAISS IVF index (``ivf_flat`` /
  ``ivf_pq``), whose recall@k against exact search is measured on a query sample: an array is a pool of one
  partition of the engine (:func:`curation.engine.partitioned_pool.array_pool`), the stage's pool is searched by the same
  code.
* :func:`sample_select`: DINOv2 sample-based retrieval: the k nearest pool images of each anchor; each selected
  pool image keeps its best match (highest similarity, then lower rank, then earlier anchor).
* :func:`kmeans` / :func:`assign`: the engine's Lloyd k-means (:mod:`curation.engine.distributed_kmeans`) of an array and
  nearest-centroid assignment (:func:`curation.engine.knn.nearest_centroid`).
* :func:`cluster_select`: DINOv2 cluster-based retrieval: pool clusters holding more than m anchors contribute up
  to n random pool images each; the total is capped per anchor set.
* :func:`hierarchical_kmeans` / :func:`balanced_sample`: Vo et al. 2024 (arXiv 2405.15613): k-means level by level
  (each level clusters the previous level's centroids) with resampling steps (k-means again on the s points
  closest to each centroid, then reassign everything), then top-down balanced sampling; level 0 runs on the
  pool's partitions (never a whole-pool array), the levels above on the centroids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np



# ------------------------------------------------------------------------------------------------- search
#: most rows an IVF index trains on (its sample is held in one process: 2 GB at 512 dims), whatever the pool's size;
#: the automatic number of lists stays at or below this / 39 (faiss's least training points per list)
IVF_TRAIN_MAX_ROWS = 1_000_000


def ivf_lists(n: int, nlist: int = 0) -> int:
    """The number of IVF lists over n vectors: `nlist`, or 4 sqrt(n) at most IVF_TRAIN_MAX_ROWS / 39."""
    nlist = nlist or min(int(round(4 * math.sqrt(n))), IVF_TRAIN_MAX_ROWS // 39)
    return max(1, min(nlist, n // 39 if n >= 39 else 1))  # faiss wants >= 39 training points per list


def ivf_factory(n: int, d: int, kind: str, nlist: int = 0, pq_m: int = 0) -> str:
    """The faiss index_factory string for an IVF index over n vectors of dim d."""
    nlist = ivf_lists(n, nlist)
    if kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    m = pq_m or max(1, d // 8)
    while d % m:
        m -= 1
    nbits = 8 if n >= 256 * 16 else max(4, min(8, int(math.log2(max(16, n // 16)))))
    return f"IVF{nlist},PQ{m}x{nbits}"


def train_ivf(train: np.ndarray, n: int, kind: str, nlist: int = 0, nprobe: int = 32, pq_m: int = 0, seed: int = 0):
    """An empty, trained IVF index (quantizer, and PQ codebooks for ``ivf_pq``) sized for `n` vectors, trained on the
    rows of `train`: (index, factory string).  Vectors are added to it (or to copies of it) afterwards."""
    import faiss

    d = train.shape[1]
    desc = ivf_factory(n, d, kind, nlist, pq_m)
    index = faiss.index_factory(d, desc, faiss.METRIC_INNER_PRODUCT)  # already the concrete class
    if hasattr(index, "do_polysemous_training"):  # faiss-cpu's default polysemous training makes PQ training ~30x slower
        index.do_polysemous_training = False
        index.polysemous_ht = 0
    ivf = faiss.extract_index_ivf(index)
    if hasattr(ivf, "cp"):
        ivf.cp.seed = seed
    index.train(np.ascontiguousarray(train, np.float32))
    ivf.nprobe = min(nprobe, ivf.nlist)
    return index, desc


def ivf_train_rows(n: int, nlist: int = 0, seed: int = 0) -> np.ndarray | None:
    """Sorted rows (of n) an IVF index trains on: 256 per list, at least 100,000 and at most IVF_TRAIN_MAX_ROWS, drawn
    with the seeded generator; None: every row."""
    train_n = min(n, max(256 * ivf_lists(n, nlist), 100_000), IVF_TRAIN_MAX_ROWS)
    return None if train_n >= n else np.sort(np.random.default_rng(seed).choice(n, train_n, replace=False))


def build_ivf(database: np.ndarray, kind: str, nlist: int = 0, nprobe: int = 32, pq_m: int = 0, seed: int = 0):
    n, d = database.shape
    rows = ivf_train_rows(n, nlist, seed)
    index, desc = train_ivf(database if rows is None else database[rows], n, kind, nlist, nprobe, pq_m, seed)
    index.add(np.ascontiguousarray(database, np.float32))
    return index, desc


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each query's exact k nearest found by the approximate search."""
    if approx_ids.size == 0:
        return 1.0
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids)]
    return float(np.sum(hits) / exact_ids.size)


@dataclass
class SearchResult:
    sims: np.ndarray  # float32 [nq, k]
    ids: np.ndarray  # int64 [nq, k] (-1 where an IVF search found fewer than k)
    recall: float | None  # recall@k vs exact on a query sample; 1.0 for the exact search itself; None without queries
    index: str  # what ran: "exact" or the faiss factory string


def search(queries: np.ndarray, database: np.ndarray, k: int, index: str = "exact", *, nlist: int = 0,
           nprobe: int = 32, pq_m: int = 0, recall_sample: int = 1000, seed: int = 0,
           device: str = "auto", rerank: int = 4) -> SearchResult:
    """k nearest rows of the array `database` for each query, by the engine on one partition."""
    from curation.engine.distributed_knn import Placement
    from curation.engine.partitioned_pool import array_pool

    pl = Placement(device=device, index=index, nlist=nlist, nprobe=nprobe, pq_m=pq_m, rerank=rerank, seed=seed)
    with array_pool(database, placement=pl) as pool:
        return pool.search(queries, k, "search", recall_sample)


#: a searched set whose 5th-percentile similarity reaches this finds everything "identical": a collapsed or random
#: embedder (a trained one gives unrelated images clearly lower cosine similarities, the demo's pixels ones <= 0.7)
DEGENERATE_SIMILARITY = 0.99


def degenerate_sets(stats: list[dict]) -> list[str]:
    """One line per anchor set of ``retrieval_stats`` rows whose similarities are all ~1.0 (p05 >= 0.99)."""
    out = []
    for r in stats:
        p05 = r.get("similarity_p05")
        if p05 is not None and p05 == p05 and p05 >= DEGENERATE_SIMILARITY:
            out.append(f"anchor set {r['anchor_set']!r}: every similarity is ~1.0 (p05 {p05:.4f}, p95 "
                       f"{r.get('similarity_p95') or float('nan'):.4f}): the embedder is collapsed or has random "
                       f"weights (embed.checkpoint), so the retrieval is meaningless")
    return out


def sample_select(sims: np.ndarray, ids: np.ndarray):
    """Best match per retrieved pool index: (pool_idx, anchor_idx, rank, sim), sorted by pool_idx."""
    nq, k = ids.shape
    anchor = np.repeat(np.arange(nq), k)
    rank = np.tile(np.arange(k), nq)
    pid, sim = ids.reshape(-1), sims.reshape(-1)
    ok = pid >= 0
    anchor, rank, pid, sim = anchor[ok], rank[ok], pid[ok], sim[ok]
    order = np.lexsort((anchor, rank, -sim, pid))
    pid_s = pid[order]
    first = np.ones(len(pid_s), bool)
    first[1:] = pid_s[1:] != pid_s[:-1]
    sel = order[first]
    return pid[sel], anchor[sel], rank[sel], sim[sel]


# ------------------------------------------------------------------------------------------------- k-means
def kmeans(x, k: int, niter: int = 20, seed: int = 0) -> np.ndarray:
    """Lloyd k-means (L2) of the rows of an array, seeded by k-means++; k is clamped to len(x).  Returns centroids
    [k, d] (the engine's :func:`curation.engine.distributed_kmeans.partitioned_kmeans` on one partition)."""
    from curation.engine.partitioned_pool import array_pool

    with array_pool(x) as pool:
        return pool.kmeans(k, niter, seed).centroids


def assign(x: np.ndarray, centroids: np.ndarray, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by L2 distance -> (labels int64, squared distances float32)."""
    from curation.engine.knn import nearest_centroid

    return nearest_centroid(x, centroids, device)


def sensible_clusters(requested: int, n: int, min_size: int = 4) -> int:
    """Clamp a cluster count to the pool: at most n / min_size clusters (at least 1)."""
    return max(1, min(int(requested), n // min_size if n >= min_size else 1))


@dataclass
class ClusterSelection:
    pool_idx: np.ndarray  # selected pool indices (sorted)
    labels: np.ndarray  # cluster of every pool vector
    anchor_labels: np.ndarray  # cluster of every anchor
    sizes: np.ndarray  # pool vectors per cluster
    anchors: np.ndarray  # anchors per cluster
    selected: np.ndarray  # selected pool vectors per cluster


def cluster_select(pool_labels: np.ndarray, anchor_labels: np.ndarray, n_clusters: int, min_anchors: int,
                   per_cluster: int, cap: int, seed: int = 0) -> ClusterSelection:
    """From every cluster holding more than `min_anchors` anchors, up to `per_cluster` random pool members; if the
    total exceeds `cap`, a uniform random `cap` of them."""
    rng = np.random.default_rng(seed)
    sizes = np.bincount(pool_labels, minlength=n_clusters)
    anchors = np.bincount(anchor_labels, minlength=n_clusters)
    order = np.argsort(pool_labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    chosen = []
    for c in np.flatnonzero(anchors > min_anchors):
        members = order[starts[c]:starts[c + 1]]
        if len(members) > per_cluster:
            members = rng.choice(members, per_cluster, replace=False)
        chosen.append(members)
    sel = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    if len(sel) > cap:
        sel = np.sort(rng.choice(sel, cap, replace=False))
    return ClusterSelection(sel, pool_labels, anchor_labels, sizes, anchors,
                            np.bincount(pool_labels[sel], minlength=n_clusters))


# ------------------------------------------------------------------------------------------------- balanced
@dataclass
class Level:
    centroids: np.ndarray  # [k, d]
    assignment: np.ndarray  # [n_prev]: cluster of each item of the level below (points for level 0)
    d2: np.ndarray | None = None  # [n_prev]: squared distance of each item to its centroid


def hierarchical_kmeans(x, levels: list[int], resampling_steps: int = 1, resample_sizes: list[int] | None = None,
                        niter: int = 20, seed: int = 0, device: str = "auto") -> list[Level]:
    """Level 0 clusters the points (`x`: an array, or a :class:`curation.engine.partitioned_pool.PartitionedPool`, whose
    partitions are never loaded whole), level l the centroids of level l-1; each level's k is clamped to its input.

    Resampling step (Vo et al., Alg. 1): take the s items closest to each centroid, run k-means on their union,
    reassign every item to the new centroids.  Small clusters give all their items and large ones only s, so the
    centroids spread over the data's modes instead of crowding its dense regions."""
    from curation.engine.distributed_knn import Placement
    from curation.engine.partitioned_pool import PartitionedPool, array_pool

    out: list[Level] = []
    pool = x if isinstance(x, PartitionedPool) else array_pool(x, placement=Placement(device=device))
    try:
        for li, k in enumerate(levels):
            if li:
                pool.close()
                pool = array_pool(out[-1].centroids, placement=Placement(device=device))
            n = len(pool)
            k = max(1, min(int(k), n))
            res = pool.kmeans(k, niter, seed + li)
            cents, labels, d2 = res.centroids, res.labels, res.d2
            s = resample_sizes[li] if resample_sizes else max(2, n // k // 2)
            for step in range(resampling_steps):
                order = np.lexsort((d2, labels))  # by cluster, then distance to its centroid
                lab_sorted = labels[order]
                starts = np.searchsorted(lab_sorted, np.arange(k))
                pos = np.arange(len(order)) - starts[lab_sorted]
                subset = order[pos < s]
                if len(subset) < k:
                    break
                res = pool.kmeans(k, niter, seed + 1000 * (step + 1) + li, rows=subset)
                cents, labels, d2 = res.centroids, res.labels, res.d2
            # drop empty clusters so every centroid above stands for real items
            used = np.unique(labels)
            remap = np.full(k, -1, np.int64)
            remap[used] = np.arange(len(used))
            out.append(Level(cents[used], remap[labels], d2))
    finally:
        if pool is not x:
            pool.close()
    return out


def allocate(budget: int, capacities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split `budget` as equally as possible among groups of the given capacities; what a group cannot use goes
    to the others (water-filling).  A remainder smaller than the number of open groups goes to random ones."""
    caps = np.asarray(capacities, np.int64)
    alloc = np.zeros_like(caps)
    remaining = int(min(budget, caps.sum()))
    while remaining > 0:
        open_ = np.flatnonzero(alloc < caps)
        share = remaining // len(open_)
        if share == 0:
            pick = rng.choice(open_, remaining, replace=False)
            alloc[pick] += 1
            break
        take = np.minimum(share, caps[open_] - alloc[open_])
        alloc[open_] += take
        remaining -= int(take.sum())
    return alloc


def balanced_sample(levels: list[Level], target: int, seed: int = 0, strategy: str = "random") -> np.ndarray:
    """Top-down balanced sampling: the budget is split equally among the top level's clusters, each cluster's
    share equally among its children, and so on down to the points (``random`` members, or the ``closest`` to
    their level-0 centroid by the distances level 0 recorded, ties to the smaller index).  Returns sorted point
    indices."""
    rng = np.random.default_rng(seed)
    L = len(levels)
    # members[l][c] = items of level l-1 (points for l = 0) in cluster c of level l
    members = []
    for lv in levels:
        k = len(lv.centroids)
        order = np.argsort(lv.assignment, kind="stable")
        bounds = np.searchsorted(lv.assignment[order], np.arange(k + 1))
        members.append([order[bounds[c]:bounds[c + 1]] for c in range(k)])
    # capacity (points under) every cluster, bottom-up
    caps = [np.array([len(m) for m in members[0]], np.int64)]
    for li in range(1, L):
        caps.append(np.array([caps[li - 1][m].sum() for m in members[li]], np.int64))
    chosen = []

    def visit(level: int, clusters: np.ndarray, budget: int):
        alloc = allocate(budget, caps[level][clusters], rng)
        for c, a in zip(clusters, alloc):
            if a == 0:
                continue
            if level == 0:
                m = members[0][c]
                if strategy == "closest":
                    chosen.append(m[np.argsort(levels[0].d2[m], kind="stable")[:a]])
                else:
                    chosen.append(rng.choice(m, a, replace=False))
            else:
                visit(level - 1, members[level][c], int(a))

    visit(L - 1, np.arange(len(levels[-1].centroids)), int(target))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
