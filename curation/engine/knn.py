"""The one k-nearest-neighbour search (inner product = cosine similarity on L2-normalised vectors) of every global
step: dedup's graph, sample retrieval, k-means assignment.  The partition searchers
(:class:`curation.engine.distributed_knn.PartitionWorker`) call it on the partition they hold.

Two steps, so the result never depends on how the database is cut or which backend found the candidates:

1. **Candidates**: the best ``k + TIE_MARGIN`` rows by a fast backend - ``faiss`` (``faiss.knn``, exact brute force
   on the CPU, no index copy), ``faiss_gpu`` (``faiss.knn_gpu``, only where faiss-gpu is installed), ``torch``
   (chunked matmul + ``topk`` on any torch device; the CUDA default, as faiss-cpu is what the lock file holds; fp16
   / bf16 scoring as an option).  A backend's float32 score of one pair depends on the BLAS blocking, i.e. on the
   shape of the call.
2. **Rescoring**: each candidate's similarity computed again in float64 (one dot product per pair, the same
   arithmetic whatever the call's shape), rounded to float32, and the k best kept: highest similarity, ties to the
   smaller row.  So 1 or 16 partitions, CPU or GPU give the same neighbours and similarities, bit for bit, as long
   as the true k-th neighbour is among a backend's ``k + TIE_MARGIN`` best (rounding moves scores by ~1e-7).

Candidates whose backend score provably cannot reach the k best (:func:`prune`: a bound on the score's rounding
error, and the k-th exact similarity found in partitions searched before) are not rescored: the result is the same.
:func:`nearest_centroid` is k-means assignment decided the same way (one float32 GEMM and its error bound; float64
distances for the chosen centroid and for near ties; L2, ties to the smaller centroid).
All return float32 similarities and int64 row ids of shape (n_queries, k); missing columns (fewer than k rows)
hold id -1 and similarity -inf.  The device comes from :mod:`curation.cluster.gpu`.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from curation.cluster import gpu

TIE_MARGIN = 8  # extra candidates per query, so a rounding-level reorder at the k-th place cannot change the result
RESCORE_BYTES = 64 * 2**20  # float64 gathered candidates held at once while rescoring


def as_f32(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {x.shape}")
    return x


def square_norms(x: np.ndarray) -> np.ndarray:
    """float64 |row|^2 of every row of float32 `x` (each row's own dot product: the same in any batch)."""
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def _faiss_candidates(q: np.ndarray, db: np.ndarray, k: int, query_chunk: int, gpu_index: bool
                      ) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    scores = np.empty((len(q), k), np.float32)
    ids = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), query_chunk):
        if gpu_index:
            res = faiss.StandardGpuResources()
            d, i = faiss.knn_gpu(res, q[s:s + query_chunk], db, k, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            d, i = faiss.knn(q[s:s + query_chunk], db, k, metric=faiss.METRIC_INNER_PRODUCT)
        scores[s:s + len(i)], ids[s:s + len(i)] = d, i
    return scores, ids


def device_parts(db: np.ndarray, device: str, dtype: str = "float32", db_chunk: int = 1_048_576) -> list:
    """The database on a torch device, in chunks of `db_chunk` rows (a searcher keeps it between calls)."""
    import torch

    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return [torch.from_numpy(db[s:s + db_chunk]).to(device, tdtype) for s in range(0, len(db), db_chunk)]


@contextmanager
def _float32_matmuls():
    """torch matmuls in true float32 (TF32 off, restored after: the error bounds assume float32 rounding), without
    autograd."""
    import torch

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _torch_candidates(q: np.ndarray, parts: list, k: int, query_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    dev, tdtype = parts[0].device, parts[0].dtype
    offsets = np.cumsum([0] + [p.shape[0] for p in parts])
    scores = np.empty((len(q), k), np.float32)
    ids = np.empty((len(q), k), np.int64)
    with _float32_matmuls():
        for s in range(0, len(q), query_chunk):
            qc = torch.tensor(q[s:s + query_chunk]).to(dev, tdtype)  # a copy: a block from Ray is read-only
            best_s = best_i = None
            for off, part in zip(offsets[:-1], parts):
                ps, pi = torch.topk((qc @ part.T).float(), min(k, part.shape[0]), dim=1)
                pi = pi + int(off)
                if best_s is not None:
                    ps, sel = torch.topk(torch.cat([best_s, ps], 1), k, dim=1)
                    pi = torch.gather(torch.cat([best_i, pi], 1), 1, sel)
                best_s, best_i = ps, pi
            scores[s:s + len(qc)] = best_s.cpu().numpy()
            ids[s:s + len(qc)] = best_i.cpu().numpy()
    return scores, ids


def candidates(q: np.ndarray, db: np.ndarray, k: int, backend: str = "faiss", device_db: list | None = None,
               query_chunk: int = 65_536, db_chunk: int = 1_048_576, dtype: str = "float32"
               ) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best rows of `db` per query by `backend`: (the backend's float32 scores, ids), -1 padded; order
    unspecified beyond "best"."""
    k = min(k, len(db))
    if k == 0 or len(q) == 0:
        return _empty(len(q), k)
    if backend == "faiss":
        return _faiss_candidates(q, db, k, query_chunk, gpu_index=False)
    if backend == "faiss_gpu":
        return _faiss_candidates(q, db, k, query_chunk, gpu_index=True)
    if backend == "torch":
        return _torch_candidates(q, device_db or device_parts(db, "cpu", dtype, db_chunk), k, query_chunk)
    raise ValueError(f"unknown backend {backend!r}")


#: unit roundoff of each scoring precision (inputs rounded to it, products summed in float32 or better)
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def score_tolerance(q: np.ndarray, db_norm: float, dtype: str = "float32") -> np.ndarray:
    """Per query, a bound on |backend score - exact inner product| with any database row of norm <= `db_norm`,
    widened by the float32 spacing of the score (so that a candidate below ``floor - tol`` cannot even round to a
    tie with ``floor``).  float32 scoring: a length-d dot product's error is below d u |q||x| in any summation
    order; reduced precision adds the rounding of both inputs (2 u |q||x|) and sums the products in float32."""
    d = q.shape[1]
    u32 = 2.0**-24
    u = UNIT_ROUNDOFF[dtype]
    qn = np.sqrt(square_norms(q))
    per = (d + 4) * u32 + (3 * u if dtype != "float32" else 0.0)
    return (2 * per * qn * db_norm).astype(np.float32)


def prune(scores: np.ndarray, cand: np.ndarray, keep: int, tol: np.ndarray,
          floor: np.ndarray | None = None) -> np.ndarray:
    """Candidates (-1 = none) with those dropped (-1) that cannot be among the `keep` best by exact score: a
    candidate whose score + tol lies below the `keep`-th best score - tol is beaten by `keep` others, and one below
    `floor` (per query: the `keep`-th best exact similarity found elsewhere) cannot enter either.  `tol`: per query,
    :func:`score_tolerance`.  Nothing that could be in the exact result is dropped, so the result is the same."""
    s = np.where(cand >= 0, scores, -np.inf).astype(np.float32)
    bound = np.full(len(s), -np.inf, np.float32)
    if s.shape[1] > keep:
        bound = np.partition(s, s.shape[1] - keep, axis=1)[:, s.shape[1] - keep] - tol
    if floor is not None:
        bound = np.maximum(bound, floor)
    return np.where(s + tol[:, None] < bound[:, None], -1, cand)


def _rescore_rows(q: np.ndarray, db: np.ndarray, c: np.ndarray, k: int, sims: np.ndarray, ids: np.ndarray) -> None:
    """rescore() of one chunk of queries, written into sims / ids (each query's row alone decides its values)."""
    valid = c >= 0
    width = int(valid.sum(1).max())
    if width < c.shape[1]:  # pruned candidates: the valid ones first, only as many columns as a row needs
        c = np.take_along_axis(c, np.argsort(~valid, axis=1, kind="stable")[:, :width], 1)
        valid = c >= 0
    # float32 rows, products and sums in float64 (einsum casts in its buffer: no float64 copy of the rows)
    sc = np.einsum("bd,bkd->bk", q, db[np.maximum(c, 0)], dtype=np.float64)
    sc = np.where(valid, sc.astype(np.float32), -np.inf).astype(np.float32)
    order = np.lexsort((np.where(valid, c, np.iinfo(np.int64).max), -sc), axis=1)[:, :k]
    kk = order.shape[1]
    sims[:, :kk] = np.take_along_axis(sc, order, 1)
    ids[:, :kk] = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(c, order, 1), -1)


def rescore(q: np.ndarray, db: np.ndarray, cand: np.ndarray, k: int, threads: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's candidate rows (-1 = none) by float64 inner product rounded to float32: (sims,
    ids), highest first, ties to the smaller id, padded to k with (-inf, -1).  Chunks of queries run on `threads`
    threads (0: as many as FAISS uses); every query's values are its own, so the threads change nothing.

    Queries are taken in order of how many candidates they keep (after :func:`prune` the counts vary widely, most
    rows keeping a few and some many), so a chunk gathers about as many rows as its queries need, not the widest
    query's count for every one of them."""
    nq = len(q)
    sims, ids = _empty(nq, k)
    if nq == 0 or cand.shape[1] == 0:
        return sims, ids
    cand = np.asarray(cand, np.int64)
    counts = (cand >= 0).sum(1)
    order = np.argsort(-counts, kind="stable")
    per_row = 4 * max(1, db.shape[1])  # bytes of one gathered float32 row
    chunks, a = [], 0
    while a < nq:  # widest first: each chunk as many queries as RESCORE_BYTES of gathered rows allows
        step = max(1, RESCORE_BYTES // (per_row * max(1, int(counts[order[a]]))))
        chunks.append(order[a:a + step])
        a += step

    def work(rows: np.ndarray) -> None:
        if counts[rows[0]] == 0:  # no candidate left: the padding stays
            return
        s_out, i_out = _empty(len(rows), k)
        _rescore_rows(q[rows], db, cand[rows], k, s_out, i_out)
        sims[rows], ids[rows] = s_out, i_out

    in_threads(work, chunks, threads)
    return sims, ids


def cpu_threads(threads: int = 0) -> int:
    """`threads`, or for 0 as many as FAISS uses (its OpenMP setting: what a searcher was limited to)."""
    if threads:
        return threads
    import faiss

    return faiss.omp_get_max_threads()


def in_threads(work, items, threads: int = 0, blas_threads: int | None = None) -> list:
    """``[work(item) for item in items]``, on `threads` threads (0: as many as FAISS uses) when there are several
    items; numpy's and scipy's loops release the GIL, so chunks of rows run side by side.  Each item's result must
    depend on the item alone (rows written to disjoint slices, integer sums), so the threads change nothing.
    `blas_threads`: BLAS threads per call meanwhile (1: each thread's matrix product on its own core)."""
    items = list(items)
    threads = cpu_threads(threads)
    if threads <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    limits = nullcontext() if blas_threads is None else threadpool_limits(limits=blas_threads, user_api="blas")
    with limits, ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(work, items))


def default_backend(device: str) -> str:
    if device.startswith("cuda"):
        return "faiss_gpu" if gpu.faiss_gpus() else "torch"
    return "faiss"


def knn_search(queries, database, k: int, device: str = "auto", backend: str = "auto", query_chunk: int = 65_536,
               db_chunk: int = 1_048_576, dtype: str = "float32", device_db: list | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` inner-product neighbours of each query row in `database`: (sims float32 [nq, k], ids int64
    [nq, k]), best first, ties to the smaller id.  `backend`: 'auto' (:func:`default_backend` of the device),
    'faiss', 'faiss_gpu' or 'torch'; `dtype` is the torch backend's scoring precision (candidates only: the
    rescoring keeps the result exact); `device_db`: the database already on the device (:func:`device_parts`)."""
    q, db = as_f32(queries), as_f32(database)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"dimension mismatch: queries {q.shape[1]}, database {db.shape[1]}")
    if k < 1:
        raise ValueError("k must be >= 1")
    device = gpu.resolve(device)
    if backend == "auto":
        backend = default_backend(device)
    if backend == "torch" and device_db is None and len(db):
        device_db = device_parts(db, device, dtype, db_chunk)
    scores, cand = candidates(q, db, k + TIE_MARGIN, backend, device_db, query_chunk, db_chunk, dtype)
    tol = score_tolerance(q, float(np.sqrt(square_norms(db).max())) if len(db) else 0.0, dtype)
    return rescore(q, db, prune(scores, cand, k, tol), k)


def _centroid_scores(x: np.ndarray, c: np.ndarray, device: str) -> np.ndarray:
    """float32 inner products x @ c.T (BLAS on the CPU, torch matmul without TF32 on CUDA)."""
    if not device.startswith("cuda"):
        return x @ c.T
    import torch

    with _float32_matmuls():
        return (torch.from_numpy(x).to(device) @ torch.from_numpy(c).to(device).T).cpu().numpy()


def _exact_d2(x: np.ndarray, c64: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """float64 squared distances of each row of x to its candidate centroids (-1 = none: inf), rounded to float32."""
    diff = x[:, None, :].astype(np.float64) - c64[np.maximum(cand, 0)]
    return np.where(cand >= 0, np.einsum("bkd,bkd->bk", diff, diff), np.inf).astype(np.float32)


def nearest_centroid(x, centroids, device: str = "auto", distances: bool = True, x_sq: np.ndarray | None = None,
                     threads: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Nearest centroid by L2 distance -> (labels int64, squared distances float32), ties to the smaller centroid.
    ``distances=False`` (a Lloyd step, which needs only the labels): the distances are not computed (None).
    `x_sq`: the rows' float64 squared norms when the caller keeps them (a searcher across Lloyd steps).

    The decision is the exact one: the float64 distance rounded to float32, ties to the smaller centroid.  A float32
    GEMM scores every centroid (``|c|^2 - 2 x.c``; its rounding error is below ``err``, a bound from the dot
    product's length and the norms), so a row whose best score leads the second by more than ``2 err`` has that
    centroid as its exact nearest: only its one distance is computed in float64.  A row with several centroids
    within ``2 err`` of its best (near ties, duplicate centroids) has all of them computed in float64.  Neither the
    GEMM's blocking nor the batch decides anything, so the labels do not depend on how the rows are cut."""
    x, c = as_f32(x), as_f32(centroids)
    n, d = x.shape
    if n == 0 or len(c) == 0:
        return np.full(n, -1, np.int64), np.full(n, np.inf, np.float32)
    device = gpu.resolve(device)
    c64 = c.astype(np.float64)
    cc64 = (c64 * c64).sum(1)
    cc = cc64.astype(np.float32)
    minus2c = np.ascontiguousarray(-2 * c)
    cmax = float(np.sqrt(cc64.max()))
    u = 2.0**-24
    labels = np.empty(n, np.int64)
    d2 = np.empty(n, np.float32) if distances else None
    step = max(1, RESCORE_BYTES // (8 * max(len(c), d)))

    def block(s: int) -> None:  # rows s:s + step, written to their own slices
        xs = x[s:s + step]
        a = _centroid_scores(xs, minus2c, device)  # x . (-2 c) = -2 (x . c) exactly: scaling by 2 is exact
        a += cc
        rows = np.arange(len(xs))
        best = np.argmin(a, axis=1)
        lead = a[rows, best]
        a[rows, best] = np.inf
        second = a.min(1)
        a[rows, best] = lead
        xn = np.sqrt(x_sq[s:s + step] if x_sq is not None else square_norms(xs))
        # GEMM error <= d u |x||c| (any summation order), |c|^2 and the subtraction one rounding each, and the float32
        # spacing of the distance itself (two centroids closer than that round to a tie): twice all of it
        thr = lead + (2 * 2 * (2 * d + 16) * u * (xn + cmax) ** 2).astype(np.float32)
        amb = np.flatnonzero(second <= thr)
        labels[s:s + len(xs)] = best
        if distances:
            diff = xs.astype(np.float64)
            diff -= c64[best]
            d2[s:s + len(xs)] = np.einsum("bd,bd->b", diff, diff)
            del diff
        if len(amb):
            m = a[amb] <= thr[amb, None]
            width = int(m.sum(1).max())
            cand = np.argsort(~m, axis=1, kind="stable")[:, :width]  # the near centroids, in index order
            cand = np.where(np.take_along_axis(m, cand, 1), cand, -1)
            per = max(1, RESCORE_BYTES // (8 * width * d))
            for a0 in range(0, len(amb), per):
                cb, rb = cand[a0:a0 + per], amb[a0:a0 + per]
                dist = _exact_d2(xs[rb], c64, cb)
                pick = np.lexsort((np.where(cb >= 0, cb, np.iinfo(np.int64).max), dist), axis=1)[:, 0]
                r = np.arange(len(rb))
                labels[s + rb] = cb[r, pick]
                if distances:
                    d2[s + rb] = dist[r, pick]

    # blocks side by side on the CPU (one BLAS thread each: the product and the passes over the scores all run
    # in parallel); a GPU's product is one stream
    in_threads(block, range(0, n, step), 1 if device.startswith("cuda") else threads, blas_threads=1)
    return labels, d2


# ------------------------------------------------------------------------------------------------- range search
RANGE_BYTES = 64 * 2**20  # float32 scores of one query chunk x database chunk held at once (torch backend)


def empty_ranges(nq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A range-search result with no pairs for `nq` queries: (lims int64 [nq + 1], sims float32 [0], ids int64 [0])."""
    return np.zeros(nq + 1, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)


def ranges_from_pairs(nq: int, rows: np.ndarray, sims: np.ndarray, ids: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, similarity, id) pairs in any order -> the CSR result: per query (rows lims[i]:lims[i + 1]) highest
    similarity first, ties to the smaller id.  Only the pairs decide it, not their order or how they were found."""
    rows, sims, ids = np.asarray(rows, np.int64), np.asarray(sims, np.float32), np.asarray(ids, np.int64)
    order = np.lexsort((ids, -sims, rows))
    lims = np.zeros(nq + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=nq), out=lims[1:])
    return lims, sims[order], ids[order]


def range_rows(lims: np.ndarray) -> np.ndarray:
    """The query row of every pair of a CSR result."""
    return np.repeat(np.arange(len(lims) - 1, dtype=np.int64), np.diff(lims))


def merge_ranges(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], nq: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Several CSR results over the same `nq` queries (e.g. one per partition, global ids) -> one, sorted per query as
    :func:`ranges_from_pairs` sorts, so the merge does not depend on how the database was cut."""
    if not parts:
        return empty_ranges(nq)
    return ranges_from_pairs(nq, np.concatenate([range_rows(p[0]) for p in parts]),
                             np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))


def _exact_pairs(q: np.ndarray, db: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 inner product of each (query row, db row) pair, rounded to float32 (the arithmetic of :func:`rescore`:
    one dot product per pair, whatever found it), in chunks of pairs."""
    out = np.empty(len(rows), np.float32)
    step = max(1, RESCORE_BYTES // (8 * max(1, q.shape[1])))
    for s in range(0, len(rows), step):
        r, i = rows[s:s + step], ids[s:s + step]
        out[s:s + len(r)] = np.einsum("nd,nd->n", q[r], db[i], dtype=np.float64)
    return out


def _range_candidates(q: np.ndarray, db: np.ndarray, lower: np.ndarray, backend: str, device_db: list | None,
                      index, dtype: str, query_chunk: int, db_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(query row, db row) pairs whose backend score exceeds the query's `lower` bound (a superset of the exact
    result when `lower` = radius - tolerance), by query chunks; an IVF `index` scans its probed lists only."""
    rows, ids = [], []

    def scan(searcher, first: int) -> None:  # a FAISS index over db[first:...]; one scalar radius per query chunk
        for s in range(0, len(q), query_chunk):
            lims, _, i = searcher.range_search(q[s:s + query_chunk], float(lower[s:s + query_chunk].min()))
            rows.append(range_rows(np.asarray(lims, np.int64)) + s)
            ids.append(np.asarray(i, np.int64) + first)

    if index is not None:
        scan(index, 0)
    elif backend == "faiss":
        import faiss

        step = max(1, RANGE_BYTES // (4 * db.shape[1]))  # the flat index copies one database chunk at a time
        for b in range(0, len(db), step):
            flat = faiss.IndexFlatIP(db.shape[1])
            flat.add(db[b:b + step])
            scan(flat, b)
            del flat
    elif backend in ("torch", "faiss_gpu"):  # faiss-gpu has no flat range search: the torch matmul serves CUDA
        import torch

        parts = device_db or device_parts(db, "cpu", dtype, db_chunk)
        dev, tdtype = parts[0].device, parts[0].dtype
        offsets = np.cumsum([0] + [p.shape[0] for p in parts])
        step = max(1, min(query_chunk, RANGE_BYTES // (4 * max(p.shape[0] for p in parts))))
        with _float32_matmuls():
            for s in range(0, len(q), step):
                qc = torch.tensor(q[s:s + step]).to(dev, tdtype)
                lo = torch.from_numpy(lower[s:s + step]).to(dev)[:, None]
                for off, part in zip(offsets[:-1], parts):
                    r, i = torch.nonzero((qc @ part.T).float() > lo, as_tuple=True)
                    rows.append(r.cpu().numpy().astype(np.int64) + s)
                    ids.append(i.cpu().numpy().astype(np.int64) + int(off))
    else:
        raise ValueError(f"unknown backend {backend!r}")
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(ids)


def range_search(queries, database, radius: float, device: str = "auto", backend: str = "auto",
                 query_chunk: int = 65_536, db_chunk: int = 1_048_576, dtype: str = "float32",
                 device_db: list | None = None, index=None, db_norm: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every database row whose inner product with a query exceeds `radius`: (lims int64 [nq + 1], sims float32,
    ids int64), query i's pairs at lims[i]:lims[i + 1], highest similarity first, ties to the smaller id.

    Exact by the two steps of :func:`knn_search`: a backend ('faiss': ``IndexFlatIP.range_search``; 'torch' (also
    what 'faiss_gpu' uses): chunked matmul + mask, `dtype` its scoring precision) finds the pairs scoring above
    ``radius - tol`` (:func:`score_tolerance`: no pair of the result can score lower), then each pair's similarity
    is computed again in float64, rounded to float32 and kept when ``> radius``.  So the result does not depend on
    the backend or on how the database is cut.  `index`: a FAISS index over these rows (IVF) that proposes the
    pairs instead; it scans only its probed lists (PQ: approximate scores), so pairs can be missed (recall < 1),
    but every pair returned is exact.  Memory besides the result and its candidates: faiss copies one database
    chunk of RANGE_BYTES into a flat index at a time; torch holds one query chunk's scores (RANGE_BYTES per
    database chunk)."""
    q, db = as_f32(queries), as_f32(database)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"dimension mismatch: queries {q.shape[1]}, database {db.shape[1]}")
    nq = len(q)
    if nq == 0 or len(db) == 0:
        return empty_ranges(nq)
    device = gpu.resolve(device)
    if backend == "auto":
        backend = default_backend(device)
    if backend in ("torch", "faiss_gpu") and device_db is None and index is None:
        device_db = device_parts(db, device, dtype, db_chunk)
    if db_norm is None:
        db_norm = float(np.sqrt(square_norms(db).max()))
    tol = score_tolerance(q, db_norm, dtype).astype(np.float64)
    lower = np.nextafter((radius - tol).astype(np.float32), np.float32(-np.inf))  # rounded down, never up
    rows, ids = _range_candidates(q, db, lower, backend, device_db, index, dtype, query_chunk, db_chunk)
    sims = _exact_pairs(q, db, rows, ids)
    keep = sims > radius
    return ranges_from_pairs(nq, rows[keep], sims[keep], ids[keep])
