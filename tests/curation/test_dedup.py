"""dedup stage: the k-NN graph, components, keep rule and eval contamination on hand-made descriptors, then the
demo corpus's planted copies (pixels descriptor) against its ground truth."""

from collections import Counter

import numpy as np
import pytest
import pyarrow.parquet as pq

from curation.pipeline import accounting
from curation.config import load_config
from curation.pipeline.runner import run_pipeline
from curation.stages.dedup import dedup_graph
from curation.data.vectors import descriptor_table as descriptors_table
from curation.pipeline.storage import write_table
from schemas import validate


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _vectors():
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(8, 32)))
    pool = [base[0], base[0] + 0.3 * base[1], base[0] + 0.6 * base[1],  # a chain: 0-1, 1-2 close, 0-2 less so
            base[2], base[3], base[3] + 0.2 * base[4],  # 3 alone; 4,5 a pair
            base[5] + 0.1 * base[6], base[7]]  # 6 a copy of the eval image; 7 alone
    evals = [base[5]]
    return _unit(pool), _unit(evals)


def test_dedup_graph_components():
    pool, evals = _vectors()
    g = dedup_graph(pool, evals, k=4, threshold=0.9, eval_threshold=0.45, device="cpu")
    lab = g["labels"]
    assert lab[0] == lab[1] == lab[2] and len({lab[0], lab[3], lab[4], lab[6], lab[7]}) == 5
    assert lab[4] == lab[5] and lab[6] == lab[8]  # node 8 is the eval image
    assert g["self_ids"].shape == (8, 4) and not (g["self_ids"] == np.arange(8)[:, None]).any()


@pytest.mark.parametrize("score_dtype", ["float32", "bfloat16"])
def test_stage_on_hand_made_descriptors(tmp_path, score_dtype):
    """Also with bfloat16 candidate scores: with 8 images every row is a candidate (k + 1 + the tie margin >= 8),
    so after the exact rescoring the verdicts are float32's and the measured recall is 1."""
    import json

    pool, evals = _vectors()
    root = tmp_path / "run"
    keys = [f"{i:010d}" for i in range(len(pool))]
    urls = tmp_path / "urls.csv"
    urls.write_text("url\nhttp://x.test/a\n")
    accounting.write_ledger(root, "filter", "00000",
                            accounting.make_ledger("filter", keys, [f"u{k}" for k in keys], [None] * len(keys)))
    write_table(root / "sscd" / "pool" / "part-00000.parquet", descriptors_table(keys, pool, "pool"), "descriptors")
    write_table(root / "sscd" / "eval" / "ev" / "part-00000.parquet", descriptors_table(["e0"], evals, "eval/ev"),
                "descriptors")
    # resolution from the hash tables: key 2 is the largest of the chain
    hashes = {"key": keys, "pixel_sha256": ["x"] * 8, "width": [10] * 8, "height": [10] * 8, "thumb": [b""] * 8,
              "border_fill": [0.0] * 8, "original_width": [100, 100, 300] + [100] * 5,
              "original_height": [100] * 8, "jpeg_quality": [90] * 8, "bytes_per_pixel": [1.0] * 8,
              "sharpness": [1.0] * 8, "canvas": [None] * 8, "canvas_width": [None] * 8, "canvas_height": [None] * 8}
    import pyarrow as pa

    write_table(root / "hash" / "part-00000.parquet", pa.table(hashes), "hashes")
    cfg = load_config(data={"run_root": str(root), "input": {"url_list": str(urls)}, "ray": {"local": True},
                            "stages": ["dedup"],
                            "dedup": {"threshold": 0.9, "k": 4, "eval_sets": [{"name": "ev", "path": str(tmp_path)}],
                                      "score_dtype": score_dtype}})
    run_pipeline(cfg, progress=False)
    led = {r["key"]: r for r in accounting.read_ledger(root, "dedup").to_pylist()}
    assert [led[k]["kept"] for k in keys] == [False, False, True, True, True, False, False, True]
    assert led[keys[0]]["reason"] == "copy_duplicate" and keys[2] in led[keys[0]]["detail"]
    assert led[keys[5]]["reason"] == "copy_duplicate" and keys[4] in led[keys[5]]["detail"]
    assert led[keys[6]]["reason"] == "eval_contamination" and "eval/ev/e0" in led[keys[6]]["detail"]
    comp = pq.read_table(root / "dedup" / "components.parquet")
    validate(comp, "components")
    rows = {(r["source"], r["key"]): r for r in comp.to_pylist()}
    assert rows[("eval/ev", "e0")]["nearest_key"] == keys[6]
    assert rows[("pool", keys[0])]["component_size"] == 3
    assert rows[("pool", keys[6])]["nearest_key"] == "eval/ev/e0"
    sizes = pq.read_table(root / "stats" / "component_sizes.parquet").to_pylist()
    assert {r["component_size"]: r["components"] for r in sizes} == {1: 2, 2: 2, 3: 1}
    thr = pq.read_table(root / "stats" / "dedup_thresholds.parquet").to_pylist()
    ev = {r["threshold"]: r["images_above"] for r in thr if r["kind"] == "eval/ev"}
    assert ev[np.float32(0.45)] == 1
    search = root / "stats" / "dedup_search.json"
    if score_dtype == "float32":
        assert not search.exists()  # float32 scoring is exact: nothing to report
    else:  # sampled: a block's first 64 queries, so every pool row's k + 1 (own match included) and the evaluation
        # image's nearest pool image; every one found
        assert json.loads(search.read_text()) == {"score_dtype": "bfloat16", "recall_vs_float32": 1.0,
                                                  "neighbours_sampled": 8 * 5 + 1, "k": 4}
    assert run_pipeline(cfg, progress=False)["dedup"]["ran"] == 0


