"""Scale benchmark of the partitioned dedup graph (pool x pool k-NN + edges + components) on Ray searcher actors.

    python bench/scale_bench.py --sizes 50000 100000 200000 --index exact ivf_flat --rows-per-partition 25000

For each pool size and index: a synthetic pool (planted copy clusters, ``--dim`` dims, shards of
``--shard-rows``) is written as descriptor files; a private local Ray head (``--cpus`` CPUs, stopped afterwards,
never ``ray stop``) runs :func:`curation.engine.distributed_knn.partitioned_knn` with a fixed worker budget that holds
``--rows-per-partition`` vectors per partition, so partitions grow with the pool and the budget stays the same.
One JSON line per run: seconds (search, components), partitions, waves, peak RSS of the largest searcher
(its own VmHWM, reported by the actor), of the driver, the budget, and recall@k against exact search on a query sample
(exact runs: 1.0 by construction; IVF: measured).  ``--score-dtype float16|bfloat16`` scores exact search's
candidates by a torch matmul in that precision: ``score_recall`` is its recall@k per partition, measured by the
searchers on the first 64 queries of every block (``score_recall_sample`` true neighbours), and ``recall_at_k``
that of the merged result.

    python bench/scale_bench.py --compare --dedup-size 20000 --dedup-dim 512

``--compare`` (no Ray; each measurement in its own spawned process, whose peak RSS is its VmHWM from
/proc/self/status) prints the engine beside its plain baselines, one JSON line each: dedup's graph + components
(the engine on 1 and 8 partitions of the same shard files) against a plain ``faiss.IndexFlatIP`` k-NN +
``scipy.sparse.csgraph.connected_components`` script (same components checked); the engine's k-means against
``faiss.Kmeans`` (time and objective, same k-means++ seeds); hierarchical k-means + balanced sampling at a fixed
per-partition budget as the pool doubles (peak memory of the process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.engine.distributed_knn import Placement, partitioned_knn, peak_rss_bytes, read_block  # noqa: E402
from curation.engine.edge_components import edge_batches, streamed_components  # noqa: E402
from curation.cluster.local_cluster import LOOPBACK_ENV, LocalRayHead  # noqa: E402
from curation.engine.partitions import VECTOR_SHARE, plan_partitions  # noqa: E402
from curation.engine.retrieval import recall_at_k  # noqa: E402
from curation.config import ScaleConfig  # noqa: E402
from tests.synthetic_pool import planted_pool, write_shards  # noqa: E402


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
    pl = Placement(use_ray=True, device="cpu", index=index, nprobe=args.nprobe, score_dtype=args.score_dtype)
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
    peak = max(i["peak_rss_bytes"] for i in run.worker_infos)  # each searcher's own VmHWM
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
        "peak_rss_driver_mb": round(peak_rss_bytes() / 2**20, 1),
        "recall_at_k": round(recall, 4), "recall_sample": len(sample), "cpus": args.cpus,
        "score_dtype": args.score_dtype, "score_recall": round(run.recall, 4),
        "score_recall_sample": run.recall_sample,
    }


# ------------------------------------------------------------------------------------------------ --compare
def _emit(row: dict, out: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def _in_child(fn, *args) -> dict:
    """fn(*args) -> dict in a spawned process, with that process's VmHWM added."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_main, args=(q, fn, args))
    p.start()
    row = q.get()
    p.join()
    if isinstance(row, str):
        raise RuntimeError(row)
    return row


