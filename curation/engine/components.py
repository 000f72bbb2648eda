"""Connected components of a large sparse graph, vectorised (no Python loop per node or edge).

The dedup graphs have up to hundreds of millions of nodes and (k = 64 neighbours, few above the threshold) a few
edges per node, so a per-edge union-find in Python is out of the question.  :func:`connected_components` is the
array form of a disjoint-set forest (Shiloach-Vishkin style "hook and compress"):

1. every node starts as its own root, ``label[i] = i``;
2. *hook*: for every edge whose endpoints have different roots, the larger root points to the smaller one
   (``np.minimum.at`` - several edges hooking the same root keep the smallest);
3. *compress*: pointer jumping ``label = label[label]`` until every node points at its root;
4. edges inside one component are dropped and the rounds repeat until no edge joins two roots.

Labels only ever decrease and every round merges at least one pair of roots, so it terminates; on random and
nearest-neighbour graphs it takes a handful of rounds (each O(n + edges)).  The component id of a node is the
smallest node index in its component, which makes the result independent of edge order (deterministic).

Memory: int32 labels when n < 2**31, else int64; edges are copied once.  ``bench/components_bench.py`` times it.
"""

from __future__ import annotations

import numpy as np


def _compress(label: np.ndarray) -> np.ndarray:
    """Pointer jumping until every node points at a root (label[label] == label)."""
    while True:
        nxt = label[label]
        if np.array_equal(nxt, label):
            return label
        label = nxt


def connected_components(n: int, src, dst) -> np.ndarray:
    """Component label of each of `n` nodes for the undirected edges (src[i], dst[i]).

    The label is the smallest node index of the component.  Self-loops and repeated edges are fine."""
    dtype = np.int32 if n < 2**31 - 1 else np.int64
    src = np.asarray(src).astype(dtype, copy=False).ravel()
    dst = np.asarray(dst).astype(dtype, copy=False).ravel()
    if src.shape != dst.shape:
        raise ValueError("src and dst must have the same length")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    label = np.arange(n, dtype=dtype)
    while src.size:
        lu, lv = label[src], label[dst]
        live = lu != lv
        if not live.all():
            src, dst, lu, lv = src[live], dst[live], lu[live], lv[live]
            if not src.size:
                break
        lo = np.minimum(lu, lv)
        hi = np.maximum(lu, lv)
        # hi and lo are roots (label is compressed); hook each hi root onto the smallest lo that reaches it
        np.minimum.at(label, hi, lo)
        label = _compress(label)
    return label


def component_sizes(labels: np.ndarray) -> np.ndarray:
    """Size of the component of each node."""
    counts = np.bincount(labels, minlength=len(labels))
    return counts[labels]


def first_of_equal(values: np.ndarray) -> np.ndarray:
    """For each row of `values` (1-d: each value), the index of the first row equal to it: a component label
    (smallest member index) for "same value" groups."""
    n = len(values)
    if n == 0:
        return np.zeros(0, np.int64)
    _, inv = np.unique(values, axis=0, return_inverse=True)
    inv = inv.ravel()
    first = np.full(inv.max() + 1, n, np.int64)
    np.minimum.at(first, inv, np.arange(n))
    return first[inv]


def pick_one_per_component(labels: np.ndarray, priority) -> np.ndarray:
    """Boolean mask keeping, in each component, the node with the smallest `priority` (ties: smallest index).

    `priority` is one sortable per-node array (e.g. -resolution) or a sequence of them, compared in order (the
    first decides, the next breaks its ties, and so on)."""
    n = len(labels)
    keys = [priority] if isinstance(priority, np.ndarray) else list(priority)
    order = np.lexsort((np.arange(n), *keys[::-1], labels))  # by component, then priorities, then index
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True
    return keep


def kept_of_component(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """For each node, the index of its component's kept node (-1 if the component keeps none)."""
    rep = np.full(int(labels.max()) + 1 if len(labels) else 0, -1, dtype=np.int64)
    idx = np.flatnonzero(keep)
    rep[labels[idx]] = idx
    return rep[labels]
