"""Retrieval algorithms on embeddings (pure functions of arrays; the retrieve stage does the I/O).

All embeddings are L2-normalised, so cosine similarity is the inner product.

* :func:`search`: k nearest database vectors of each query, exact (``curation.vectors.knn``) or with a FAISS IVF
  index (``ivf_flat`` / ``ivf_pq``), whose recall@k against exact search is measured on a query sample.
* :func:`sample_select`: DINOv2 sample-based retrieval: the k nearest pool images of each anchor; each selected
  pool image keeps its best match (highest similarity, then lower rank, then earlier anchor).
* :func:`kmeans` / :func:`assign`: FAISS k-means (GPU when FAISS has one) and nearest-centroid assignment (L2, done
  as an inner product on augmented vectors so it runs on the same exact k-NN as everything else).
* :func:`cluster_select`: DINOv2 cluster-based retrieval: pool clusters holding more than m anchors contribute up
  to n random pool images each; the total is capped per anchor set.
* :func:`hierarchical_kmeans` / :func:`balanced_sample`: Vo et al. 2024 (arXiv 2405.15613): k-means level by level
  (each level clusters the previous level's centroids) with resampling steps (k-means again on the s points
  closest to each centroid, then reassign everything), then top-down balanced sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from curation.vectors import knn


# ------------------------------------------------------------------------------------------------- search
def ivf_factory(n: int, d: int, kind: str, nlist: int = 0, pq_m: int = 0) -> str:
    """The faiss index_factory string for an IVF index over n vectors of dim d."""
    nlist = nlist or int(round(4 * math.sqrt(n)))
    nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))  # faiss wants >= 39 training points per list
    if kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    m = pq_m or max(1, d // 8)
    while d % m:
        m -= 1
    nbits = 8 if n >= 256 * 16 else max(4, min(8, int(math.log2(max(16, n // 16)))))
    return f"IVF{nlist},PQ{m}x{nbits}"


def build_ivf(database: np.ndarray, kind: str, nlist: int = 0, nprobe: int = 32, pq_m: int = 0, seed: int = 0):
    import faiss

    n, d = database.shape
    desc = ivf_factory(n, d, kind, nlist, pq_m)
    index = faiss.index_factory(d, desc, faiss.METRIC_INNER_PRODUCT)  # already the concrete class
    if hasattr(index, "do_polysemous_training"):  # DESIGN 7: polysemous training makes PQ training ~30x slower
        index.do_polysemous_training = False
        index.polysemous_ht = 0
    ivf = faiss.extract_index_ivf(index)
    rng = np.random.default_rng(seed)
    train_n = min(n, max(256 * ivf.nlist, 100_000))
    train = database if train_n >= n else database[np.sort(rng.choice(n, train_n, replace=False))]
    if hasattr(ivf, "cp"):
        ivf.cp.seed = seed
    index.train(np.ascontiguousarray(train, np.float32))
    index.add(np.ascontiguousarray(database, np.float32))
    ivf.nprobe = min(nprobe, ivf.nlist)
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
    k = min(int(k), len(database))
    if index == "exact" or len(database) < 2 or len(queries) == 0:
        sims, ids = knn(queries, database, k, device=device)
        return SearchResult(sims, ids, 1.0 if len(queries) else None, "exact")
    idx, desc = build_ivf(database, index, nlist, nprobe, pq_m, seed)
    q = np.ascontiguousarray(queries, np.float32)
    if index == "ivf_pq" and rerank > 1:
        # PQ codes rank coarsely: take rerank * k candidates, re-rank them with the exact vectors (held anyway)
        kk = min(len(database), rerank * k)
        _, cand = idx.search(q, kk)
        exact = np.einsum("qd,qkd->qk", q, database[np.maximum(cand, 0)])
        exact[cand < 0] = -np.inf
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        sims, ids = np.take_along_axis(exact, top, 1), np.take_along_axis(cand, top, 1)
        desc += f",rerank{kk}"
    else:
        sims, ids = idx.search(q, k)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(queries), min(recall_sample, len(queries)), replace=False))
    _, exact = knn(queries[sample], database, k, device=device)
    return SearchResult(sims.astype(np.float32), ids.astype(np.int64), recall_at_k(ids[sample], exact), desc)


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
def faiss_has_gpu() -> bool:
    try:
        import faiss

        return faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001
        return False


KMEANSPP_BUDGET = 2e10  # multiply-adds allowed for k-means++ seeding; beyond it, FAISS's random init


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """k-means++ seeding on a sample of at most 64 k points (None when too costly: then FAISS's random init).

    Random init puts most seeds in the dense regions and leaves small, well separated modes without a centroid,
    which is exactly what balanced sampling must not miss."""
    n, d = x.shape
    m = min(n, 64 * k)
    if float(k) * m * d > KMEANSPP_BUDGET:
        return None
    sample = x if m == n else x[rng.choice(n, m, replace=False)]
    sq = (sample * sample).sum(1)
    cents = np.empty((k, d), np.float32)
    cents[0] = sample[rng.integers(m)]
    best = np.maximum(sq - 2 * sample @ cents[0] + cents[0] @ cents[0], 0)
    for i in range(1, k):
        total = best.sum()
        j = rng.choice(m, p=best / total) if total > 0 else rng.integers(m)
        cents[i] = sample[j]
        best = np.minimum(best, np.maximum(sq - 2 * sample @ cents[i] + cents[i] @ cents[i], 0))
    return cents


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, init: np.ndarray | None = None) -> np.ndarray:
    """FAISS k-means (L2), on GPU when FAISS has one, seeded by k-means++ when affordable; k is clamped to
    len(x).  Returns centroids [k, d]."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    k = max(1, min(int(k), len(x)))
    if k == len(x):
        return x.copy()
    if init is None:
        init = kmeans_pp_init(x, k, np.random.default_rng(seed))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, gpu=faiss_has_gpu(),
                      min_points_per_centroid=1, max_points_per_centroid=256)
    km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, np.float32))
    return km.centroids.copy()


