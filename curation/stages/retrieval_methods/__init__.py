"""Retrieval methods: how the retrieve stage chooses the images of one set, one module each.

A method is a :class:`Method` with one call, ``select(pool, anchors, settings) -> Selection``: `pool` the pool images
the stage received (:class:`Pool`), `anchors` the set (:class:`Anchors`: its config section and, lazily, its
vectors or its image keys), `settings` the ``retrieve`` section.  Its class says what the rest of lvd needs to know
without running it (``anchor_set``: configured as an anchor set's ``method``; ``embeds_anchors``: the embed stage
embeds its anchor set; ``reads_pool``; ``indexed``: it searches with ``retrieve.index``, the others exactly;
``neighbors``: it searches k nearest neighbours, written to ``neighbors.parquet``).

:data:`METHODS` is the one dispatch table: the config's anchor-set methods (:func:`anchor_set_methods`), the
retrieve stage, the embed stage and the report all read it.  The engine's algorithms stay in
:mod:`curation.engine.retrieval` and :mod:`curation.engine.partitioned_pool`; the methods call them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Selection:
    """What a method chose for one set."""

    rows: pa.Table  #: the selected images (schema ``selection``)
    anchors: int  #: anchors in the set
    retrieved: int  #: (anchor, image) pairs or images the method retrieved
    similarities: Any = ()  #: the similarities behind the selection, for the set's quantiles
    index: str | None = None  #: the search the method ran (``exact``, ``ivf_pq``, ``kmeans``...)
    recall: float | None = None  #: recall@k against exact search (indexed methods only)
    neighbors: pa.Table | None = None  #: every searched neighbour (schema ``neighbors``), for methods that search
    clusters: pa.Table | None = None  #: per-cluster counts (schema ``cluster_stats``), for methods that cluster
    details: dict = field(default_factory=dict)  #: method-specific counts for the set's summary


@dataclass
class Pool:
    """The pool images the retrieve stage received."""

    keys: np.ndarray  #: keys (object array), row order of `vectors`
    vectors: Any  #: a :class:`curation.engine.partitioned_pool.PartitionedPool` (``len``, ``search``, rows by index)
    urls: dict[str, str]
    seed: int
    #: the pool's k-means with C clusters, cached and shared by the sets that use the same C: (centroids, labels)
    kmeans: Callable[[int], tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return len(self.keys)

    def selection(self, idx, anchor_set: str, **columns) -> pa.Table:
        """Selection rows of the pool images at rows `idx` (source ``pool``), with `columns` beside."""
        keys = self.keys[np.asarray(idx, np.int64)].tolist()
        return selection_table({"key": keys, "source": ["pool"] * len(keys), "url": [self.urls.get(k) for k in keys],
                                "anchor_set": [anchor_set] * len(keys), **columns}, len(keys))


@dataclass(frozen=True)
class Anchors:
    """One set: its name, its config section (an anchor set's, or ``retrieve.balanced``) and its embeddings."""

    name: str
    config: Any
    vector_files: tuple[Path, ...] = ()

    def vectors(self) -> tuple[list[str], np.ndarray]:
        """(keys, vectors) of the set as the embed stage wrote them."""
        from curation.data.vectors import load_descriptors

        return load_descriptors(list(self.vector_files))

    def image_keys(self) -> list[str]:
        """The keys of the set's images, read from the set itself."""
        from curation.data.samples import iter_image_set

        return [s.key for s in iter_image_set(self.config.path, self.config.format)]


class Method:
    name: ClassVar[str]
    anchor_set: ClassVar[bool] = True
    embeds_anchors: ClassVar[bool] = True
    reads_pool: ClassVar[bool] = True
    indexed: ClassVar[bool] = False
    neighbors: ClassVar[bool] = False

    def select(self, pool: Pool | None, anchors: Anchors, settings) -> Selection:
        raise NotImplementedError


def selection_table(rows: dict, n: int) -> pa.Table:
    """A selection table of `n` rows from the columns in `rows` (a missing column is null)."""
    def col(name, typ):
        v = rows.get(name)
        return pa.array([None] * n if v is None else list(v), typ)

    return pa.table({
        "key": col("key", pa.string()), "source": col("source", pa.string()), "url": col("url", pa.string()),
        "anchor_set": col("anchor_set", pa.string()), "anchor_key": col("anchor_key", pa.string()),
        "rank": col("rank", pa.int32()), "similarity": col("similarity", pa.float32()),
        "cluster": col("cluster", pa.int64()),
    })


#: every retrieval method by name -> its module (imported when first used)
METHODS = {
    "sample": "sample:SampleMethod",
    "cluster": "cluster:ClusterMethod",
    "balanced": "balanced:BalancedMethod",
    "as_is": "as_is:AsIsMethod",
}


def method(name: str) -> Method:
    """The method `name` (a ValueError naming the known ones otherwise)."""
    if name not in METHODS:
        raise ValueError(f"unknown retrieval method {name!r}; known: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


def anchor_set_methods() -> tuple[str, ...]:
    """The methods an anchor set may name (``retrieve.anchor_sets[].method``)."""
    return tuple(n for n in METHODS if method(n).anchor_set)
