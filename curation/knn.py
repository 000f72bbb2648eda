"""Exact k-nearest-neighbour search by inner product (cosine similarity on L2-normalised vectors).

:func:`knn_search` is shared by the dedup and retrieve stages.  Backends:

* ``faiss`` - ``faiss.IndexFlatIP`` (exact; multi-threaded BLAS on CPU).  The default on CPU.
* ``torch`` - chunked matmul + ``topk`` on a torch device, merging the per-chunk top-k of the database.  The
  default on CUDA (faiss-gpu is not in our lock file); exact in fp32 (TF32 is switched off for the call), and
  memory-bounded by ``query_chunk`` x ``db_chunk``.

Both return float32 similarities and int64 database row ids of shape (n_queries, k), best first.  When the
database has fewer than k rows, the missing columns hold id -1 and similarity -inf.
"""

from __future__ import annotations

import numpy as np


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:  # pragma: no cover - torch is a core dependency
            return "cpu"
    return device


def _as_f32(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {x.shape}")
    return x


def _pad(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if sims.shape[1] == k:
        return sims, ids
    nq = sims.shape[0]
    s = np.full((nq, k), -np.inf, dtype=np.float32)
    i = np.full((nq, k), -1, dtype=np.int64)
    s[:, : sims.shape[1]] = sims
    i[:, : ids.shape[1]] = ids
    return s, i


def _knn_faiss(q: np.ndarray, db: np.ndarray, k: int, query_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    kk = min(k, db.shape[0])
    sims = np.empty((q.shape[0], kk), np.float32)
    ids = np.empty((q.shape[0], kk), np.int64)
    for s in range(0, q.shape[0], query_chunk):
        d, i = index.search(q[s : s + query_chunk], kk)
        sims[s : s + len(d)], ids[s : s + len(d)] = d, i
    # faiss pads with -1 / -3.4e38 when it finds fewer than k; normalise to -inf
    sims[ids < 0] = -np.inf
    return sims, ids


def _knn_torch(
    q: np.ndarray, db: np.ndarray, k: int, device: str, query_chunk: int, db_chunk: int, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    import torch

    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    dev = torch.device(device)
    kk = min(k, db.shape[0])
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32 if dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 products
    try:
        # the database goes to the device once, in chunks of db_chunk rows
        db_parts = [torch.from_numpy(db[s : s + db_chunk]).to(dev, tdtype) for s in range(0, db.shape[0], db_chunk)]
        offsets = np.cumsum([0] + [p.shape[0] for p in db_parts])
        sims = np.empty((q.shape[0], kk), np.float32)
        ids = np.empty((q.shape[0], kk), np.int64)
        with torch.inference_mode():
            for s in range(0, q.shape[0], query_chunk):
                qc = torch.from_numpy(q[s : s + query_chunk]).to(dev, tdtype)
                best_s = best_i = None
                for off, part in zip(offsets[:-1], db_parts):
                    sc = (qc @ part.T).float()
                    ps, pi = torch.topk(sc, min(kk, part.shape[0]), dim=1)
                    pi = pi + int(off)
                    if best_s is None:
                        best_s, best_i = ps, pi
                    else:
                        cat_s = torch.cat([best_s, ps], 1)
                        cat_i = torch.cat([best_i, pi], 1)
                        best_s, sel = torch.topk(cat_s, kk, dim=1)
                        best_i = torch.gather(cat_i, 1, sel)
                sims[s : s + qc.shape[0]] = best_s.cpu().numpy()
                ids[s : s + qc.shape[0]] = best_i.cpu().numpy()
    finally:
        if prev_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return sims, ids


def knn_search(
    queries,
    database,
    k: int,
    device: str = "auto",
    backend: str = "auto",
    query_chunk: int = 65_536,
    db_chunk: int = 1_048_576,
    dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` inner-product neighbours of each query row in `database`.

    Returns (sims float32 [nq, k], ids int64 [nq, k]), best first.  `backend`: 'auto' (faiss on CPU, torch on
    CUDA), 'faiss' or 'torch'.  `dtype` applies to the torch path only ('float16'/'bfloat16' trade exactness for
    speed on GPUs; the default is exact)."""
    q, db = _as_f32(queries), _as_f32(database)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"dimension mismatch: queries {q.shape[1]}, database {db.shape[1]}")
    if k < 1:
        raise ValueError("k must be >= 1")
    if q.shape[0] == 0 or db.shape[0] == 0:
        return _pad(np.empty((q.shape[0], 0), np.float32), np.empty((q.shape[0], 0), np.int64), k)
    device = resolve_device(device)
    if backend == "auto":
        backend = "torch" if device.startswith("cuda") else "faiss"
    if backend == "faiss":
        if device.startswith("cuda"):
            raise ValueError("the faiss backend here is CPU-only (faiss-cpu); use backend='torch' on CUDA")
        sims, ids = _knn_faiss(q, db, k, query_chunk)
    elif backend == "torch":
        sims, ids = _knn_torch(q, db, k, device, query_chunk, db_chunk, dtype)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return _pad(sims, ids, k)