def _child_main(q, fn, args) -> None:
    import faiss  # noqa: F401 - imported before any timing, as in a running stage worker
    import torch  # noqa: F401

    from curation.engine.distributed_knn import peak_rss_bytes

    try:
        row = fn(*args)
        row["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
        q.put(row)
    except Exception as e:  # noqa: BLE001 - reported by the parent
        q.put(f"{type(e).__name__}: {e}")


def _dedup_engine(paths, n, d, k, thr, parts, block) -> dict:
    from curation.engine.partitioned_dedup import partitioned_dedup_graph

    budget = (n // parts + 1) * d * 4 / VECTOR_SHARE / 2**30
    plan = plan_partitions(paths, budget)
    work = Path(tempfile.mkdtemp(prefix="dedup-bench-"))
    t0 = time.perf_counter()
    g = partitioned_dedup_graph(plan, np.zeros((0, d), np.float32), k, thr, thr, work, Placement(), block=block)
    t = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    np.save(Path(paths[0]).parent / f"labels-{parts}.npy", g["labels"])
    return {"bench": "dedup", "impl": "engine", "partitions": len(plan.partitions), "query_block": block, "pool": n,
            "dim": d, "k": k, "seconds": round(t, 2), "components": int(np.unique(g["labels"]).size)}


def _dedup_plain(paths, n, d, k, thr) -> dict:
    import faiss
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from curation.data.vectors import load_descriptors

    t0 = time.perf_counter()  # from the same shard files as the engine, to the same components
    _, x = load_descriptors(paths)
    index = faiss.IndexFlatIP(d)
    index.add(x)
    sims, ids = index.search(x, k + 1)
    mask = (sims > thr) & (ids >= 0) & (ids != np.arange(n)[:, None])
    src = np.repeat(np.arange(n), k + 1)[mask.ravel()]
    graph = coo_matrix((np.ones(len(src), np.int8), (src, ids[mask])), shape=(n, n))
    nc, labels = connected_components(graph, directed=False)
    t = time.perf_counter() - t0
    np.save(Path(paths[0]).parent / "labels-plain.npy", labels)
    return {"bench": "dedup", "impl": "faiss.IndexFlatIP+scipy", "pool": n, "dim": d, "k": k,
            "seconds": round(t, 2), "components": int(nc)}


def _kmeans_pair(n, d, k, niter, seed) -> dict:
    """The engine's k-means (k-means++ seeding included) beside faiss.Kmeans as a user runs it (its own random
    init), and beside faiss.Kmeans started from the engine's seeds (the same Lloyd steps: equal objectives check the
    engine's arithmetic; that run's time leaves the seeding out)."""
    import faiss

    from curation.engine.distributed_kmeans import kmeans_pp_seed, seed_sample_rows
    from curation.engine.knn import nearest_centroid
    from curation.engine.partitioned_pool import array_pool

    x, _ = planted_pool(n, d, n_sources=n // 50, copies=2, seed=seed)
    t0 = time.perf_counter()
    with array_pool(x) as pool:
        res = pool.kmeans(k, niter, seed)
    t_engine = time.perf_counter() - t0

    def faiss_run(init):
        km = faiss.Kmeans(d, k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=256)
        t0 = time.perf_counter()
        km.train(x, init_centroids=init)
        t = time.perf_counter() - t0
        km.index.search(x, 1)  # what a user adds for every row's cluster, which the engine's result holds
        t_labels = time.perf_counter() - t0
        _, d2 = nearest_centroid(x, km.centroids)
        return t, float(d2.astype(np.float64).sum()), t_labels

    t_default, obj_default, t_default_labels = faiss_run(None)
    rng = np.random.default_rng(seed)
    m = seed_sample_rows(n, k)
    t0 = time.perf_counter()
    init = kmeans_pp_seed(x if m == n else x[rng.choice(n, m, replace=False)], k, rng)
    t_seed = time.perf_counter() - t0  # the engine's seeding, which its time includes
    t_same, obj_same, _ = faiss_run(init)
    obj_e = float(res.d2.astype(np.float64).sum())
    return {"bench": "kmeans", "pool": n, "dim": d, "k": k, "niter": niter, "engine_s": round(t_engine, 2),
            "faiss_s": round(t_default, 2), "time_ratio": round(t_engine / t_default, 2),
            "faiss_with_labels_s": round(t_default_labels, 2),
            "time_ratio_vs_faiss_with_labels": round(t_engine / t_default_labels, 2),
            "engine_objective": obj_e, "faiss_objective": obj_default,
            "objective_ratio": round(obj_e / obj_default, 4),
            "engine_seeding_s": round(t_seed, 2),
            "lloyd_time_ratio": round((t_engine - t_seed) / t_same, 2),
            "faiss_same_seeds_s": round(t_same, 2), "faiss_same_seeds_objective": obj_same,
            "same_seeds_objective_ratio": round(obj_e / obj_same, 6),
            "note": "faiss_s: faiss.Kmeans.train with its own init; faiss_with_labels_s: and its index.search "
                    "for every row's label (the engine returns labels and distances of every row); same_seeds: from "
                    "the engine's k-means++ seeds, seeding time not counted; faiss trains on at most 256 rows per "
                    "centroid, the engine on all"}


def _balanced(paths, n, d, rows_per_partition) -> dict:
    from curation.engine import retrieval as R
    from curation.engine.partitioned_pool import PartitionedPool

    plan = plan_partitions(paths, rows_per_partition * d * 4 / VECTOR_SHARE / 2**30)
    t0 = time.perf_counter()
    with PartitionedPool(plan) as pool:
        levels = R.hierarchical_kmeans(pool, [200, 20], resampling_steps=1, niter=5, seed=0)
    sel = R.balanced_sample(levels, n // 10, seed=0)
    return {"bench": "balanced", "pool": n, "dim": d, "partitions": len(plan.partitions),
            "partition_mb": round(rows_per_partition * d * 4 / 2**20, 1), "selected": int(len(sel)),
            "seconds": round(time.perf_counter() - t0, 2)}


def _balanced_plain(paths, n, d) -> dict:
    """The same hierarchical k-means (levels [200, 20], one resampling step, 5 iterations) and balanced sample as a
    user would script it: the whole pool loaded into one process, faiss.Kmeans and an index search per level."""
    import faiss

    from curation.data.vectors import load_descriptors
    from curation.engine import retrieval as R

    t0 = time.perf_counter()  # from the same shard files as the engine
    _, items = load_descriptors(paths)
    levels = []
    for li, k in enumerate([200, 20]):
        k = min(k, len(items))

        def fit(rows, seed):
            km = faiss.Kmeans(d, k, niter=5, seed=seed, verbose=False, min_points_per_centroid=1,
                              max_points_per_centroid=1 << 30)
            km.train(np.ascontiguousarray(items[rows]))
            d2, lab = km.index.search(items, 1)
            return km.centroids, lab[:, 0], d2[:, 0]

        cents, labels, d2 = fit(np.arange(len(items)), li)
        s = max(2, len(items) // k // 2)  # Vo et al.'s resampling step: the s closest items of every cluster
        order = np.lexsort((d2, labels))
        pos = np.arange(len(order)) - np.searchsorted(labels[order], np.arange(k))[labels[order]]
        cents, labels, d2 = fit(np.sort(order[pos < s]), 1000 + li)
        used = np.unique(labels)
        remap = np.full(k, -1, np.int64)
        remap[used] = np.arange(len(used))
        levels.append(R.Level(cents[used], remap[labels], d2))
        items = cents[used]
    sel = R.balanced_sample(levels, n // 10, seed=0)
    return {"bench": "balanced", "impl": "faiss.Kmeans in memory", "pool": n, "dim": d, "selected": int(len(sel)),
            "seconds": round(time.perf_counter() - t0, 2)}


def compare(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="scale-compare-"))
    try:
        n, d = args.dedup_size, args.dedup_dim
        if "dedup" in args.steps:
            _compare_dedup(args, work, n, d)
        if "kmeans" in args.steps:
            _emit(_in_child(_kmeans_pair, args.kmeans_size, args.kmeans_dim, args.kmeans_k, 10, 0), args.out)
        for m in args.balanced_sizes if "balanced" in args.steps else ():
            x, _ = planted_pool(m, 64, n_sources=m // 50, copies=2, seed=m)
            bpaths = write_shards(x, work / f"bal-{m}", 2_500)
            del x
            plain = _in_child(_balanced_plain, bpaths, m, 64)
            _emit(plain, args.out)
            row = _in_child(_balanced, bpaths, m, 64, 25_000)
            row.update(time_ratio_to_plain=round(row["seconds"] / plain["seconds"], 2),
                       peak_ratio_to_plain=round(row["peak_rss_mb"] / plain["peak_rss_mb"], 2))
            _emit(row, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compare_dedup(args, work: Path, n: int, d: int) -> None:
    """The plain script and the engine on 1 and 8 partitions of the same shard files, interleaved `--repeats` times
    (so that a change in the machine's load hits all three alike), then the median ratios."""
    x, _ = planted_pool(n, d, n_sources=n // 50, copies=2, seed=1)
    paths = write_shards(x, work / "dedup", max(1, n // 40))
    del x
    ratios: dict[int, list[float]] = {1: [], 8: []}
    for _ in range(args.repeats):
        plain = _in_child(_dedup_plain, paths, n, d, args.k, args.threshold)
        _emit(plain, args.out)
        for parts in (1, 8):
            row = _in_child(_dedup_engine, paths, n, d, args.k, args.threshold, parts, args.dedup_block)
            same = np.array_equal(np.load(work / "dedup" / f"labels-{parts}.npy"),
                                  _smallest_member_labels(np.load(work / "dedup" / "labels-plain.npy")))
            ratios[parts].append(row["seconds"] / plain["seconds"])
            row.update(ratio_to_plain=round(ratios[parts][-1], 2), same_components=bool(same))
            _emit(row, args.out)
    _emit({"bench": "dedup", "summary": True, "pool": n, "dim": d, "k": args.k, "repeats": args.repeats,
           "median_ratio_1_partition": round(float(np.median(ratios[1])), 3),
           "median_ratio_8_partitions": round(float(np.median(ratios[8])), 3)}, args.out)


def _smallest_member_labels(labels: np.ndarray) -> np.ndarray:
    """Component labels renamed to the smallest node of each component (the engine's convention)."""
    first = np.full(labels.max() + 1, len(labels), np.int64)
    np.minimum.at(first, labels, np.arange(len(labels)))
    return first[labels]


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
    ap.add_argument("--score-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="exact search's candidate scoring (torch matmul below float32); its recall is reported")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", type=Path, help="append the JSON lines to this file too")
    ap.add_argument("--compare", action="store_true", help="the engine against plain FAISS baselines (no Ray)")
    ap.add_argument("--dedup-size", type=int, default=100_000)
    ap.add_argument("--dedup-dim", type=int, default=512)
    ap.add_argument("--dedup-block", type=int, default=ScaleConfig().query_block,
                    help="--compare: the engine's query block (default: the dedup stage's, scale.query_block)")
    ap.add_argument("--kmeans-size", type=int, default=200_000)
    ap.add_argument("--kmeans-dim", type=int, default=256)
    ap.add_argument("--kmeans-k", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1, help="--compare: interleaved repeats of the dedup trio")
    ap.add_argument("--steps", nargs="+", default=["dedup", "kmeans", "balanced"],
                    choices=["dedup", "kmeans", "balanced"], help="--compare: which comparisons to run")
    ap.add_argument("--balanced-sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.update(LOOPBACK_ENV)  # the driver, like the loopback head, keeps 127.0.0.1 as its node address
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
