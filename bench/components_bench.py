"""Time the vectorised connected components (curation.engine.components) on a random sparse graph, CPU.

    python bench/components_bench.py --nodes 5000000 --edges 10000000

Prints nodes, edges, components, rounds-free wall time, and scipy.sparse.csgraph's time on the same graph for
reference (--no-scipy to skip it).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from curation.engine.components import connected_components


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=5_000_000)
    ap.add_argument("--edges", type=int, default=10_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-scipy", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    src = rng.integers(0, args.nodes, args.edges, dtype=np.int64)
    dst = rng.integers(0, args.nodes, args.edges, dtype=np.int64)
    t0 = time.perf_counter()
    labels = connected_components(args.nodes, src, dst)
    t = time.perf_counter() - t0
    ncomp = len(np.unique(labels))
    print(f"lvd connected_components: {args.nodes:,} nodes, {args.edges:,} edges -> {ncomp:,} components "
          f"in {t:.2f} s ({args.edges / t / 1e6:.1f} M edges/s), CPU")
    if not args.no_scipy:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components as scipy_cc

        t0 = time.perf_counter()
        g = coo_matrix((np.ones(args.edges, np.int8), (src, dst)), shape=(args.nodes, args.nodes)).tocsr()
        n2, _ = scipy_cc(g, directed=False)
        t2 = time.perf_counter() - t0
        print(f"scipy csgraph (incl. CSR build): {n2:,} components in {t2:.2f} s")
        assert n2 == ncomp


if __name__ == "__main__":
    main()
