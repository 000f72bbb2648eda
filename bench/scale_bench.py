"""Scale benchmark of the partitioned dedup graph (pool x pool k-NN + edges + components) on Ray searcher actors.

    python bench/scale_bench.py --sizes 50000 100000 200000 --index exact ivf_flat --rows-per-partition 25000

For each pool size and index: a synthetic pool (planted copy clusters, ``--dim`` dims, shards of
``--shard-rows``) is written as descriptor files; a private local Ray head (``--cpus`` CPUs, stopped afterwards,
never ``ray stop``) runs :func:`curation.distributed_knn.partitioned_knn` with a fixed worker budget that holds
``--rows-per-partition`` vectors per partition, so partitions grow with the pool and the budget stays the same.
One JSON line per run: seconds (search, components), partitions, waves, peak RSS of the largest searcher
(ru_maxrss reported by the actor), of the driver, the budget, and recall@k against exact search on a query sample
(exact runs: 1.0 by construction; IVF: measured).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.distributed_knn import Placement, partitioned_knn, read_block  # noqa: E402
from curation.edge_components import edge_batches, streamed_components  # noqa: E402
from curation.local_cluster import LocalRayHead  # noqa: E402
from curation.partitions import VECTOR_SHARE, plan_partitions  # noqa: E402
from curation.retrieval import recall_at_k  # noqa: E402
from curation.synthetic_pool import planted_pool, write_shards  # noqa: E402


def _make_pool(n: int, dim: int, shards: Path, shard_rows: int, sample: np.ndarray, sample_path: Path) -> None:
    """In a child process, so that the driver's peak RSS is the pipeline's, not the generator's."""
    x, _ = planted_pool(n, dim, n_sources=n // 50, copies=2, seed=n)
    write_shards(x, shards, shard_rows)
    np.save(sample_path, x[sample])


def _sample_ids(run, sample: np.ndarray) -> np.ndarray:
    """The result rows of the sampled queries, block by block (never the whole n x k table)."""
    out = []
    for p in run.blocks:
        start, _, ids = read_block(p)
        mine = sample[(sample >= start) & (sample < start + len(ids))]
        out.append(ids[mine - start])
    return np.concatenate(out)


def run_one(n: int, index: str, args, work: Path) -> dict:
    import multiprocessing as mp

    shards = work / f"pool-{n}"
    sample = np.sort(np.random.default_rng(0).choice(n, min(args.recall_sample, n), replace=False))
    child = mp.get_context("spawn").Process(target=_make_pool, args=(n, args.dim, shards, args.shard_rows, sample,
                                                                      work / "sample.npy"))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError("generating the synthetic pool failed")
    paths = sorted(shards.glob("part-*.parquet"))
    q_sample = np.load(work / "sample.npy")
    budget_gb = args.rows_per_partition * args.dim * 4 / VECTOR_SHARE / 2**30
    plan = plan_partitions(paths, budget_gb)
    pl = Placement(use_ray=True, device="cpu", index=index, nprobe=args.nprobe)
    out = work / f"knn-{n}-{index}"
    t0 = time.perf_counter()
    run = partitioned_knn(plan, plan, args.k, out, placement=pl, exclude_self=True, edge_threshold=args.threshold,
                          block=args.block)
    t_search = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = streamed_components(n, edge_batches(run.edges))
    t_cc = time.perf_counter() - t0
    # recall on the sample: its rows of the run against an exact search of the sample over the whole pool
    ids = _sample_ids(run, sample)
    exact = partitioned_knn(q_sample, plan, args.k + 1, work / f"exact-{n}-{index}",
                            placement=Placement(use_ray=True, device="cpu"), block=args.block)
    _, eids = exact.results()
    eids = np.stack([row[row != s][:args.k] for row, s in zip(eids, sample)])
    recall = recall_at_k(ids, eids)
    peak = max(i["peak_rss_bytes"] for i in run.worker_infos)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / f"exact-{n}-{index}", ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    return {
        "pool": n, "dim": args.dim, "k": args.k, "index": run.index if index == "exact" else
        sorted({i["index"] for i in run.worker_infos})[0], "partitions": run.partitions, "waves": run.waves,
        "searchers": run.searchers, "search_s": round(t_search, 2),
        "components_s": round(t_cc, 3), "queries_per_s": round(n / t_search, 1),
        "components": int(np.unique(labels).size), "budget_mb": round(budget_gb * 1024, 1),
        "partition_mb": round(max(p.nbytes for p in plan.partitions) / 2**20, 1),
        "peak_rss_worker_mb": round(peak / 2**20, 1),
        "peak_rss_driver_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "recall_at_k": round(recall, 4), "recall_sample": len(sample), "cpus": args.cpus,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    ap.add_argument("--index", nargs="+", default=["exact", "ivf_flat"], choices=["exact", "ivf_flat", "ivf_pq"])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--rows-per-partition", type=int, default=25_000)
    ap.add_argument("--shard-rows", type=int, default=5_000)
    ap.add_argument("--block", type=int, default=16_384)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--recall-sample", type=int, default=1000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", type=Path, help="append the JSON lines to this file too")
    args = ap.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    head = LocalRayHead(num_cpus=args.cpus)  # bound to loopback: one node
    try:
        head.start()
        ray.init(address=head.address, logging_level="WARNING")
        for n in args.sizes:
            for index in args.index:
                row = run_one(n, index, args, work)
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
    finally:
        ray.shutdown()
        head.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
