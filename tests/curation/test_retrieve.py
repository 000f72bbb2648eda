"""retrieve: planted neighbours on the demo corpus, equality with brute force, IVF recall, cluster and balanced
selection on embeddings of known structure, and the ledger / stats tables."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.pipeline import accounting
from curation.engine import retrieval as R
from curation.config import load_config
from curation.pipeline.runner import run_pipeline
from curation.data.samples import path_key
from curation.pipeline.storage import write_table
from curation.data.vectors import descriptor_table
from schemas import validate
from tests.tolerance import approx, assert_close
from tests.curation.fakerun import corpus_pool, make_run, random_images


@pytest.fixture(scope="module")
def corpus_run(demo_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieve_corpus")
    images, truth = corpus_pool(demo_corpus)
    images.append(("9999999999", b"\xff\xd8\xff broken jpeg"))  # decodes nowhere: embed_failed
    anchors = demo_corpus / "anchors"
    cfg = make_run(tmp, images, shard_size=48, stages=["embed", "retrieve"], retrieve={"anchor_sets": [
        {"name": "objects", "path": str(anchors / "objects"), "method": "sample", "k": 4},
        {"name": "scenes", "path": str(anchors / "scenes"), "method": "cluster", "clusters": 12,
         "min_anchors_per_cluster": 1, "per_cluster": 25},
    ]})
    run_pipeline(load_config(data=cfg), progress=False)
    return {"root": tmp / "run", "truth": truth, "corpus": demo_corpus, "n": len(images)}


def _anchor_ids(corpus) -> dict[str, str]:
    rows = pq.read_table(corpus / "anchors.parquet").to_pylist()
    # anchors/<set>/<class>/<id>.jpg -> key of iter_image_set: path_key("<class>/<id>.jpg")
    return {path_key(r["path"].split("/", 2)[2]): r["anchor_id"] for r in rows}


def test_sample_retrieval_finds_planted_neighbours(corpus_run):
    nb = pq.read_table(corpus_run["root"] / "retrieve" / "neighbors.parquet")
    validate(nb, "neighbors")
    ids = _anchor_ids(corpus_run["corpus"])
    rows = nb.to_pylist()
    assert {r["anchor_set"] for r in rows} == {"objects"}
    assert len(rows) == 4 * sum(1 for a in ids.values() if a.startswith("objects-"))
    hits = [corpus_run["truth"][r["pool_key"]]["anchor_id"] == ids[r["anchor_key"]] for r in rows]
    precision = float(np.mean(hits))
    print(f"precision@4 (pixels descriptor, demo corpus, objects): {precision:.3f}")
    assert precision >= 0.9


def test_cluster_retrieval_prefers_anchor_concepts(corpus_run):
    sel = pq.read_table(corpus_run["root"] / "retrieve" / "selection.parquet").to_pylist()
    mine = [r for r in sel if r["anchor_set"] == "scenes"]
    assert mine, "cluster mode selected nothing"
    concepts = [corpus_run["truth"][r["key"]]["concept"] for r in mine]
    share = np.mean([c in ("rings", "waves") for c in concepts])
    near = sum(1 for t in corpus_run["truth"].values() if t["concept"] in ("rings", "waves"))
    recall = sum(c in ("rings", "waves") for c in concepts) / near
    print(f"cluster mode: {len(mine)} selected, {share:.2f} from the anchor concepts, recall {recall:.2f}")
    assert share >= 0.8 and recall >= 0.6
    cs = pq.read_table(corpus_run["root"] / "stats" / "cluster_stats.parquet")
    validate(cs, "cluster_stats")
    assert sum(cs["selected"].to_pylist()) == len(mine)


def test_selection_ledger_and_stats(corpus_run):
    root = corpus_run["root"]
    sel = pq.read_table(root / "retrieve" / "selection.parquet")
    validate(sel, "selection")
    keys = sel["key"].to_pylist()
    assert len(keys) == len(set(keys))
    led = accounting.read_ledger(root, "retrieve").to_pylist()
    assert len(led) == corpus_run["n"]
    kept = {r["key"] for r in led if r["kept"]}
    assert kept == set(keys)
    reasons = {r["key"]: r["reason"] for r in led if not r["kept"]}
    assert reasons.pop("9999999999") == "embed_failed"
    assert set(reasons.values()) == {"not_selected"}
    accounting.check_invariants(root)
    st = pq.read_table(root / "stats" / "retrieval_stats.parquet")
    validate(st, "retrieval_stats")
    by = {r["anchor_set"]: r for r in st.to_pylist()}
    assert by["objects"]["retrieved"] == 4 * by["objects"]["anchors"]
    in_union = sum(r["anchor_set"] == "objects" for r in sel.to_pylist())
    assert in_union <= by["objects"]["unique"] <= by["objects"]["retrieved"]
    assert by["objects"]["unique"] - by["objects"]["overlap_other_sets"] <= in_union
    assert 0 < by["objects"]["similarity_p05"] <= by["objects"]["similarity_p50"] <= by["objects"]["similarity_p95"] <= 1.0
    funnel = {r["stage"]: r for r in pq.read_table(root / "stats" / "funnel.parquet").to_pylist()}
    assert funnel["retrieve"]["kept"] == len(keys)


def _random_unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _embedding_run(tmp, pool, anchors, retrieve, **kw):
    """A run whose embed stage is already done with the given vectors (anchors: {set: vectors})."""
    images = random_images(len(pool), size=(8, 8))
    cfg = make_run(tmp, images, shard_size=len(pool), stages=["retrieve"], retrieve=retrieve, **kw)
    root = tmp / "run"
    keys = [k for k, _ in images]
    write_table(root / "embed" / "pool" / "part-00000.parquet", descriptor_table(keys, pool, "pool"), "descriptors")
    akeys = {}
    for name, vecs in anchors.items():
        akeys[name] = [f"a{i:05d}" for i in range(len(vecs))]
        write_table(root / "embed" / "anchors" / name / "part-00000.parquet",
                    descriptor_table(akeys[name], vecs, f"anchors/{name}"), "descriptors")
        (tmp / name).mkdir(exist_ok=True)
    return cfg, root, keys, akeys


def test_exact_retrieval_equals_brute_force(tmp_path):
    pool, anchors = _random_unit(3000, 24, 1), _random_unit(40, 24, 2)
    cfg, root, keys, akeys = _embedding_run(tmp_path, pool, {"s": anchors}, {
        "anchor_sets": [{"name": "s", "path": str(tmp_path / "s"), "method": "sample", "k": 4}]})
    run_pipeline(load_config(data=cfg), progress=False)
    nb = pq.read_table(root / "retrieve" / "neighbors.parquet").to_pylist()
    sims = anchors @ pool.T
    expect = np.argsort(-sims, axis=1, kind="stable")[:, :4]
    got = {}
    for r in nb:
        got.setdefault(r["anchor_key"], []).append((r["rank"], r["pool_key"], r["similarity"]))
    assert len(got) == 40
    for i, ak in enumerate(akeys["s"]):
        ranked = sorted(got[ak])
        assert [p for _, p, _ in ranked] == [keys[j] for j in expect[i]]
        # fp32 dots of unit vectors (24 terms; sum |a_i b_i| <= 1 by Cauchy-Schwarz)
        assert_close([s for _, _, s in ranked], sims[i, expect[i]], n_terms=24, dtype=np.float32, magnitude=1.0)
    # the selection keeps each pool image's best match
    sel = pq.read_table(root / "retrieve" / "selection.parquet").to_pylist()
    assert {r["key"] for r in sel} == {keys[j] for j in expect.reshape(-1)}
    for r in sel:
        j = keys.index(r["key"])
        col = sims[:, j]
        hit = [i for i in range(40) if j in expect[i]]
        best = max(hit, key=lambda i: col[i])
        assert r["anchor_key"] == akeys["s"][best]
        assert r["similarity"] == approx(col[best], n_terms=24, dtype=np.float32, magnitude=1.0)
    st = pq.read_table(root / "stats" / "retrieval_stats.parquet").to_pylist()[0]
    assert st["recall_at_k_vs_exact"] == 1.0  # the exact search is its own reference
    assert R.degenerate_sets([st]) == []  # random unit vectors: a healthy spread of similarities


def test_reduced_precision_scores_report_the_recall_they_reach(tmp_path):
    """retrieve.score_dtype bfloat16 (3 significant digits: neighbours 0.01 apart in similarity can swap): every
    neighbour it returns carries its exact similarity, and the recall it reports is the share of the true top-k it
    found (all 40 anchors are sampled: fewer than a block's 64)."""
    import json

    pool, anchors = _random_unit(3000, 24, 1), _random_unit(40, 24, 2)
    cfg, root, keys, akeys = _embedding_run(tmp_path, pool, {"s": anchors}, {
        "anchor_sets": [{"name": "s", "path": str(tmp_path / "s"), "method": "sample", "k": 4}],
        "score_dtype": "bfloat16"})
    run_pipeline(load_config(data=cfg), progress=False)
    sims = anchors.astype(np.float64) @ pool.T.astype(np.float64)
    true = {akeys["s"][i]: {keys[j] for j in row} for i, row in enumerate(np.argsort(-sims, axis=1)[:, :4])}
    found = 0
    for r in pq.read_table(root / "retrieve" / "neighbors.parquet").to_pylist():
        i, j = akeys["s"].index(r["anchor_key"]), keys.index(r["pool_key"])
        assert r["similarity"] == approx(sims[i, j], n_terms=24, dtype=np.float32, magnitude=1.0)  # rescored
        found += r["pool_key"] in true[r["anchor_key"]]
    st = pq.read_table(root / "stats" / "retrieval_stats.parquet").to_pylist()[0]
    assert st["recall_at_k_vs_exact"] == np.float32(found / 160)
    summary = json.loads((root / "retrieve" / "sets" / "s" / "summary.json").read_text())
    assert summary["index"] == "exact, bfloat16 scores"


def test_collapsed_embedder_flagged_in_log_and_report(tmp_path, capsys):
    """Every similarity ~1.0 (a collapsed or random embedder): the retrieve stage warns and the report says so."""
    from curation.report import build_report

    rng = np.random.default_rng(8)
    one = _random_unit(1, 24, 9)
    pool = one + 1e-3 * rng.normal(size=(200, 24)).astype(np.float32)  # all vectors (almost) the same
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    cfg, root, _, _ = _embedding_run(tmp_path, pool, {"s": pool[:10].copy()}, {
        "anchor_sets": [{"name": "s", "path": str(tmp_path / "s"), "method": "sample", "k": 4}]})
    run_pipeline(load_config(data=cfg), progress=False)
    assert "degenerate retrieval: anchor set 's'" in capsys.readouterr().err
    st = pq.read_table(root / "stats" / "retrieval_stats.parquet").to_pylist()
    assert len(R.degenerate_sets(st)) == 1
    page = build_report(root).read_text()
    assert "id='degenerate-retrieval'" in page and "collapsed or has random weights" in page


@pytest.mark.parametrize("index,rerank,floor", [("ivf_flat", 0, 0.9), ("ivf_pq", 4, 0.85), ("ivf_pq", 0, 0.2)])
def test_ivf_recall_reported(tmp_path, index, rerank, floor):
    # clustered data, as real embeddings are: IVF works well on it
    rng = np.random.default_rng(3)
    centers = _random_unit(50, 32, 4)
    pool = centers[rng.integers(0, 50, 3000)] + 0.15 * rng.normal(size=(3000, 32)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    anchors = pool[rng.choice(3000, 200, replace=False)] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)
    anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
    cfg, root, keys, _ = _embedding_run(tmp_path, pool.astype(np.float32), {"s": anchors.astype(np.float32)}, {
        "anchor_sets": [{"name": "s", "path": str(tmp_path / "s"), "method": "sample", "k": 4}],
        "index": index, "recall_sample": 100, "nprobe": 8, "pq_rerank": rerank})
    run_pipeline(load_config(data=cfg), progress=False)
    st = pq.read_table(root / "stats" / "retrieval_stats.parquet").to_pylist()[0]
    recall = st["recall_at_k_vs_exact"]
    print(f"{index} (rerank {rerank}): recall@4 vs exact = {recall:.3f}")
    assert recall is not None and recall >= floor


def test_ivf_pq_disables_polysemous_training():
    x = _random_unit(2000, 32, 5)
    idx, desc = R.build_ivf(x, "ivf_pq")
    assert desc.startswith("IVF") and ",PQ" in desc
    assert idx.do_polysemous_training is False and idx.polysemous_ht == 0


def _blobs(sizes, d=16, seed=0, spread=10.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), d)) * spread
    x = np.concatenate([centers[i] + rng.normal(size=(s, d)) for i, s in enumerate(sizes)]).astype(np.float32)
    return x, np.repeat(np.arange(len(sizes)), sizes)


