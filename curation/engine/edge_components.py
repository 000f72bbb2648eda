"""Connected components of a graph whose edges live in Parquet files (one per query block), with memory
proportional to the number of nodes, never to the number of edges.

Edges are read in batches of about ``batch_edges``; each batch is folded into the running labels with the
vectorised hook-and-compress of :func:`curation.engine.components.connected_components`: with ``label`` the current root
(smallest node) of every node, the batch's edges between roots (label[src], label[dst]) are labelled over the n
nodes, and ``label = batch_label[label]`` composes the two.  Roots only decrease, so the result is the smallest node
index of each component, exactly as a single call over all edges would give (independent of batch order).

Each batch costs O(nodes) besides its edges, so batches should hold about as many edges as there are nodes (memory:
int64 labels, 8 bytes per node, plus 16 bytes per batched edge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq

from curation.engine.components import connected_components


def edge_batches(paths: Iterable[str | Path], src_offset: int = 0, dst_offset: int = 0,
                 batch_edges: int = 4_000_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(src, dst) int64 arrays from edge files (columns src, dst), each batch about `batch_edges` long; the
    offsets place the files' rows among the graph's nodes (e.g. evaluation nodes after the pool's)."""
    srcs, dsts, held = [], [], 0
    for p in paths:
        t = pq.read_table(p, columns=["src", "dst"])
        if not t.num_rows:
            continue
        srcs.append(t["src"].to_numpy() + src_offset)
        dsts.append(t["dst"].to_numpy() + dst_offset)
        held += t.num_rows
        if held >= batch_edges:
            yield np.concatenate(srcs), np.concatenate(dsts)
            srcs, dsts, held = [], [], 0
    if srcs:
        yield np.concatenate(srcs), np.concatenate(dsts)


def streamed_components(n: int, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Component label (smallest node index of the component) of each of `n` nodes, int64, for the undirected
    edges of all `batches`."""
    label = np.arange(n, dtype=np.int64)
    for src, dst in batches:
        src = np.asarray(src, np.int64)
        dst = np.asarray(dst, np.int64)
        if not src.size:
            continue
        batch_label = connected_components(n, label[src], label[dst])
        label = np.asarray(batch_label, np.int64)[label]
    return label
