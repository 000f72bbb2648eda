"""Partitions: the unit of memory of the global steps (dedup's k-NN graph, retrieval's k-NN and k-means).

Pool descriptors and embeddings stay in their per-shard ``descriptors`` files (``part-*.parquet``).  A *partition*
is a contiguous run of those files (in sorted order) whose vectors take at most a third of one worker's memory
budget (``scale.worker_memory_gb``): the other two thirds hold a search index over them (IVF) or the transient
score matrix, query block and the file being read.  Rows are numbered globally in file order, then row order, after
the optional key filter; a partition knows its first global row (``offset``).

Only Parquet metadata is read to plan (the key column too when a key filter applies), and
:func:`read_partition` fills one preallocated float32 array file by file, so no step holds more than one
partition plus one file's Arrow table; nothing concatenates the whole pool.

A pool that fits one partition is a plan of one partition: the global steps have one implementation, whatever the
budget.  :func:`array_plan` makes a plan of an array already in memory (the centroids of a k-means level, a test's
vectors), so the same code serves it too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

#: share of the worker budget that one partition's float32 vectors may take
VECTOR_SHARE = 1 / 3


@dataclass(frozen=True)
class Partition:
    index: int
    files: tuple[str, ...]
    rows: int  # rows after the key filter
    offset: int  # first global row
    dim: int
    data: np.ndarray | None = field(default=None, compare=False, repr=False)  # vectors held in memory (array_plan)

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * 4


@dataclass
class PartitionPlan:
    partitions: list[Partition]
    budget_bytes: int
    keys_filter: pa.Array | None = field(default=None, repr=False)  # pool keys to keep (None = all rows)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.partitions)

    @property
    def dim(self) -> int:
        return self.partitions[0].dim if self.partitions else 0

    def signature(self) -> str:
        """Changes whenever the partitions or their files do (a resumed search checks it)."""
        parts = [[p.index, list(p.files), p.rows, p.offset, p.dim] for p in self.partitions]
        stamps = [[f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for p in self.partitions for f in p.files]
        h = hashlib.sha256(json.dumps([parts, stamps]).encode())
        for p in self.partitions:
            if p.data is not None:
                h.update(np.ascontiguousarray(p.data).tobytes())
        return h.hexdigest()[:16]


def budget_bytes(worker_memory_gb: float) -> int:
    return int(worker_memory_gb * 2**30)


def _file_dim(path: str) -> int:
    """Vector length of a descriptors file, from its first row group (0 when the file is empty)."""
    f = pq.ParquetFile(path)
    for rg in range(f.num_row_groups):
        col = f.read_row_group(rg, columns=["embedding"]).column("embedding")
        for chunk in col.chunks:
            if len(chunk):
                return int(pc.list_value_length(chunk[:1]).to_numpy()[0])
    return 0


def _file_rows(path: str, keys_filter: pa.Array | None) -> int:
    if keys_filter is None:
        return pq.ParquetFile(path).metadata.num_rows
    keys = pq.read_table(path, columns=["key"]).column("key")
    return int(pc.sum(pc.is_in(keys, value_set=keys_filter)).as_py() or 0)


def plan_partitions(paths: Iterable[str | Path], worker_memory_gb: float,
                    keys: Sequence[str] | pa.Array | None = None) -> PartitionPlan:
    """Group the sorted descriptor files into partitions whose vectors fit VECTOR_SHARE of the budget.

    A single file larger than that share is an error naming the file (split the shards smaller)."""
    budget = budget_bytes(worker_memory_gb)
    limit = budget * VECTOR_SHARE
    if keys is None or isinstance(keys, pa.Array):
        keys_filter = keys
    elif isinstance(keys, pa.ChunkedArray):
        keys_filter = keys.combine_chunks()
    else:
        keys_filter = pa.array(list(keys), pa.string())
    files = sorted(str(p) for p in paths)
    dim = 0
    for f in files:
        dim = _file_dim(f)
        if dim:
            break
    parts: list[Partition] = []
    cur: list[str] = []
    cur_rows = offset = 0
    for f in files:
        rows = _file_rows(f, keys_filter)
        if rows * dim * 4 > limit:
            raise ValueError(f"{f} holds {rows} vectors of dim {dim} ({rows * dim * 4 / 2**30:.2f} GiB), more than a "
                             f"third of scale.worker_memory_gb={worker_memory_gb}: raise the budget or write smaller "
                             "shards")
        if cur and (cur_rows + rows) * dim * 4 > limit:
            parts.append(Partition(len(parts), tuple(cur), cur_rows, offset, dim))
            offset += cur_rows
            cur, cur_rows = [], 0
        cur.append(f)
        cur_rows += rows
    if cur:
        parts.append(Partition(len(parts), tuple(cur), cur_rows, offset, dim))
    return PartitionPlan(parts, budget, keys_filter)


def array_plan(x: np.ndarray, partitions: int = 1) -> PartitionPlan:
    """A plan over the rows of an array in memory, cut into `partitions` contiguous partitions (views)."""
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {x.shape}")
    n = len(x)
    bounds = np.linspace(0, n, max(1, min(int(partitions), n or 1)) + 1).round().astype(int)
    parts = [Partition(i, (), int(b - a), int(a), x.shape[1], x[a:b])
             for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a or n == 0]
    return PartitionPlan(parts, 3 * max(x.nbytes, 1))


def read_partition(part: Partition, keys_filter: pa.Array | None = None,
                   with_keys: bool = True) -> tuple[list[str] | None, np.ndarray]:
    """(keys in row order or None, float32 [rows, dim]) of one partition, one file in memory at a time."""
    if part.data is not None:
        return None, part.data
    out = np.empty((part.rows, part.dim), np.float32)
    keys: list[str] | None = [] if with_keys else None
    at = 0
    for f in part.files:
        t = pq.read_table(f, columns=["key", "embedding"])
        if keys_filter is not None:
            t = t.filter(pc.is_in(t["key"], value_set=keys_filter))
        for chunk in t.column("embedding").chunks:
            if not len(chunk):
                continue
            flat = pc.list_flatten(chunk).to_numpy(zero_copy_only=False)
            if flat.size != len(chunk) * part.dim:
                raise ValueError(f"{f}: vectors of different lengths (expected {part.dim})")
            out[at:at + len(chunk)] = flat.reshape(len(chunk), part.dim)
            at += len(chunk)
        if keys is not None:
            keys += t.column("key").to_pylist()
        del t
    if at != part.rows:
        raise RuntimeError(f"partition {part.index}: read {at} rows, planned {part.rows} (files changed?)")
    return keys, out


def iter_query_blocks(plan: PartitionPlan, block: int):
    """(global first row, float32 [<= block, dim]) over the whole plan, one partition in memory at a time."""
    for part in plan.partitions:
        _, vecs = read_partition(part, plan.keys_filter, with_keys=False)
        for s in range(0, part.rows, block):
            yield part.offset + s, vecs[s:s + block]
        del vecs


def plan_keys(plan: PartitionPlan) -> list[str]:
    """Every key of the plan in global row order (O(rows) strings: for outputs keyed by row)."""
    keys: list[str] = []
    for part in plan.partitions:
        for f in part.files:
            k = pq.read_table(f, columns=["key"]).column("key")
            if plan.keys_filter is not None:
                k = k.filter(pc.is_in(k, value_set=plan.keys_filter))
            keys += k.to_pylist()
    return keys