def test_cluster_select_known_structure():
    x, truth = _blobs([400, 300, 200, 100])
    cents = R.kmeans(x, 4, 20, seed=0)
    labels, _ = R.assign(x, cents)
    # the clustering recovers the blobs
    for c in range(4):
        assert len(set(truth[labels == c])) == 1
    anchors_blob = np.array([0, 0, 0, 0, 2, 2, 3])  # blob 0: 4 anchors, blob 2: 2, blob 3: 1
    rng = np.random.default_rng(1)
    ax = x[[rng.choice(np.flatnonzero(truth == b)) for b in anchors_blob]]
    alabels, _ = R.assign(ax, cents)
    cs = R.cluster_select(labels, alabels, 4, min_anchors=1, per_cluster=50, cap=1000, seed=0)
    picked = np.bincount(truth[cs.pool_idx], minlength=4)
    assert picked.tolist() == [50, 0, 50, 0]  # clusters with more than 1 anchor, 50 each
    capped = R.cluster_select(labels, alabels, 4, min_anchors=1, per_cluster=50, cap=60, seed=0)
    assert len(capped.pool_idx) == 60 and set(truth[capped.pool_idx]) <= {0, 2}
    assert R.sensible_clusters(100_000, 1000) == 250


def test_balanced_sampling_is_even_across_very_different_clusters():
    sizes = [4000, 1000, 300, 100]
    x, truth = _blobs(sizes)
    for seed in range(3):
        levels = R.hierarchical_kmeans(x, [20, 4], resampling_steps=1, seed=seed)
        assert [len(lv.centroids) for lv in levels] == [20, 4]
        sel = R.balanced_sample(levels, 200, seed=seed)
        counts = np.bincount(truth[sel], minlength=4)
        assert len(sel) == 200 and len(set(sel.tolist())) == 200
        assert np.all(np.abs(counts - 50) <= 5), counts  # within 10% of an equal share
    # a small cluster cannot fill its share: the rest goes to the others
    sel = R.balanced_sample(R.hierarchical_kmeans(x, [20, 4], seed=0), 800, seed=0)
    counts = np.bincount(truth[sel], minlength=4)
    assert counts[3] == 100 and len(sel) == 800 and np.all(np.abs(counts[:3] - 700 / 3) <= 1)