def test_corpus_copies_and_eval_contamination(demo_cleaned):
    root = demo_cleaned["root"]
    truth = {f"{t['row_id']:010d}": t for t in demo_cleaned["truth"].to_pylist()}
    drops = {r["key"]: r for r in pq.read_table(root / "stats" / "drops.parquet").to_pylist()}
    accounting.check_invariants(root)
    validate(pq.read_table(root / "dedup" / "components.parquet"), "components")
    validate(pq.read_table(root / "stats" / "dedup_thresholds.parquet"), "dedup_thresholds")
    validate(pq.read_table(root / "stats" / "component_sizes.parquet"), "component_sizes")
    # evaluation-set copies: dropped as contamination (pixels descriptor through the same graph code)
    planted = {k for k, t in truth.items() if t["role"] == "eval_copy"}
    caught = {k for k in planted if drops.get(k, {}).get("reason") == "eval_contamination"}
    recall = len(caught) / len(planted)
    flagged = {k for k, r in drops.items() if r["reason"] == "eval_contamination"}
    eval_precision = len(flagged & planted) / max(1, len(flagged))
    # crop / flip / text copies: caught by dedup (or already by the hash, which sees small overlays and crops)
    copies = {k: t for k, t in truth.items() if t["expected_reason"] == "copy_duplicate"}
    by_dedup = {k for k in copies if drops.get(k, {}).get("stage") == "dedup"}
    by_any = {k for k in copies if drops.get(k, {}).get("stage") in ("hash", "dedup")}
    dedup_drops = [r for r in drops.values() if r["stage"] == "dedup" and r["reason"] == "copy_duplicate"]
    false = [r for r in dedup_drops if truth[r["key"]]["expected_stage"] is None]
    print(f"\ndedup on the demo corpus (pixels descriptor): eval copies recall {recall:.3f} precision "
          f"{eval_precision:.3f}; crop/flip/text copies caught {len(by_any)}/{len(copies)} ({len(by_dedup)} by dedup, "
          f"the rest by hash); copy_duplicate drops {len(dedup_drops)}, of which {len(false)} are siblings of a "
          f"periodic-pattern anchor that the truth expects kept")
    # every copy of an evaluation image is reported as contamination, whatever link caught it (truth has the count)
    assert caught == planted and flagged == planted, (planted - caught, flagged - planted)
    funnel_reasons = Counter(r["reason"] for r in drops.values())
    assert funnel_reasons["eval_contamination"] == sum(t["expected_reason"] == "eval_contamination"
                                                       for t in truth.values()) == 10
    assert by_any == set(copies), {k: copies[k]["edit"] for k in set(copies) - by_any}
    # every duplicate group's source survives dedup (each planted copy names an original that the truth keeps)
    led = {r["key"]: r for r in accounting.read_ledger(root, "dedup").to_pylist()}
    sources = {f"{t['dup_of_row']:010d}" for t in truth.values()
               if t["role"] in ("exact_duplicate", "near_duplicate")}
    assert sources and all(led[k]["kept"] for k in sources), [k for k in sources if not led[k]["kept"]]
    for k in by_dedup:  # the dropped copy names its original as the kept key
        assert f"{copies[k]['dup_of_row']:010d}" in drops[k]["detail"] or copies[k]["dup_of_row"] is None


# ------------------------------------------------------------------ the keep-one rule, in memory (no files, no graph)
def test_decide_duplicates_keeps_the_first_by_priority_and_names_each_reason():
    from curation.stages.dedup import decide_duplicates

    # pool 0-5 one component, pool 6-7 a second, pool 8 alone; node 9 is an evaluation image joined to 6-7
    labels = np.array([0, 0, 0, 0, 0, 0, 6, 6, 8, 6])
    is_eval = np.arange(10) == 9
    priority = [np.array([1, 0, 1, 1, 1, 1, 0, 0, 0]),  # image 1 first in the big component
                np.array([0, 0, 0, 0, 0, 0, 0, 0, 0])]
    pixels = np.array(["a", "s", "s", "b", "b", "c", "d", "d", "e"])  # 2 = 1's pixels; 3, 4 twins of each other
    group = np.array([0, 1, 2, 3, 4, 1, 6, 7, 8])  # 5 in the survivor's hash group
    v = decide_duplicates(labels, priority, is_eval, pixels, group)
    assert v.kept.tolist() == [False, True, False, False, False, False, False, False, True]
    assert v.reasons == ["copy_duplicate", None, "exact_duplicate", "copy_duplicate", "exact_duplicate",
                         "near_duplicate", "eval_contamination", "eval_contamination", None]
    assert v.survivor[:6].tolist() == [1] * 6
    assert v.twin[2] == 1 and v.twin[4] == 3  # 2 is judged as the survivor's twin, 4 through its twin 3
    assert v.eval_node.tolist() == [-1] * 6 + [9, 9, -1]


