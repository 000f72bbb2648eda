"""The partitioned global steps on a real two-node Ray cluster equal the in-process run.

A head and a worker node (two `ray start` raylets on this machine, 1 CPU and their own custom resource each) run
the searcher actors of a pool split into 4 partitions (2 at a time: two waves); the k-NN graph, its edge files,
the components and Lloyd k-means must equal the single-partition in-process run on the same data: 50,000 vectors
with planted copy clusters.  Starts its own cluster (never `ray stop`) and stops exactly it."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.engine.distributed_kmeans import partitioned_kmeans
from curation.engine.distributed_knn import Placement, Workers, partitioned_knn
from curation.engine.edge_components import edge_batches, streamed_components
from curation.cluster.local_cluster import LocalRayHead, processes_of_cluster
from curation.engine.partitions import plan_partitions
from tests.synthetic_pool import planted_pool, write_shards
from tests.curation.test_scale_retrieve import retrieve_run
from tests.curation.test_scale_retrieve import three_partitions_gb
from tests.curation.test_scale_retrieve import assert_same_sample_retrieval

N, D, K = 50_000, 32, 8
NOISE = 0.03  # planted copies: cosine ~0.986 to their original, ~0.97 to each other
THRESHOLD = 0.9  # two random 32-d directions exceed 0.9 with probability < 1e-11
EPS32 = np.finfo(np.float32).eps


@pytest.mark.slow
def test_two_node_partitioned_dedup_graph_and_kmeans_equal_the_in_process_run(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    x, group = planted_pool(N, D, n_sources=2000, copies=2, seed=7, noise=NOISE)
    paths = write_shards(x, tmp_path / "pool", rows_per_shard=2500)
    one = plan_partitions(paths, 16.0)
    budget = N / 4 * D * 4 * 3 / 2**30  # a third of it holds a quarter of the pool
    four = plan_partitions(paths, budget)
    assert len(one.partitions) == 1 and len(four.partitions) == 4

    ref = partitioned_knn(one, one, K, tmp_path / "ref", exclude_self=True, edge_threshold=THRESHOLD, block=8192)
    ref_km = partitioned_kmeans(one, Workers(one, Placement(device="cpu")), 64, niter=6, seed=1)

    head = LocalRayHead(num_cpus=1, resources={"node_a": 1}, loopback=False)  # a worker node joins it
    marks = None
    try:
        head.start()
        marks = [head.temp_dir, f":{head.gcs_port} "]
        head.add_worker(num_cpus=1, resources={"node_b": 1})
        ray.init(address=head.address, logging_level="WARNING")
        assert {r for n in ray.nodes() if n["Alive"] for r in n["Resources"]} >= {"node_a", "node_b"}
        pl = Placement(use_ray=True, device="cpu")
        run = partitioned_knn(four, four, K, tmp_path / "dist", exclude_self=True, edge_threshold=THRESHOLD,
                              block=8192, placement=pl)
        with Workers(four, pl) as w:
            km = partitioned_kmeans(four, w, 64, niter=6, seed=1)
        infos = run.worker_infos
        # the retrieve stage as Ray unit tasks on the two nodes, its searchers started from inside them
        staged, _ = retrieve_run(tmp_path / "staged", three_partitions_gb(), ray_address=head.address)
        ray.shutdown()
    finally:
        ray.shutdown()
        head.stop()
    assert marks and processes_of_cluster(marks) == [], "stop() ends the head and the worker node"

    assert (run.partitions, run.waves) == (4, 2)
    assert len({i["node"] for i in infos}) == 2, "the searchers ran on both nodes"
    assert sorted(i["partition"] for i in infos) == [0, 1, 2, 3]
    s1, i1 = ref.results()
    s4, i4 = run.results()
    tol = 4 * D * EPS32
    np.testing.assert_array_equal(s4, s1)  # candidates rescored exactly: the same similarities, bit for bit
    gaps = np.abs(np.diff(s1, axis=1)) > 2 * tol
    clear = np.ones_like(s1, bool)
    clear[:, 1:] &= gaps
    clear[:, :-1] &= gaps
    assert (i4[clear] == i1[clear]).all()
    # known nearest neighbours: a planted copy's nearest is a member of its group, well above the threshold
    planted = group >= 0
    assert (group[i4[planted, 0]] == group[planted]).all() and (s4[planted, 0] > THRESHOLD).all()
    # the dedup graph: the same edges, the same components, exactly the planted clusters
    edges = lambda r: pq.read_table(r.edges).sort_by([("src", "ascending"), ("dst", "ascending")])  # noqa: E731
    e1, e4 = edges(ref), edges(run)
    assert e1["src"].equals(e4["src"]) and e1["dst"].equals(e4["dst"])
    lab1 = streamed_components(N, edge_batches(ref.edges))
    lab4 = streamed_components(N, edge_batches(run.edges, batch_edges=10_000))
    assert np.array_equal(lab1, lab4)
    assert np.unique(lab4[planted]).size == 2000 and (lab4[planted] == lab4[group[planted]]).all()
    assert np.unique(lab4[~planted]).size == (~planted).sum()
    # the retrieve stage by partitions on the cluster finds what the in-process stage finds
    assert_same_sample_retrieval(retrieve_run(tmp_path / "whole")[0], staged, 60 * 4)
    assert list((staged / "retrieve" / "_kmeans").glob("*.npz"))
    # Lloyd k-means over the two nodes equals the in-process run
    assert km.iterations == ref_km.iterations
    assert np.array_equal(km.labels, ref_km.labels)
    assert np.array_equal(km.centroids, ref_km.centroids)  # fixed-point sums: the same in any grouping
