"""The pool of a global step held by partitions, when it exceeds one worker's memory budget (``scale``).

:func:`pool_plan` returns None while the pool's vectors fit one partition: the stages then keep today's in-process
path unchanged.  Otherwise :class:`PartitionedPool` stands in for the pool array where the retrieve stage needs
it: ``len``, rows by index, the k-NN search of anchors (:func:`curation.distributed_knn.partitioned_knn`, recall
of IVF measured against exact search on a sample, as :func:`curation.retrieval.search` does) and k-means
(:func:`curation.distributed_kmeans.partitioned_kmeans`, Lloyd iterations over the partitions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from curation.distributed_kmeans import partitioned_kmeans, take_rows
from curation.distributed_knn import Placement, Workers, partitioned_knn
from curation.partitions import PartitionPlan, plan_keys, plan_partitions
from curation.retrieval import SearchResult, recall_at_k


def pool_plan(files, keys, scale) -> PartitionPlan | None:
    """The partitions of the pool `files` restricted to `keys` under the ``scale`` config section, or None when
    one partition holds it all (unless ``scale.partitioned`` is 'always')."""
    plan = plan_partitions(files, scale.worker_memory_gb, keys=keys)
    return plan if len(plan.partitions) > 1 or (scale.partitioned == "always" and plan.rows) else None


class PartitionedPool:
    """The pool of `plan`, searched and clustered by partitions.  ``search`` holds the search settings (the retrieve
    section: index, nlist, nprobe, pq_m, pq_rerank), ``scale`` the scale section (searchers, query_block); with
    ``use_ray`` the searchers are Ray actors, else objects in this process."""

    def __init__(self, plan: PartitionPlan, work_dir: Path, search, scale, seed: int, use_ray: bool,
                 device: str = "auto"):
        self.plan = plan
        self.work_dir = Path(work_dir)
        self.block = scale.query_block
        self.seed = seed
        self.exact = Placement(use_ray=use_ray, searchers=scale.searchers, device=device, seed=seed)
        self.placement = Placement(use_ray=use_ray, searchers=scale.searchers, device=device, index=search.index,
                                   nlist=search.nlist, nprobe=search.nprobe, pq_m=search.pq_m,
                                   rerank=search.pq_rerank, seed=seed)
        self._workers: Workers | None = None
        self._keys: list[str] | None = None

    def __len__(self) -> int:
        return self.plan.rows

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = plan_keys(self.plan)
        return self._keys

    @property
    def workers(self) -> Workers:
        """Exact-search workers, kept across calls (k-means, rows) while one wave holds every partition."""
        if self._workers is None:
            self._workers = Workers(self.plan, self.exact)
        return self._workers

    def __getitem__(self, rows) -> np.ndarray:
        return take_rows(self.plan, self.workers, rows)

    def search(self, queries: np.ndarray, k: int, name: str, recall_sample: int) -> SearchResult:
        """k nearest pool rows of each query; one result file per query block under work_dir/<name>."""
        k = min(int(k), len(self))
        pl = self.placement
        exact = pl.index == "exact"
        run = partitioned_knn(queries, self.plan, k, self.work_dir / name, placement=pl, block=self.block,
                              workers=self.workers if exact else None)
        sims, ids = run.results()
        if len(queries) == 0:
            return SearchResult(sims, ids, None, "exact" if exact else pl.index)
        if exact:
            return SearchResult(sims, ids, 1.0, "exact")
        rng = np.random.default_rng(self.seed)
        sample = np.sort(rng.choice(len(queries), min(recall_sample, len(queries)), replace=False))
        ref = partitioned_knn(queries[sample], self.plan, k, self.work_dir / f"{name}-exact", placement=self.exact,
                              block=self.block, workers=self.workers).results()[1]
        desc = sorted({i["index"] for i in run.worker_infos})
        return SearchResult(sims, ids, recall_at_k(ids[sample], ref),
                            f"{desc[0] if len(desc) == 1 else desc} per partition x{len(self.plan.partitions)}")

    def kmeans(self, k: int, niter: int) -> tuple[np.ndarray, np.ndarray]:
        res = partitioned_kmeans(self.plan, self.workers, k, niter, self.seed)
        return res.centroids, res.labels

    def close(self) -> None:
        if self._workers is not None:
            self._workers.release()
            self._workers = None