def test_decide_duplicates_ties_go_to_the_smaller_index_and_evaluation_images_never_survive():
    from curation.stages.dedup import decide_duplicates

    labels = np.array([0, 0, 0, 3, 3])  # node 0 is an evaluation image; pool nodes 1, 2 share its component
    is_eval = np.array([True, False, False, False, False])
    v = decide_duplicates(labels, np.zeros(4), is_eval)
    assert v.reasons == ["eval_contamination", "eval_contamination", None, "copy_duplicate"]
    assert v.eval_node.tolist() == [0, 0, -1, -1] and v.survivor.tolist() == [0, 0, 2, 2]
    empty = decide_duplicates(np.zeros(0, np.int64), [np.zeros(0)], np.zeros(0, bool))
    assert empty.reasons == [] and empty.kept.shape == (0,)


def test_duplicate_details_name_the_survivor_and_the_link():
    from curation.stages.dedup import decide_duplicates, duplicate_details

    X = _unit([[1, 0, 0], [1, 0.1, 0], [1, 0.2, 0], [0, 1, 0]])
    E = _unit([[0, 1, 0.1]])
    codes = np.array([[0b0000], [0b0000], [0b0111], [0]], np.uint8)
    labels = np.array([0, 0, 0, 3, 3])  # 0-2 a component (survivor 0); 3 joined to evaluation image 4
    v = decide_duplicates(labels, np.zeros(4), np.arange(5) == 4, np.array(["p", "p", "q", "r"]),
                          np.array([0, 0, 0, 3]))
    d = duplicate_details(v, ["k0", "k1", "k2", "k3"], ["eval/ev/e0"], X, E, codes, "pca", 0.45)
    assert d[0] is None and d[1] == "duplicate of k0 (same pixels)"
    assert d[2] == "duplicate of k0 (pca hash Hamming distance 3)"
    assert d[3] == f"duplicate component with evaluation image eval/ev/e0 (cosine {float(X[3] @ E[0]):.3f})"


def test_graph_statistics_in_memory():
    from curation.stages.dedup import component_size_histogram, threshold_stats

    labels = np.array([0, 0, 2, 3, 3, 3, 2])  # pool 0-5, node 6 an evaluation image joined to pool 2
    hist = component_size_histogram(labels, n=6).to_pylist()
    assert hist == [{"component_size": 2, "components": 2, "images": 4, "with_eval": 1},
                    {"component_size": 3, "components": 1, "images": 3, "with_eval": 0}]
    assert component_size_histogram(np.zeros(0, np.int64), n=0).num_rows == 0
    g = {"self_sims": np.array([[0.9, 0.2], [0.5, 0.1]], np.float32), "self_ids": np.array([[1, 0], [0, 1]]),
         "eval_sims": np.array([[0.7], [0.3]], np.float32), "eval_ids": np.array([[2], [3]])}
    rows = threshold_stats(g, n=2, eval_names=["a", "b"], thresholds=[0.4, 0.6]).to_pylist()
    got = {(r["kind"], r["threshold"]): (r["images_above"], r["edges_above"]) for r in rows}
    assert got == {("self", 0.4): (2, 2), ("self", 0.6): (1, 1), ("eval/a", 0.4): (1, 1), ("eval/a", 0.6): (1, 1),
                   ("eval/b", 0.4): (0, 0), ("eval/b", 0.6): (0, 0)}


def test_a_partitioned_dedup_reads_only_the_vectors_of_images_with_duplicates():
    from curation.stages.dedup import LoadedRows, rows_with_duplicates

    # nodes 0-5 pool, 6-7 evaluation: {0, 3} copies, {5, 6} pool image with an evaluation copy, 1, 2, 4 alone
    labels = np.array([0, 1, 2, 0, 4, 5, 5, 7])
    rows = rows_with_duplicates(labels, 6)
    assert rows.tolist() == [0, 3, 5]
    X = LoadedRows(6, rows, np.arange(6, dtype=np.float32).reshape(3, 2))
    assert X.shape == (6, 2) and X[3].tolist() == [2.0, 3.0] and X[np.array([5, 0])].tolist() == [[4, 5], [0, 1]]
    with pytest.raises(IndexError, match="not loaded"):
        X[1]
