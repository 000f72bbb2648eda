"""The dedup graph (DINOv2 App. A.3) of a pool held by partitions (one when it fits the budget): the one
implementation the dedup stage and :func:`curation.stages.dedup.dedup_graph` (arrays in memory) run, with the
edges spilled per query block.

* self graph: :func:`curation.engine.distributed_knn.partitioned_knn` of the pool against itself (own match removed),
  edges where similarity > ``threshold`` written per query block;
* relative graph: each pool query block against the evaluation descriptors (held whole: evaluation sets are small),
  edges where similarity > ``eval_threshold`` per block, evaluation nodes numbered after the pool's;
* components: :func:`curation.engine.edge_components.streamed_components` over both edge sets (int64 labels, memory
  O(nodes)).

:func:`partitioned_dedup_graph` returns the graph's arrays (n x k neighbour tables, assembled from the block
files, so the caller holds n x k in memory); the components are labelled from the edge files, streamed.  Block and
edge files stay under ``work_dir`` (the dedup stage's scratch folder), so an interrupted graph resumes from its
finished blocks; nothing reads them after the graph is built.  With a reduced score precision
(``placement.score_dtype``), ``search_recall`` is the recall measured against float32 scoring over
``search_recall_sample`` true neighbours of the searches on the pool's searchers (the self graph's k + 1, own match
included, and each evaluation image's nearest pool image; 1.0 and 0 at float32).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from curation.engine.distributed_knn import KnnRun, Placement, Workers, write_block, write_edges, partitioned_knn
from curation.engine.edge_components import edge_batches, streamed_components
from curation.engine.knn import knn_search
from curation.engine.partitions import PartitionPlan, iter_query_blocks


def _pool_vs_eval(pool: PartitionPlan, evals: np.ndarray, k: int, eval_threshold: float, out: Path,
                  block: int) -> KnnRun:
    """k nearest evaluation images of every pool image, per pool query block (resumable like partitioned_knn)."""
    out.mkdir(parents=True, exist_ok=True)
    blocks, edges = [], []
    for start, q in iter_query_blocks(pool, block):
        name = f"block-{start:012d}.parquet"
        blocks.append(out / name)
        edges.append(out / "edges" / name)
        if blocks[-1].exists():
            continue
        sims, ids = knn_search(q, evals, k, device="cpu")
        write_edges(edges[-1], start, sims, ids, eval_threshold)
        write_block(blocks[-1], start, sims, ids)
    return KnnRun(out, blocks, edges, 1, 1, 1, [], "exact")


def partitioned_dedup_graph(pool: PartitionPlan, evals: np.ndarray, k: int, threshold: float,
                            eval_threshold: float, work_dir: str | Path, placement: Placement | None = None,
                            block: int = 65_536, links: tuple[np.ndarray, np.ndarray] | None = None
                            ) -> dict[str, np.ndarray]:
    """Nodes 0..n-1 are pool rows (plan order), n..n+m-1 evaluation rows; the keys of dedup_graph's result.
    `links` are extra pool-pool edges (the hash groups), joined into the components like the searched edges."""
    work = Path(work_dir)
    placement = placement or Placement()
    n, m = pool.rows, len(evals)
    with Workers(pool, placement) as workers:
        self_run = partitioned_knn(pool, pool, k, work / "self", exclude_self=True, edge_threshold=threshold,
                                   block=block, workers=workers, placement=placement)
        if m and n:
            eval_run = _pool_vs_eval(pool, np.ascontiguousarray(evals, np.float32), min(k, m), eval_threshold,
                                     work / "eval", block)
            nn = partitioned_knn(evals, pool, 1, work / "eval_nn", block=block, workers=workers,
                                 placement=placement).results()
        else:
            eval_run, nn = None, (np.full((m, 1), -np.inf, np.float32), np.full((m, 1), -1, np.int64))
    batch = max(4_000_000, n + m)  # each batch costs O(nodes): batches of >= n edges keep that amortised
    batches = edge_batches(self_run.edges, batch_edges=batch)
    if eval_run is not None:
        batches = itertools.chain(batches, edge_batches(eval_run.edges, dst_offset=n, batch_edges=batch))
    if links is not None:
        batches = itertools.chain(batches, [(np.asarray(links[0], np.int64), np.asarray(links[1], np.int64))])
    labels = streamed_components(n + m, batches)
    self_sims, self_ids = self_run.results() if n else (np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64))
    if n and n <= k:  # fewer rows than k + 1: drop the padding columns, as an unpadded search would
        self_sims, self_ids = self_sims[:, :n - 1], self_ids[:, :n - 1]
    if eval_run is not None:
        esims, eids = eval_run.results()
    else:
        esims, eids = np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    return {"labels": labels, "self_sims": self_sims, "self_ids": self_ids, "eval_sims": esims,
            "eval_ids": eids + n, "eval_nn_sims": nn[0][:, 0], "eval_nn_ids": nn[1][:, 0],
            "self_edge_files": self_run.edges, "eval_edge_files": eval_run.edges if eval_run else [],
            "search_recall": self_run.recall, "search_recall_sample": self_run.recall_sample}
