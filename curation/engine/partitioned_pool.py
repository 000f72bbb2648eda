"""The pool of a global step, held by partitions: the one engine behind retrieval's k-NN search, its k-means and
hierarchical k-means (and, through the same searchers, dedup's graph).

:func:`pool_plan` cuts the pool's per-shard vector files into partitions of ``scale.worker_memory_gb`` - one when
it fits; :func:`array_pool` makes a pool of an array already in memory (k-means levels, tests).  Either way the same
code runs, so the result does not depend on the budget or the number of searchers: exact k-NN rescored
(:mod:`curation.engine.knn`), k-means seeded by global row and summed in fixed point
(:mod:`curation.engine.distributed_kmeans`).  :class:`PartitionedPool` offers ``len``, rows by index, ``search`` (exact, or
IVF with the pool's lists in every partition, its recall measured against exact search on a query sample) and ``kmeans``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from curation.engine.distributed_kmeans import KMeansResult, partitioned_kmeans, take_rows
from curation.engine.distributed_knn import Placement, Workers, partitioned_knn
from curation.engine.partitions import PartitionPlan, array_plan, plan_keys, plan_partitions


def pool_plan(files, keys, scale) -> PartitionPlan:
    """The partitions of the pool `files` restricted to `keys` under the ``scale`` config section."""
    return plan_partitions(files, scale.worker_memory_gb, keys=keys)


class PartitionedPool:
    """The pool of `plan`, searched and clustered by partitions.  `placement` says where the searchers run and which
    index they build (``exact`` for k-means and row access); results of searches go under `work_dir` (a temporary
    folder, removed by :meth:`close`, when None)."""

    def __init__(self, plan: PartitionPlan, work_dir: Path | None = None, placement: Placement | None = None,
                 block: int = 65_536):
        self.plan = plan
        self._tmp = None if work_dir is not None else Path(tempfile.mkdtemp(prefix="lvd-pool-"))
        self.work_dir = Path(work_dir) if work_dir is not None else self._tmp
        self.block = block
        self.placement = placement or Placement()
        pl = self.placement
        # exact search, k-means and rows; a reduced score precision applies to an exact index only (an IVF index's
        # recall is measured against float32 exact search)
        self.exact = Placement(use_ray=pl.use_ray, searchers=pl.searchers, device=pl.device, seed=pl.seed,
                               place_timeout_s=pl.place_timeout_s, call_timeout_s=pl.call_timeout_s,
                               score_dtype=pl.score_dtype if pl.index == "exact" else "float32")
        self._workers: Workers | None = None
        self._keys: list[str] | None = None

    @classmethod
    def of_stage(cls, stage, files, keys, device: str, search=None) -> "PartitionedPool":
        """The pool of a stage's vector `files` (restricted to `keys`) under its ``scale`` section, searchers on Ray
        when the run is; `search`: the retrieve section's index settings (exact when None)."""
        scale = stage.scale
        pl = Placement(use_ray=stage.uses_ray(), searchers=scale.searchers, device=device, seed=stage.seed)
        if search is not None:
            pl.index, pl.nlist, pl.nprobe, pl.pq_m, pl.rerank, pl.score_dtype = (
                search.index, search.nlist, search.nprobe, search.pq_m, search.pq_rerank, search.score_dtype)
        return cls(pool_plan(files, keys, scale), stage.layout.scratch(stage.name, "partitioned"), pl,
                   scale.query_block)

    def __len__(self) -> int:
        return self.plan.rows

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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

    def search(self, queries: np.ndarray, k: int, name: str, recall_sample: int = 1000, seed: int | None = None):
        """k nearest pool rows of each query (a :class:`curation.engine.retrieval.SearchResult`); one result file per query
        block under work_dir/<name>."""
        from curation.engine.retrieval import SearchResult, recall_at_k

        k = min(int(k), len(self))
        pl = self.placement
        exact = pl.index == "exact" or len(self) < 2
        queries = np.ascontiguousarray(queries, np.float32).reshape(len(queries), -1)
        if len(queries) == 0 or k == 0:
            return SearchResult(np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64),
                                1.0 if len(queries) else None, "exact")
        run = partitioned_knn(queries, self.plan, k, self.work_dir / name, placement=self.exact if exact else pl,
                              block=self.block, workers=self.workers if exact else None)
        sims, ids = run.results()
        if exact:  # float32 scoring is its own reference (recall 1.0); a reduced precision measures its recall
            dtype = self.exact.score_dtype
            return SearchResult(sims, ids, run.recall, "exact" if dtype == "float32" else f"exact, {dtype} scores")
        rng = np.random.default_rng(pl.seed if seed is None else seed)
        sample = np.sort(rng.choice(len(queries), min(recall_sample, len(queries)), replace=False))
        ref = partitioned_knn(queries[sample], self.plan, k, self.work_dir / f"{name}-exact", placement=self.exact,
                              block=self.block, workers=self.workers).results()[1]
        desc = sorted({i["index"] for i in run.worker_infos})
        return SearchResult(sims, ids, recall_at_k(ids[sample], ref),
                            f"{desc[0] if len(desc) == 1 else desc} per partition x{len(self.plan.partitions)}")

    def kmeans(self, k: int, niter: int, seed: int = 0, rows: np.ndarray | None = None) -> KMeansResult:
        return partitioned_kmeans(self.plan, self.workers, k, niter, seed, rows)

    def close(self) -> None:
        if self._workers is not None:
            self._workers.release()
            self._workers = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def array_pool(x: np.ndarray, partitions: int = 1, placement: Placement | None = None,
               block: int = 65_536) -> PartitionedPool:
    """A pool of the rows of an array in memory, in `partitions` partitions, searched in this process unless
    `placement` says otherwise."""
    return PartitionedPool(array_plan(x, partitions), None, placement, block)
