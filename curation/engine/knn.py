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

:func:`nearest_centroid` is k-means assignment by the same two steps (L2 distance, ties to the smaller centroid).
All return float32 similarities and int64 row ids of shape (n_queries, k); missing columns (fewer than k rows)
hold id -1 and similarity -inf.  The device comes from :mod:`curation.cluster.gpu`.
"""

from __future__ import annotations

import numpy as np

from curation.cluster import gpu

TIE_MARGIN = 8  # extra candidates per query, so a rounding-level reorder at the k-th place cannot change the result
RESCORE_BYTES = 64 * 2**20  # float64 gathered candidates held at once while rescoring


def as_f32(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {x.shape}")
    return x


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def _faiss_candidates(q: np.ndarray, db: np.ndarray, k: int, query_chunk: int, gpu_index: bool) -> np.ndarray:
    import faiss

    ids = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), query_chunk):
        if gpu_index:
            res = faiss.StandardGpuResources()
            _, i = faiss.knn_gpu(res, q[s:s + query_chunk], db, k, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            _, i = faiss.knn(q[s:s + query_chunk], db, k, metric=faiss.METRIC_INNER_PRODUCT)
        ids[s:s + len(i)] = i
    return ids


def device_parts(db: np.ndarray, device: str, dtype: str = "float32", db_chunk: int = 1_048_576) -> list:
    """The database on a torch device, in chunks of `db_chunk` rows (a searcher keeps it between calls)."""
    import torch

    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return [torch.from_numpy(db[s:s + db_chunk]).to(device, tdtype) for s in range(0, len(db), db_chunk)]


def _torch_candidates(q: np.ndarray, parts: list, k: int, query_chunk: int) -> np.ndarray:
    import torch

    dev, tdtype = parts[0].device, parts[0].dtype
    offsets = np.cumsum([0] + [p.shape[0] for p in parts])
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = np.empty((len(q), k), np.int64)
    try:
        with torch.inference_mode():
            for s in range(0, len(q), query_chunk):
                qc = torch.from_numpy(q[s:s + query_chunk]).to(dev, tdtype)
                best_s = best_i = None
                for off, part in zip(offsets[:-1], parts):
                    ps, pi = torch.topk((qc @ part.T).float(), min(k, part.shape[0]), dim=1)
                    pi = pi + int(off)
                    if best_s is not None:
                        ps, sel = torch.topk(torch.cat([best_s, ps], 1), k, dim=1)
                        pi = torch.gather(torch.cat([best_i, pi], 1), 1, sel)
                    best_s, best_i = ps, pi
                ids[s:s + len(qc)] = best_i.cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return ids


def candidates(q: np.ndarray, db: np.ndarray, k: int, backend: str = "faiss", device_db: list | None = None,
               query_chunk: int = 65_536, db_chunk: int = 1_048_576, dtype: str = "float32") -> np.ndarray:
    """The `k` best rows of `db` per query by `backend` (ids, -1 padded; order unspecified beyond "best")."""
    k = min(k, len(db))
    if k == 0 or len(q) == 0:
        return np.full((len(q), k), -1, np.int64)
    if backend == "faiss":
        return _faiss_candidates(q, db, k, query_chunk, gpu_index=False)
    if backend == "faiss_gpu":
        return _faiss_candidates(q, db, k, query_chunk, gpu_index=True)
    if backend == "torch":
        return _torch_candidates(q, device_db or device_parts(db, "cpu", dtype, db_chunk), k, query_chunk)
    raise ValueError(f"unknown backend {backend!r}")


def rescore(q: np.ndarray, db: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's candidate rows (-1 = none) by float64 inner product rounded to float32: (sims,
    ids), highest first, ties to the smaller id, padded to k with (-inf, -1)."""
    nq = len(q)
    sims, ids = _empty(nq, k)
    if nq == 0 or cand.shape[1] == 0:
        return sims, ids
    step = max(1, RESCORE_BYTES // (8 * cand.shape[1] * max(1, db.shape[1])))
    big = np.iinfo(np.int64).max
    for s in range(0, nq, step):
        c = np.asarray(cand[s:s + step], np.int64)
        valid = c >= 0
        sc = np.einsum("bd,bkd->bk", q[s:s + step].astype(np.float64), db[np.maximum(c, 0)].astype(np.float64))
        sc = np.where(valid, sc.astype(np.float32), -np.inf).astype(np.float32)
        order = np.lexsort((np.where(valid, c, big), -sc), axis=1)[:, :k]
        kk = order.shape[1]
        sims[s:s + step, :kk] = np.take_along_axis(sc, order, 1)
        ids[s:s + step, :kk] = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(c, order, 1), -1)
    return sims, ids


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
    cand = candidates(q, db, k + TIE_MARGIN, backend, device_db, query_chunk, db_chunk, dtype)
    return rescore(q, db, cand, k)


def nearest_centroid(x, centroids, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by L2 distance -> (labels int64, squared distances float32), ties to the smaller centroid.

    Candidates: argmin |x - c|^2 = argmax (2 x.c - |c|^2), an inner-product search of [x, 1] against
    [2c, -|c|^2]; then each candidate's distance in float64."""
    x, c = as_f32(x), as_f32(centroids)
    if len(x) == 0 or len(c) == 0:
        return np.full(len(x), -1, np.int64), np.full(len(x), np.inf, np.float32)
    qa = np.hstack([x, np.ones((len(x), 1), np.float32)])
    ca = np.hstack([2 * c, -(c.astype(np.float64) ** 2).sum(1, keepdims=True).astype(np.float32)])
    device = gpu.resolve(device)
    cand = candidates(qa, ca, min(len(c), 2 + TIE_MARGIN // 4), default_backend(device))
    labels = np.empty(len(x), np.int64)
    d2 = np.empty(len(x), np.float32)
    step = max(1, RESCORE_BYTES // (8 * cand.shape[1] * x.shape[1]))
    for s in range(0, len(x), step):
        cc = cand[s:s + step]
        diff = x[s:s + step, None, :].astype(np.float64) - c[np.maximum(cc, 0)].astype(np.float64)
        dist = np.where(cc >= 0, np.einsum("bkd,bkd->bk", diff, diff), np.inf).astype(np.float32)
        order = np.lexsort((np.where(cc >= 0, cc, np.iinfo(np.int64).max), dist), axis=1)[:, 0]
        rows = np.arange(len(cc))
        labels[s:s + step] = cc[rows, order]
        d2[s:s + step] = dist[rows, order]
    return labels, d2