def test_allocate_water_filling():
    rng = np.random.default_rng(0)
    assert R.allocate(100, np.array([10, 1000, 1000]), rng).tolist() == [10, 45, 45]
    assert R.allocate(5, np.array([0, 10, 10]), rng).sum() == 5
    assert R.allocate(10**6, np.array([3, 4]), rng).tolist() == [3, 4]


def test_balanced_and_as_is_stage(tmp_path):
    x, truth = _blobs([1500, 400, 100], d=8, seed=2)
    pool = x / np.linalg.norm(x, axis=1, keepdims=True)
    asis = tmp_path / "asis"
    (asis / "c").mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(asis / "c" / f"img{i}.png")
    cfg, root, keys, _ = _embedding_run(tmp_path, pool, {}, {
        "anchor_sets": [{"name": "core", "path": str(asis), "method": "as_is"}],
        "balanced": {"target_size": 150, "levels": [12, 3], "resampling_steps": 1}})
    run_pipeline(load_config(data=cfg), progress=False)
    sel = pq.read_table(root / "retrieve" / "selection.parquet").to_pylist()
    bal = [r for r in sel if r["anchor_set"] == "balanced"]
    core = [r for r in sel if r["anchor_set"] == "core"]
    assert len(bal) == 150 and all(r["source"] == "pool" for r in bal)
    counts = np.bincount(truth[[keys.index(r["key"]) for r in bal]], minlength=3)
    assert np.all(np.abs(counts - 50) <= 5), counts
    assert sorted(r["key"] for r in core) == ["c_img0", "c_img1", "c_img2"]
    assert all(r["source"] == "anchors/core" for r in core)
    st = {r["anchor_set"]: r for r in pq.read_table(root / "stats" / "retrieval_stats.parquet").to_pylist()}
    assert st["balanced"]["method"] == "balanced" and st["core"]["retrieved"] == 3
    # rerunning a finished stage does nothing
    ledger = lambda: {p.name: p.stat().st_mtime_ns for p in (root / "retrieve" / "_ledger").iterdir()}  # noqa: E731
    before = ledger()
    assert before
    run_pipeline(load_config(data=cfg), progress=False)
    assert ledger() == before