def assign(x: np.ndarray, centroids: np.ndarray, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by L2 distance -> (labels int64, squared distances float32).

    argmin |x - c|^2 = argmax (2 x.c - |c|^2): an inner-product search of [x, 1] against [2c, -|c|^2]."""
    x = np.ascontiguousarray(x, np.float32)
    c = np.ascontiguousarray(centroids, np.float32)
    cn = (c * c).sum(1)
    qa = np.hstack([x, np.ones((len(x), 1), np.float32)])
    ca = np.hstack([2 * c, -cn[:, None]])
    sims, ids = knn(qa, ca, 1, device=device)
    d2 = np.maximum((x * x).sum(1) - sims[:, 0], 0)
    return ids[:, 0], d2.astype(np.float32)


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


def hierarchical_kmeans(x: np.ndarray, levels: list[int], resampling_steps: int = 1,
                        resample_sizes: list[int] | None = None, niter: int = 20, seed: int = 0,
                        device: str = "auto") -> list[Level]:
    """Level 0 clusters the points, level l the centroids of level l-1; each level's k is clamped to its input.

    Resampling step (Vo et al., Alg. 1): take the s items closest to each centroid, run k-means on their union,
    reassign every item to the new centroids.  Small clusters give all their items and large ones only s, so the
    centroids spread over the data's modes instead of crowding its dense regions."""
    out: list[Level] = []
    items = np.ascontiguousarray(x, np.float32)
    for li, k in enumerate(levels):
        k = max(1, min(int(k), len(items)))
        cents = kmeans(items, k, niter, seed + li)
        labels, d2 = assign(items, cents, device)
        s = resample_sizes[li] if resample_sizes else max(2, len(items) // k // 2)
        for step in range(resampling_steps):
            order = np.lexsort((d2, labels))  # by cluster, then distance to its centroid
            lab_sorted = labels[order]
            starts = np.searchsorted(lab_sorted, np.arange(k))
            pos = np.arange(len(order)) - starts[lab_sorted]
            sample = items[order[pos < s]]
            if len(sample) < k:
                break
            cents = kmeans(sample, k, niter, seed + 1000 * (step + 1) + li)
            labels, d2 = assign(items, cents, device)
        # drop empty clusters so every centroid above stands for real items
        used = np.unique(labels)
        remap = np.full(k, -1, np.int64)
        remap[used] = np.arange(len(used))
        out.append(Level(cents[used], remap[labels]))
        items = cents[used]
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


def balanced_sample(levels: list[Level], target: int, seed: int = 0, strategy: str = "random",
                    points: np.ndarray | None = None) -> np.ndarray:
    """Top-down balanced sampling: the budget is split equally among the top level's clusters, each cluster's
    share equally among its children, and so on down to the points (``random`` members, or the ``closest`` to
    their level-0 centroid, which needs `points`).  Returns sorted point indices."""
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
                if strategy == "closest" and points is not None:
                    d = ((points[m] - levels[0].centroids[c]) ** 2).sum(1)
                    chosen.append(m[np.argsort(d, kind="stable")[:a]])
                else:
                    chosen.append(rng.choice(m, a, replace=False))
            else:
                visit(level - 1, members[level][c], int(a))

    visit(L - 1, np.arange(len(levels[-1].centroids)), int(target))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
