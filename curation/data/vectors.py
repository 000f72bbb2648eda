"""Vector tables shared by the stages that write or read vectors (sscd, dedup, embed, retrieve, shards, report).

* Descriptor tables (schema ``descriptors``: SSCD descriptors and embeddings alike) hold one L2-normalised float32
  vector per key; :func:`descriptor_table` writes one, :func:`load_descriptors` / :func:`table_vectors` are the one
  reader, converting chunk by chunk to ``(keys, float32 [N, D])`` (a whole pool's vectors exceed the int32 list
  offsets that combining the chunks into one list array would need: 2**31 floats, ~4.2M x 512-d).
(k-NN search lives in :mod:`curation.engine.knn`, the one search of every global step.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.pipeline.storage import read_table


def descriptor_table(keys: Sequence[str], vectors: np.ndarray, source: str) -> pa.Table:
    """(keys, float32 [N, D]) -> a ``descriptors`` table sorted by key (one part holds well under 2**31 floats).

    N may be 0 (a unit whose images were all dropped earlier): the table is then empty."""
    keys = list(keys)
    n = len(keys)
    vectors = np.asarray(vectors, dtype=np.float32)
    d = vectors.shape[-1] if vectors.ndim == 2 else (vectors.size // n if n else 0)
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable") if n else np.zeros(0, np.int64)
    vectors = np.ascontiguousarray(vectors.reshape(n, d)[order])
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * d, pa.int32())
    emb = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float32()), type=pa.list_(pa.float32()))
    return pa.table({"key": pa.array([keys[i] for i in order], pa.string()),
                     "source": pa.array([source] * n, pa.string()), "embedding": emb})


def table_vectors(t: pa.Table) -> np.ndarray:
    """The ``embedding`` column as float32 [N, D], chunk by chunk (a whole pool exceeds int32 list offsets)."""
    parts = []
    d = None
    for chunk in t.column("embedding").chunks:
        if len(chunk) == 0:
            continue
        lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
        d = int(lengths[0]) if d is None else d
        if (lengths != d).any():
            raise ValueError("descriptor table holds vectors of different lengths")
        parts.append(pc.list_flatten(chunk).to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d))
    if not parts:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def load_descriptors(paths: Iterable[Path], keys: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Concatenate descriptor parts -> (keys, float32 [N, D]), optionally restricted to `keys` (each part is
    filtered as it is read, so memory follows the rows kept), sorted by key."""
    wanted = pa.array(list(keys), pa.string()) if keys is not None else None
    tables = []
    for p in sorted(map(Path, paths)):
        t = read_table(p, "descriptors")
        if wanted is not None:
            t = t.filter(pc.is_in(t["key"], value_set=wanted))
        if t.num_rows:
            tables.append(t)
    if not tables:
        return [], np.zeros((0, 0), np.float32)
    t = pa.concat_tables(tables)
    order = pc.sort_indices(t["key"]).to_numpy()
    keys_sorted = np.asarray(t["key"].to_pylist(), dtype=object)[order].tolist()
    return keys_sorted, table_vectors(t)[order]