def test_ledger_verdicts_in_memory():
    from curation.stages.retrieve import ledger_verdicts

    reasons, details = ledger_verdicts(["a", "b", "c", "d"], selected={"a"}, embedded={"a", "b"},
                                       failed={"c": "decode_error: truncated"})
    assert reasons == [None, "not_selected", "embed_failed", "embed_failed"]
    assert details == [None, None, "decode_error: truncated", "no embedding"]


def test_union_of_selections_keeps_each_images_best_match_in_memory():
    import pyarrow as pa

    from curation.stages.retrieve import retrieval_stats, union_of_selections

    def sel(name, keys, sims, source="pool"):
        n = len(keys)
        return pa.table({"key": keys, "source": [source] * n, "url": [None] * n, "anchor_set": [name] * n,
                         "anchor_key": ["a"] * n, "rank": pa.array([0] * n, pa.int32()),
                         "similarity": pa.array(sims, pa.float32()), "cluster": pa.array([None] * n, pa.int64())})

    sels = [sel("s1", ["k2", "k1"], [0.5, 0.9]), sel("s2", ["k1", "k2", "k3"], [0.8, 0.5, None]),
            sel("core", ["k1"], [None], source="anchors/core")]
    union, shared = union_of_selections(sels, ["s1", "s2", "core"])
    got = [(r["source"], r["key"], r["anchor_set"]) for r in union.to_pylist()]
    # k1: s1 more similar; k2: a tie goes to the set listed first; an as-is anchor is its own row
    assert got == [("anchors/core", "k1", "core"), ("pool", "k1", "s1"), ("pool", "k2", "s1"), ("pool", "k3", "s2")]
    sets = [{"name": "s1", "method": "sample"}, {"name": "s2", "method": "cluster"}, {"name": "core", "method": "as_is"}]
    rows = retrieval_stats(sets, [{"anchors": 1, "retrieved": 2}, {}, {}], shared)
    assert [(r["unique"], r["overlap_other_sets"]) for r in rows] == [(2, 2), (3, 2), (1, 0)]
    assert rows[0]["anchors"] == 1 and rows[1]["retrieved"] == 0


def test_every_retrieval_method_is_one_plug_in_behind_the_dispatch_table(tmp_path):
    from curation.config import ConfigError
    from curation.stages.retrieval_methods import METHODS, Method, anchor_set_methods, method

    for name in METHODS:
        m = method(name)
        assert isinstance(m, Method) and m.name == name
        assert type(m).select is not Method.select, f"{name} has its own select"
    assert anchor_set_methods() == ("sample", "cluster", "as_is")  # balanced has its own section, no anchors
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    data = {"run_root": str(tmp_path / "run"), "input": {"url_list": str(anchors)},
            "retrieve": {"anchor_sets": [{"name": "a", "path": str(anchors), "method": "balanced"}]}}
    with pytest.raises(ConfigError, match="retrieve.anchor_sets.0.method: .*one of sample, cluster, as_is"):
        load_config(data=data)
    with pytest.raises(ValueError, match="unknown retrieval method 'nearest'"):
        method("nearest")
