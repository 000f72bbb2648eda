"""Synthetic pools for the scale tests and bench/scale_bench.py: planted copy clusters with known nearest neighbours,
written as per-shard ``descriptors`` files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from curation.pipeline.storage import write_table
from curation.data.vectors import descriptor_table


def planted_pool(n: int, d: int, n_sources: int, copies: int, seed: int = 0, noise: float = 0.05):
    """Unit vectors: `n_sources` originals each with `copies` near copies (cosine ~ 1 - noise^2 d / 2), the rest
    independent random directions.  Returns (vectors float32 [n, d], group int64 [n]: the original's row for a
    copy or an original, -1 for an independent vector).  Rows are shuffled so copies spread over shards."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    group = np.full(n, -1, np.int64)
    planted = n_sources * (copies + 1)
    for c in range(copies):
        rows = n_sources * (c + 1) + np.arange(n_sources)
        x[rows] = x[:n_sources] / np.linalg.norm(x[:n_sources], axis=1, keepdims=True) * np.sqrt(d) \
            + noise * np.sqrt(d) * rng.standard_normal((n_sources, d)).astype(np.float32)
    group[:planted] = np.tile(np.arange(n_sources), copies + 1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    inv = np.empty(n, np.int64)
    inv[perm] = np.arange(n)
    g = group[perm]
    return x[perm], np.where(g >= 0, inv[np.maximum(g, 0)], -1)


def write_shards(x: np.ndarray, out: Path, rows_per_shard: int, prefix: str = "k") -> list[Path]:
    """Per-shard descriptor files part-NNNNN.parquet; keys are zero-padded row numbers (sorted = row order)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(range(0, len(x), rows_per_shard)):
        keys = [f"{prefix}{r:09d}" for r in range(s, min(s + rows_per_shard, len(x)))]
        p = out / f"part-{i:05d}.parquet"
        write_table(p, descriptor_table(keys, x[s:s + rows_per_shard], "pool"), "descriptors")
        paths.append(p)
    return paths
