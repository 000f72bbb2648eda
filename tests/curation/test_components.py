"""Vectorised connected components against scipy, and the exact k-NN helper against brute force."""

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_cc

from curation.engine.components import (
    component_sizes,
    connected_components,
    kept_of_component,
    pick_one_per_component,
)
from curation.engine.knn import knn_search
from tests.tolerance import assert_close


def _same_partition(a, b):
    # two labelings describe the same partition iff the pair mapping is a bijection
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("n,m,seed", [(2000, 1500, 0), (5000, 4900, 1), (300, 3000, 2), (10, 0, 3)])
def test_matches_scipy_on_random_graphs(n, m, seed):
    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
    labels = connected_components(n, src, dst)
    g = coo_matrix((np.ones(m), (src, dst)), shape=(n, n))
    ncomp, ref = scipy_cc(g, directed=False)
    assert _same_partition(labels, ref)
    assert len(np.unique(labels)) == ncomp
    # the label is the smallest node of the component
    for c in np.unique(labels)[:50]:
        assert c == np.flatnonzero(labels == c).min()


def test_long_path_and_order_independence():
    n = 10_000
    perm = np.random.default_rng(0).permutation(n)
    src, dst = perm[:-1], perm[1:]  # one long path in random node order
    labels = connected_components(n, src, dst)
    assert (labels == 0).all()
    rev = connected_components(n, dst[::-1], src[::-1])
    assert np.array_equal(labels, rev)


def test_pick_one_per_component_and_sizes():
    labels = connected_components(6, [0, 1, 3], [1, 2, 4])  # {0,1,2} {3,4} {5}
    assert component_sizes(labels).tolist() == [3, 3, 3, 2, 2, 1]
    keep = pick_one_per_component(labels, np.array([5, 1, 1, 0, 0, 9]))
    assert keep.tolist() == [False, True, False, True, False, True]  # ties -> smallest index
    assert kept_of_component(labels, keep).tolist() == [1, 1, 1, 3, 3, 5]


def test_knn_exact_against_brute_force():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=(37, 16)).astype(np.float32)
    ref = q @ db.T
    ref_ids = np.argsort(-ref, 1)[:, :5]
    for backend in ("faiss", "torch"):
        sims, ids = knn_search(q, db, 5, device="cpu", backend=backend, query_chunk=10, db_chunk=128)
        assert sims.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (37, 5)
        assert np.array_equal(ids, ref_ids), backend
        # 16-term fp32 dots; sum |q_i d_i| <= |q| |d| (Cauchy-Schwarz) bounds the terms' scale
        scale = float(np.linalg.norm(q, axis=1).max() * np.linalg.norm(db, axis=1).max())
        assert_close(sims, np.take_along_axis(ref, ref_ids, 1), n_terms=16, dtype=np.float32, magnitude=scale)
    # fewer database rows than k: padded with -1 / -inf
    sims, ids = knn_search(q[:2], db[:3], 5, device="cpu")
    assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
    sims_t, ids_t = knn_search(q[:2], db[:3], 5, device="cpu", backend="torch")
    assert np.array_equal(ids, ids_t)
