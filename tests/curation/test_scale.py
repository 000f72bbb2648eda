"""In-process: partitions under a memory budget, partitioned k-NN (exact merge, waves, resume),
components streamed from edge files, distributed Lloyd k-means.  Real Parquet shards, real FAISS."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.engine.components import connected_components
from curation.engine.distributed_kmeans import partitioned_kmeans
from curation.engine.distributed_knn import (FIXED_POINT, FIXED_POINT_ROWS, Placement, Workers, fixed_point_sums,
                                            inertia_from_sums, fixed_point_square_norms, merge_topk,
                                            partitioned_knn)
from curation.engine.edge_components import edge_batches, streamed_components
from curation.engine.knn import knn_search, square_norms
from curation.engine.partitions import plan_keys, plan_partitions, read_partition
from curation.data.vectors import load_descriptors
from tests.synthetic_pool import planted_pool, write_shards

N, D = 6000, 64
THRESHOLD = 0.75  # 6 standard deviations of the cosine of two random directions in 64-d: planted copies only
EPS32 = np.finfo(np.float32).eps


def _tol(d: int) -> float:
    """Rounding of a float32 dot product of two unit vectors summed over d terms (any summation order)."""
    return 4 * d * EPS32


def _budget_gb(rows: int, d: int, partitions: float) -> float:
    """A worker budget whose vector share (a third) holds rows / partitions vectors."""
    return rows / partitions * d * 4 * 3 / 2**30


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    x, group = planted_pool(N, D, n_sources=300, copies=2, seed=1)
    paths = write_shards(x, tmp_path_factory.mktemp("pool"), rows_per_shard=500)
    return x, group, paths


def _same_neighbours(s_a, i_a, s_b, i_b, d):
    """Similarities agree within rounding; ids agree wherever the similarity is not within rounding of another."""
    tol = _tol(d)
    np.testing.assert_allclose(s_a, s_b, atol=tol, rtol=0)
    gaps = np.diff(s_a, axis=1)
    clear = np.ones_like(s_a, bool)
    clear[:, 1:] &= np.abs(gaps) > 2 * tol
    clear[:, :-1] &= np.abs(gaps) > 2 * tol
    assert (i_a[clear] == i_b[clear]).all()


def test_plan_splits_under_the_budget_and_reads_back_the_shards(pool):
    x, _, paths = pool
    one = plan_partitions(paths, 16.0)
    assert len(one.partitions) == 1 and one.rows == N and one.dim == D
    plan = plan_partitions(paths, _budget_gb(N, D, 4))
    assert len(plan.partitions) == 4
    assert [p.offset for p in plan.partitions] == list(np.cumsum([0] + [p.rows for p in plan.partitions[:-1]]))
    assert all(p.nbytes <= plan.budget_bytes / 3 for p in plan.partitions)
    assert sum(len(p.files) for p in plan.partitions) == len(paths)
    got = np.concatenate([read_partition(p, with_keys=False)[1] for p in plan.partitions])
    keys, ref = load_descriptors(paths)
    assert np.array_equal(got, ref) and plan_keys(plan) == keys
    # a key filter keeps those rows only, in the same order
    wanted = keys[::3]
    sub = plan_partitions(paths, _budget_gb(N, D, 4), keys=wanted)
    assert sub.rows == len(wanted) and plan_keys(sub) == wanted
    assert np.array_equal(np.concatenate([read_partition(p, sub.keys_filter)[1] for p in sub.partitions]),
                          ref[::3])


def test_a_shard_larger_than_the_budget_is_a_clear_error(pool):
    _, _, paths = pool
    with pytest.raises(ValueError, match="part-00000.parquet holds 500 vectors.*worker_memory_gb"):
        plan_partitions(paths, _budget_gb(499, D, 1))


def test_merge_is_exact_and_independent_of_the_split():
    rng = np.random.default_rng(0)
    sims = rng.integers(0, 5, (50, 12)).astype(np.float32)  # many ties
    ids = np.tile(rng.permutation(12), (50, 1)).astype(np.int64)
    whole = merge_topk([sims], [ids], 5)
    parts = merge_topk([sims[:, :4], sims[:, 4:9], sims[:, 9:]], [ids[:, :4], ids[:, 4:9], ids[:, 9:]], 5)
    assert np.array_equal(whole[0], parts[0]) and np.array_equal(whole[1], parts[1])
    for r in range(50):  # best first, ties to the smaller id
        order = sorted(zip(-sims[r], ids[r]))[:5]
        assert whole[1][r].tolist() == [i for _, i in order]
    short = merge_topk([sims[:, :2]], [ids[:, :2]], 4)
    assert (short[1][:, 2:] == -1).all() and np.isneginf(short[0][:, 2:]).all()



@pytest.mark.parametrize("id_base", [0, 2**32], ids=["one-key-sort", "ids-beyond-32-bits"])
def test_merge_orders_signs_infinities_and_padding_as_the_float_comparison(id_base):
    """The merge sorts one integer key per candidate for pools below 2**32 rows and a two-key sort beyond: both
    must order negative, zero (+0 and -0 alike), tied and -inf similarities and -1 padding as Python's own sort of
    (-similarity, id) does."""
    rng = np.random.default_rng(1)
    values = np.array([-1.0, -0.5, -0.0, 0.0, 1e-38, 0.25, 0.25, 1.0, -np.inf], np.float32)
    sims = rng.choice(values, (200, 16)).astype(np.float32)
    ids = id_base + np.stack([rng.permutation(40)[:16] for _ in range(200)]).astype(np.int64)
    pad = rng.random((200, 16)) < 0.2
    ids[pad] = -1
    got_s, got_i = merge_topk([sims[:, :7], sims[:, 7:]], [ids[:, :7], ids[:, 7:]], 10)
    for r in range(200):
        ref = sorted((-(float(s) if i >= 0 else -np.inf), i if i >= 0 else 2**70)
                     for s, i in zip(sims[r], ids[r]))[:10]
        assert got_i[r].tolist() == [i if i != 2**70 else -1 for _, i in ref]
        assert got_s[r].tolist() == [-s for s, _ in ref]

def test_partitioned_knn_equals_the_single_partition_search(pool, tmp_path):
    x, group, paths = pool
    k = 8
    one = plan_partitions(paths, 16.0)
    four = plan_partitions(paths, _budget_gb(N, D, 4))
    ref = partitioned_knn(one, one, k, tmp_path / "one", exclude_self=True, block=1024)
    run = partitioned_knn(four, four, k, tmp_path / "four", exclude_self=True, block=1024,
                          placement=Placement(searchers=2))
    assert (ref.partitions, ref.waves, run.partitions, run.waves) == (1, 1, 4, 2)
    s1, i1 = ref.results()
    s4, i4 = run.results()
    assert i4.shape == (N, k)
    _same_neighbours(s1, i1, s4, i4, D)
    S, I = knn_search(x, x, k + 1)  # today's in-process search, self in column 0 (no exact duplicates here)
    _same_neighbours(S[:, 1:], I[:, 1:], s4, i4, D)
    # the planted copies: each copy's nearest neighbour is another member of its group
    planted = group >= 0
    assert (group[i4[planted, 0]] == group[planted]).all()
    assert (i4 != np.arange(N)[:, None]).all()
    # anchors x pool (array queries) through the same path
    q = x[:700] + 0.01
    a = partitioned_knn(q, four, 3, tmp_path / "anchors", block=256, placement=Placement(searchers=3)).results()
    b = knn_search(q / 1, x, 3)
    _same_neighbours(b[0], b[1], a[0], a[1], D)


def test_ivf_partitions_report_recall_against_exact(pool, tmp_path):
    from curation.engine.retrieval import recall_at_k

    x, _, paths = pool
    four = plan_partitions(paths, _budget_gb(N, D, 4))
    exact = partitioned_knn(four, four, 5, tmp_path / "exact", block=2048).results()
    run = partitioned_knn(four, four, 5, tmp_path / "ivf", block=2048,
                          placement=Placement(index="ivf_flat", nlist=16, nprobe=16))
    assert run.worker_infos and all(i["index"].startswith("IVF16,Flat") for i in run.worker_infos)
    assert recall_at_k(run.results()[1], exact[1]) == 1.0  # nprobe = nlist visits every list: exact
    low = partitioned_knn(four, four, 5, tmp_path / "ivf1", block=2048,
                          placement=Placement(index="ivf_flat", nlist=16, nprobe=1)).results()
    r = recall_at_k(low[1], exact[1])
    assert 0.05 < r < 1.0  # one list of 16: approximate, measurably
    # the lists are the pool's (one quantizer trained on a sample drawn by global row), not each partition's: one
    # partition or four, the approximate search finds the same neighbours
    one = plan_partitions(paths, 16.0)
    whole = partitioned_knn(one, one, 5, tmp_path / "ivf1-whole", block=2048,
                            placement=Placement(index="ivf_flat", nlist=16, nprobe=1)).results()
    assert np.array_equal(whole[1], low[1]) and np.array_equal(whole[0], low[0])
    # IVF-PQ: re-ranking 4 k PQ candidates with the partition's exact vectors finds more of the true neighbours
    pq_runs = {rr: partitioned_knn(four, four, 5, tmp_path / f"pq{rr}", block=2048, placement=Placement(
        index="ivf_pq", nlist=16, nprobe=16, rerank=rr)) for rr in (0, 4)}
    assert all(",rerank4x" in i["index"] for i in pq_runs[4].worker_infos)
    r0, r4 = (recall_at_k(pq_runs[rr].results()[1], exact[1]) for rr in (0, 4))
    assert r0 < r4 <= 1.0


class _Killed(RuntimeError):
    pass


class _DiesAfter(Workers):
    """A driver killed after `calls` searches (the searchers are real)."""

    def __init__(self, plan, placement, calls):
        super().__init__(plan, placement)
        self.left = calls

    def call(self, handles, method, *args):
        if method == "search":
            if self.left == 0:
                raise _Killed()
            self.left -= 1
        return super().call(handles, method, *args)


@pytest.mark.parametrize("searchers,calls", [(4, 5), (2, 11)])  # 8 blocks: one wave; two waves, killed in wave 2
def test_a_killed_search_resumes_from_finished_blocks(pool, tmp_path, searchers, calls):
    _, _, paths = pool
    four = plan_partitions(paths, _budget_gb(N, D, 4))
    pl = Placement(searchers=searchers)
    whole = partitioned_knn(four, four, 6, tmp_path / "whole", exclude_self=True, edge_threshold=THRESHOLD, block=1000,
                            placement=pl)
    out = tmp_path / "killed"
    with pytest.raises(_Killed):
        partitioned_knn(four, four, 6, out, exclude_self=True, edge_threshold=THRESHOLD, block=1000, placement=pl,
                        workers=_DiesAfter(four, pl, calls=calls))
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("block-????????????.parquet")}
    assert 0 < len(finished) < len(whole.blocks)
    counting = _DiesAfter(four, pl, calls=10**6)
    again = partitioned_knn(four, four, 6, out, exclude_self=True, edge_threshold=THRESHOLD, block=1000, placement=pl,
                            workers=counting)
    counting.release()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("block-????????????.parquet") if p.name in finished} \
        == finished  # finished blocks were not searched again
    waves = len(counting.waves)
    assert 10**6 - counting.left < waves * len(whole.blocks)
    assert not list(out.glob("*.w*")) and not list(out.glob("*.tmp-*"))
    assert len(again.blocks) == len(whole.blocks) == 8 and len(again.edges) == 8
    for a, b in zip(whole.blocks + whole.edges, again.blocks + again.edges):
        assert pq.read_table(a).equals(pq.read_table(b))


def test_components_streamed_from_edge_files_equal_the_in_memory_labelling(pool, tmp_path):
    _, group, paths = pool
    four = plan_partitions(paths, _budget_gb(N, D, 4))
    run = partitioned_knn(four, four, 8, tmp_path / "g", exclude_self=True, edge_threshold=THRESHOLD, block=500)
    s, i = run.results()
    mask = s > THRESHOLD
    ref = connected_components(N, np.repeat(np.arange(N), 8)[mask.ravel()], i[mask])
    for batch in (1, 50, 10**9):  # an edge batch per file, several files, everything at once
        got = streamed_components(N, edge_batches(run.edges, batch_edges=batch))
        assert got.dtype == np.int64 and np.array_equal(got, ref)
    # the planted copy groups are exactly the non-singleton components
    planted = group >= 0
    assert np.array_equal(got[planted] == got[group[planted]], np.ones(planted.sum(), bool))
    assert np.unique(got[planted]).size == 300
    assert np.unique(got[~planted]).size == (~planted).sum()
    # random graph with long chains: many batches and many rounds
    rng = np.random.default_rng(3)
    n = 5000
    src, dst = rng.integers(0, n, 4000), rng.integers(0, n, 4000)
    batches = [(src[j:j + 97], dst[j:j + 97]) for j in range(0, 4000, 97)]
    assert np.array_equal(streamed_components(n, batches), connected_components(n, src, dst))


def test_partitioned_kmeans_equals_the_single_partition_run(pool):
    x, _, paths = pool
    one = plan_partitions(paths, 16.0)
    four = plan_partitions(paths, _budget_gb(N, D, 4))
    a = partitioned_kmeans(one, Workers(one, Placement()), 40, niter=8, seed=3)
    with Workers(four, Placement(searchers=2)) as w:
        b = partitioned_kmeans(four, w, 40, niter=8, seed=3)
    assert a.iterations == b.iterations
    assert np.array_equal(a.labels, b.labels)
    # fixed-point sums: integer addition in any grouping gives the same total, so the centroids are equal bit for bit
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.d2, b.d2)
    # every row is labelled with its nearest centroid (up to the rounding of |x - c|^2 <= 4 over D terms)
    d2 = ((x[:, None, :] - b.centroids[None]) ** 2).sum(-1)
    assert (d2[np.arange(N), b.labels] <= d2.min(1) + 4 * _tol(D)).all()
    # the budget of 40 clusters is used, and the reported inertia is that of a real assignment
    assert b.inertia > 0 and len(np.unique(b.labels)) > 30 and a.inertia == b.inertia
    # training on a subset of rows (hierarchical k-means' resampling) still labels every row
    rows = np.random.default_rng(1).choice(N, 2000, replace=False)
    s = partitioned_kmeans(four, Workers(four, Placement()), 40, niter=8, seed=3, rows=rows)
    assert s.labels.shape == (N,) and len(np.unique(s.labels)) > 20
    assert np.array_equal(s.centroids, partitioned_kmeans(one, Workers(one, Placement()), 40, 8, 3, rows).centroids)


@pytest.mark.parametrize("n_eval", [0, 40])
def test_partitioned_dedup_graph_equals_the_stage_graph(pool, tmp_path, n_eval):
    from curation.engine.partitioned_dedup import partitioned_dedup_graph
    from curation.stages.dedup import dedup_graph

    x, group, paths = pool
    rng = np.random.default_rng(4)
    # evaluation images: near copies of some planted pool images, and unrelated ones
    evals = x[rng.choice(np.flatnonzero(group >= 0), n_eval // 2, replace=False)] + 0.02 * rng.standard_normal(
        (n_eval // 2, D)).astype(np.float32)
    evals = np.concatenate([evals, rng.standard_normal((n_eval - n_eval // 2, D)).astype(np.float32)])
    evals = (evals / np.maximum(np.linalg.norm(evals, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    evals = evals.reshape(n_eval, D)
    four = plan_partitions(paths, _budget_gb(N, D, 4))
    links = (np.array([0, 5, 4000]), np.array([17, 3000, 5999]))  # extra pool-pool edges (hash groups)
    got = partitioned_dedup_graph(four, evals, 6, THRESHOLD, 0.45, tmp_path / "g", Placement(searchers=2),
                                  block=1000, links=links)
    ref = dedup_graph(x, evals, 6, THRESHOLD, 0.45, device="cpu", links=links)
    assert got["labels"][0] == got["labels"][17] and got["labels"][4000] == got["labels"][5999]
    assert np.array_equal(got["labels"], ref["labels"])
    _same_neighbours(ref["self_sims"], ref["self_ids"], got["self_sims"], got["self_ids"], D)
    if n_eval:
        _same_neighbours(ref["eval_sims"], ref["eval_ids"], got["eval_sims"], got["eval_ids"], D)
        np.testing.assert_allclose(got["eval_nn_sims"], ref["eval_nn_sims"], atol=_tol(D), rtol=0)
        # the copied evaluation images pull their pool group into one component
        assert len(np.unique(got["labels"][N:N + n_eval // 2])) == n_eval // 2
    assert len(got["self_edge_files"]) == 8  # 4 partitions of 1500 rows, blocks of 1000


def test_scale_section_validates_and_may_change_on_resume(tmp_path):
    import pyarrow as pa
    import yaml

    from curation.config import ConfigError, check_resume, dump_config, load_config

    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg"]}), urls)
    base = {"run_root": str(tmp_path / "run"), "input": {"url_list": str(urls)}}
    cfg = load_config(data=base)
    assert cfg.scale.worker_memory_gb == 16.0 and cfg.scale.searchers == 0
    with pytest.raises(ConfigError, match="scale.worker_memory_gb"):
        load_config(data={**base, "scale": {"worker_memory_gb": 0}})
    other = load_config(data={**base, "scale": {"worker_memory_gb": 1, "searchers": 4}})
    check_resume(other, dump_config(cfg))  # where the work runs, not what it produces
    saved = yaml.safe_load(dump_config(cfg))
    saved.pop("scale")
    check_resume(other, yaml.safe_dump(saved))  # a run started before the section existed resumes
    with pytest.raises(ConfigError):
        check_resume(load_config(data={**base, "seed": 1}), dump_config(cfg))
    # a reduced score precision can lose neighbours, so it is what the run produces: part of its identity
    for section in ("dedup", "retrieve"):
        with pytest.raises(ConfigError, match="score_dtype: bfloat16"):
            check_resume(load_config(data={**base, section: {"score_dtype": "bfloat16"}}), dump_config(cfg))
    with pytest.raises(ConfigError, match="dedup.score_dtype"):
        load_config(data={**base, "dedup": {"score_dtype": "int8"}})


@pytest.mark.parametrize("scale", [1.0, 2.0**12], ids=["unit-vectors", "values-too-large-for-float64-sums"])
def test_fixed_point_sums_are_exact_whatever_the_chunks_and_threads(scale):
    """A Lloyd step's sums are integers (rows quantised to 1 / FIXED_POINT): chunked, threaded or not, and with
    values whose chunk sums would pass 2**53 (summed in integer arithmetic instead), they equal Python's exact
    integer sums."""
    rng = np.random.default_rng(4)
    n, d, k = 2 * FIXED_POINT_ROWS + 123, 8, 5
    x = (rng.standard_normal((n, d)) * scale).astype(np.float32)
    labels = rng.integers(0, k, n)
    q = [[int(v) for v in np.rint(row.astype(np.float64) * FIXED_POINT)] for row in x]
    exact = np.zeros((k, d), object)
    for row, lab in zip(q, labels):
        exact[lab] += np.array(row, object)
    for threads in (1, 3):
        got = fixed_point_sums(x, labels, k, threads)
        assert got.dtype == np.int64 and (got.astype(object) == exact).all()


def test_lloyd_statistics_reduced_over_partitions_equal_their_sum_and_the_threads_change_no_label(monkeypatch):
    """Workers.reduce_each adds the partitions' statistics as they come (in-process; a tree of Ray tasks on a
    cluster: the two-node test): the same integers as adding map_each's list, one result held at a time.  The
    assignment on 3 threads (blocks side by side) labels every row as on one."""
    from curation.engine.distributed_knn import add_lloyd_stats
    from curation.engine.knn import nearest_centroid
    from curation.engine.partitions import array_plan

    rng = np.random.default_rng(6)
    x = rng.standard_normal((5000, 16)).astype(np.float32)
    c = x[:9].copy()
    c[1] = c[0]  # a duplicate centroid: every row near it is a tie, decided exactly
    with Workers(array_plan(x, 5), Placement()) as w:
        total = w.reduce_each("lloyd_stats", lambda part: (c, None), add_lloyd_stats)
        each = w.map("lloyd_stats", c)
    assert len(each) == 5
    assert np.array_equal(total[0], sum(e[0] for e in each)) and np.array_equal(total[1], sum(e[1] for e in each))
    assert total[2] == sum(e[2] for e in each) and total[1].sum() == len(x)
    from curation.engine import knn

    monkeypatch.setattr(knn, "RESCORE_BYTES", 8 * 16 * 512)  # blocks of 512 rows: 10 of them
    one, d1 = nearest_centroid(x, c, "cpu", threads=1)
    many, d3 = nearest_centroid(x, c, "cpu", threads=3)
    assert np.array_equal(one, many) and np.array_equal(d1, d3) and not (one == 1).any()
    assert np.array_equal(np.bincount(one, minlength=9), total[1])


def test_a_later_wave_asked_for_fewer_candidates_first_finds_what_the_full_list_finds():
    """A partition searched after others gets a floor (each query's k-th best so far) and is asked for `first`
    candidates; queries whose worst candidate could still reach the floor are searched again in full.  Floors from
    -inf (every query widened) to above every similarity (none needed) give the full search's answer."""
    from curation.engine.distributed_knn import PartitionWorker
    from curation.engine.partitions import array_plan

    rng = np.random.default_rng(7)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:200] + np.float32(0.05) * rng.standard_normal((200, 16)).astype(np.float32)
    worker = PartitionWorker(array_plan(x, 1).partitions[0], threads=1)
    exact = x[:200].astype(np.float64) @ x.T.astype(np.float64)
    kth = -np.sort(-exact, axis=1)[:, 5]
    for floor in (np.full(200, -np.inf, np.float32), kth.astype(np.float32), np.full(200, 2.0, np.float32),
                  np.where(np.arange(200) % 2 == 0, kth, -np.inf).astype(np.float32)):
        full = worker.search(q, 10, floor)
        for first in (1, 4, 12):
            got = worker.search(q, 10, floor, first)
            assert np.array_equal(got[0], full[0]) and np.array_equal(got[1], full[1]), first


def test_inertia_from_the_step_statistics_is_the_summed_squared_distance():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = x[:7] + np.float32(0.01)
    labels = rng.integers(0, 7, len(x))
    direct = float(((x.astype(np.float64) - c[labels].astype(np.float64)) ** 2).sum())
    got = inertia_from_sums(c, fixed_point_sums(x, labels, 7), np.bincount(labels, minlength=7),
                            fixed_point_square_norms(square_norms(x)))
    # quantisation: each of the 3000 x 16 coordinates and 3000 squared norms moves by <= 2**-31, weighted by |c| <= 2;
    # the float64 arithmetic of the identity adds ~3000 * 4 * 2**-53
    assert abs(got - direct) <= 3000 * (16 * 2 * 2 + 1) * 2.0**-31 + 1e-9
