"""k-NN search over a partitioned database, on Ray searcher actors or in-process (DINOv2 dedup and retrieval at
cluster scale).

* :class:`PartitionWorker` holds one partition's vectors (:mod:`curation.engine.partitions`): it searches query blocks
  against them with :mod:`curation.engine.knn` (candidates by ``faiss.knn`` on the held array, faiss-gpu, or torch
  matmul + top-k on the device; ``ivf_flat`` / ``ivf_pq``: the partition's rows in a copy of the pool's IVF
  index, :func:`shared_ivf`; then exact rescoring) and serves the Lloyd steps of :mod:`curation.engine.distributed_kmeans`.
* :class:`Workers` places them: on Ray one actor per partition (one GPU each where the device setting and the
  cluster allow, :mod:`curation.cluster.gpu`; Ray's ``memory`` resource = the worker budget; never a CPU; SPREAD over
  nodes), at most ``searchers`` partitions at once (auto: one per GPU, else one per cluster CPU as far as cluster
  memory holds the budgets); more partitions run in *waves*.  Every wait on searchers is bounded
  (``Placement.place_timeout_s``, ``call_timeout_s``) and its error names the resources asked for.  Without Ray the
  partitions are loaded one at a time in this process.
* :func:`partitioned_knn` streams query blocks through every partition and merges each query's top-k exactly
  (order: similarity, then smaller global id, so the result does not depend on how the pool is partitioned).
  Each finished block is one Parquet file (written under a temporary name and renamed); a rerun skips finished
  blocks and, between waves, resumes from the last wave a block finished.  With ``edge_threshold`` each block also
  writes the edges (query row, neighbour row, similarity) above it, for :mod:`curation.engine.edge_components`.

Memory per searcher: its partition (at most a third of ``scale.worker_memory_gb``) and its rows' float64 squared norms
(8 bytes a row), its IVF index when asked, one query block and the block's scores; the driver holds one query
partition and one block's results.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.engine import knn
from curation.engine.partitions import Partition, PartitionPlan, iter_query_blocks, read_partition
from curation.pipeline.storage import atomic_path

SCORE_BYTES = 64 * 2**20  # k-means assigns at most this many bytes of a partition at once
RECALL_QUERIES = 64  # reduced-precision scoring: queries of each block whose recall is measured by an exact search


#: k-means sums are taken in fixed point (int64 units of 2**-30): integer addition is associative, so the centroids do
#: not depend on how the pool is partitioned; unit vectors keep ~9 decimal digits, and 2**33 rows cannot overflow
FIXED_POINT = 2.0**30


FIXED_POINT_ROWS = 8192  # rows quantised and summed at once: a chunk's quantised copy stays in cache-sized pieces


def fixed_point_sums(x: np.ndarray, labels: np.ndarray, k: int, threads: int = 0) -> np.ndarray:
    """Per-label sums of the rows of float32 `x` in fixed point: int64 [k, d] of rint(x * FIXED_POINT).

    Scaling by a power of two is exact in float32 and rounding a float32 to an integer gives a float32 integer, so
    the quantised rows are computed in float32.  Chunks of FIXED_POINT_ROWS rows are added up by a sparse one-hot
    product in float64, exact because a chunk's integer sums stay far below 2**53 (8192 x 2**30 = 2**43 for unit
    vectors; larger values are checked and summed in integer arithmetic), then the chunks' int64 sums are added:
    integer addition, so the chunking and the `threads` (0: as many as FAISS uses) change nothing."""
    from scipy.sparse import csr_matrix

    n, d = x.shape
    out = np.zeros((k, d), np.int64)
    if n == 0:
        return out

    def chunk(a: int) -> np.ndarray:
        b = min(n, a + FIXED_POINT_ROWS)
        q = np.multiply(x[a:b], np.float32(FIXED_POINT))
        np.rint(q, out=q)
        if (b - a) * max(float(q.max()), -float(q.min())) >= 2.0**53:  # too large for exact float64 sums
            part = np.zeros((k, d), np.int64)
            np.add.at(part, labels[a:b], q.astype(np.int64))
            return part
        onehot = csr_matrix((np.ones(b - a), (labels[a:b], np.arange(b - a))), shape=(k, b - a))
        return np.asarray(onehot @ q, np.float64).astype(np.int64)

    for part in knn.in_threads(chunk, range(0, n, FIXED_POINT_ROWS), threads):  # scipy's product releases the GIL
        out += part
    return out


def add_lloyd_stats(a: tuple, b: tuple) -> tuple:
    """The Lloyd statistics (fixed-point sums, counts, fixed-point norm sum) of two row sets together: integer
    addition, so any grouping of the partitions gives the same total."""
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def fixed_point_square_norms(sq: np.ndarray) -> int:
    """Sum of the rows' squared norms `sq` (:func:`curation.engine.knn.square_norms`) in fixed point (each rounded
    to a multiple of 1 / FIXED_POINT): an integer, the same however the rows are grouped."""
    return int(np.rint(np.asarray(sq, np.float64) * FIXED_POINT).astype(np.int64).sum())


def inertia_from_sums(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray, norms: int) -> float:
    """Summed squared distance of the rows to their centroids, from the step's exact statistics:
    sum |x|^2 - 2 sum_l c_l . S_l + sum_l n_l |c_l|^2 (S_l: the fixed-point sums), so it is the same at any
    partitioning, without a distance per row."""
    c = centroids.astype(np.float64)
    s = sums.astype(np.float64) / FIXED_POINT
    return float(norms / FIXED_POINT - 2 * np.einsum("kd,kd->", c, s) + counts @ np.einsum("kd,kd->k", c, c))


def peak_rss_bytes() -> int:
    """This process's own peak resident memory (VmHWM), not a maximum inherited from a parent as ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 0


# ------------------------------------------------------------------------------------------------- merging
def _sort_key(s: np.ndarray, i: np.ndarray) -> np.ndarray:
    """One uint64 per (similarity, id) whose ascending order is the merge order: the float32's bits made
    order-preserving and reversed in the high half (highest similarity first), the id in the low half (ties to the
    smaller id; -1 = 2**32 - 1, last).  Needs ids < 2**32 - 1; -0.0 is taken as 0.0 as the float comparison does."""
    b = (s + np.float32(0)).view(np.int32)  # + 0 turns -0.0 into 0.0
    asc = np.where(b < 0, b ^ np.int32(0x7FFFFFFF), b).astype(np.int64)  # same order as the floats
    hi = (np.int64(2**31 - 1) - asc).astype(np.uint64)  # reversed, in [0, 2**32)
    lo = np.where(i < 0, np.uint64(2**32 - 1), i.astype(np.uint64))
    return (hi << np.uint64(32)) | lo


def _from_sort_key(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = (np.int64(2**31 - 1) - (key >> np.uint64(32)).astype(np.int64)).astype(np.int32)
    sims = np.where(a < 0, a ^ np.int32(0x7FFFFFFF), a).view(np.float32)
    ids = (key & np.uint64(2**32 - 1)).astype(np.int64)
    ids[ids == 2**32 - 1] = -1
    return sims, ids


def merge_topk(sims: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of several candidate lists: highest similarity first, ties to the smaller id; id -1
    (padding, similarity -inf) last.  Exact, and independent of how the candidates were split.  Pools below 2**32
    rows sort one uint64 key per candidate (:func:`_sort_key`, ~4x faster than a two-key lexsort)."""
    s = np.concatenate(sims, 1)
    i = np.concatenate(ids, 1)
    s = np.where(i < 0, -np.inf, s).astype(np.float32)
    if i.size and i.max() < 2**32 - 1:
        s, i = _from_sort_key(np.sort(_sort_key(s, i), axis=1)[:, :k])
    else:
        tie = np.where(i < 0, np.iinfo(np.int64).max, i)
        order = np.lexsort((tie, -s), axis=1)[:, :k]
        s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    if s.shape[1] < k:  # fewer candidates than k: pad
        pad = k - s.shape[1]
        s = np.hstack([s, np.full((len(s), pad), -np.inf, np.float32)])
        i = np.hstack([i, np.full((len(i), pad), -1, np.int64)])
    return s, i


def drop_self(sims: np.ndarray, ids: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from a pool x pool result of k + 1 columns -> k columns (own match anywhere in
    the list, with exact duplicates it need not be first; when absent, the last column goes)."""
    own = ids == (first_row + np.arange(len(ids)))[:, None]
    own[~own.any(1), -1] = True
    keep = ~own
    return sims[keep].reshape(len(ids), -1), ids[keep].reshape(len(ids), -1)


# ------------------------------------------------------------------------------------------------- worker
def _widen(scores: np.ndarray, cand: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate arrays padded to `width` columns (-inf scores, -1 ids)."""
    if scores.shape[1] >= width:
        return scores, cand
    pad = width - scores.shape[1]
    return (np.pad(scores.astype(np.float32), ((0, 0), (0, pad)), constant_values=-np.inf),
            np.pad(np.asarray(cand, np.int64), ((0, 0), (0, pad)), constant_values=-1))


class PartitionWorker:
    """One partition in memory: k-NN search and Lloyd statistics against it (a Ray actor or a local object)."""

    def __init__(self, part: Partition, keys_filter=None, device: str = "cpu", index: str = "exact",
                 nlist: int = 0, nprobe: int = 32, seed: int = 0, threads: int = 0, pq_m: int = 0,
                 rerank: int = 0, score_dtype: str = "float32", ivf_template: tuple[bytes, str] | None = None):
        import faiss

        from curation.cluster import gpu

        if threads:
            faiss.omp_set_num_threads(threads)
        self.part = part
        _, self.x = read_partition(part, keys_filter, with_keys=False)
        # a searcher placed on a GPU slot that this process cannot use (no CUDA here) searches on the CPU
        self.device = gpu.resolve(device, fallback=True)
        self.ivf = None
        self.index = "exact"
        if index != "exact" and ivf_template is not None:  # the pool's shared lists: this partition's rows added
            self.ivf = faiss.deserialize_index(np.frombuffer(ivf_template[0], np.uint8))
            self.ivf.add(self.x)
            self.index = ivf_template[1]
        elif index != "exact" and len(self.x) >= 2:  # a partition searched alone: its own index
            from curation.engine.retrieval import build_ivf

            self.ivf, self.index = build_ivf(self.x, index, nlist, nprobe, pq_m, seed=seed)
        self.rerank = rerank if index == "ivf_pq" else 0
        if self.rerank > 1:
            self.index += f",rerank{self.rerank}x"
        # reduced-precision scoring (candidates only) is the torch matmul's; its recall is measured in search()
        self.score_dtype = score_dtype
        self.backend = knn.default_backend(self.device) if score_dtype == "float32" else "torch"
        self.device_db = knn.device_parts(self.x, self.device, score_dtype) if self.backend == "torch" and len(
            self.x) else None
        self.recall_sample = self.recall_hits = 0  # true neighbours in the sampled queries, and those found
        # rows' squared norms: the Lloyd steps' error bounds and inertia; the largest bounds the search scores'
        # error (knn.score_tolerance), which lets search() skip rescoring
        self.sq = knn.square_norms(self.x)
        self.db_norm = float(np.sqrt(self.sq.max())) if len(self.x) else 0.0
        self.threads = threads

    def info(self) -> dict:
        """Where this worker runs, on which device, and its peak resident memory (VmHWM of this process)."""
        ray = sys.modules.get("ray")  # only a Ray actor asks Ray; an in-process worker does not import it
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"
        return {"partition": self.part.index, "rows": len(self.x), "pid": os.getpid(), "node": node,
                "device": self.device, "peak_rss_bytes": peak_rss_bytes(), "index": self.index,
                "score_dtype": self.score_dtype, "recall_sample": self.recall_sample, "recall_hits": self.recall_hits}

    def search(self, q: np.ndarray, k: int, floor: np.ndarray | None = None, first: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query in this partition: (sims float32 [nq, k], global ids int64 [nq, k]), -1 padded;
        similarities rescored exactly (:func:`curation.engine.knn.rescore`), so they do not depend on the partitioning.

        `floor` (per query, the k-th best exact similarity in the partitions searched before, -inf for none): exact
        search rescores only the candidates whose score could reach it (:func:`curation.engine.knn.prune`); what it leaves
        out could not enter the merged top-k, so the merged result is the same.  With a floor, `first` (> 0) asks
        the backend for that many candidates first (a partition searched after others holds few of a query's best,
        and a shorter candidate list is cheaper to keep); a query whose worst candidate could still reach its
        floor is searched again for all k + TIE_MARGIN, so every candidate the floor keeps is found either way."""
        n = len(self.x)
        q = np.ascontiguousarray(q, np.float32)
        if min(k, n) == 0 or len(q) == 0:
            return merge_topk([np.zeros((len(q), 0), np.float32)], [np.zeros((len(q), 0), np.int64)], k)
        if self.ivf is not None:
            # IVF ranks coarsely (PQ codes) or over probed lists only: its candidates, rescored with the vectors held
            _, cand = self.ivf.search(q, min(n, max(self.rerank, 1) * k + knn.TIE_MARGIN))
        else:
            want = k + knn.TIE_MARGIN
            ask = min(want, first) if floor is not None and first > 0 else want
            scores, cand = knn.candidates(q, self.x, ask, self.backend, self.device_db, dtype=self.score_dtype)
            tol = knn.score_tolerance(q, self.db_norm, self.score_dtype)
            width = min(want, n)  # what the full search returns
            if ask < width:
                worst = np.where(cand >= 0, scores, np.inf).min(1)
                more = np.flatnonzero(worst + tol >= floor)  # rows below the worst one could reach the floor
                scores, cand = _widen(scores, cand, width)
                if len(more):
                    scores[more], cand[more] = _widen(*knn.candidates(q[more], self.x, want, self.backend,
                                                                     self.device_db, dtype=self.score_dtype), width)
            if self.score_dtype != "float32":
                self._measure_recall(q, k, scores, cand)
            cand = knn.prune(scores, cand, k, tol, floor)
        sims, ids = knn.rescore(q, self.x, np.asarray(cand, np.int64), k, self.threads)
        ids = np.where(ids < 0, -1, ids + self.part.offset)
        return merge_topk([sims], [ids], k)

    # -- Lloyd k-means (curation.engine.distributed_kmeans) ------------------------------------------------------------
    def _assign_chunks(self, centroids: np.ndarray, rows: np.ndarray | None, distances: bool = True
                       ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        """(local rows, their vectors, their squared norms, labels, squared distances or None) of this partition's
        rows (or `rows`), chunk by chunk; the vectors are a view when the rows are the whole partition."""
        rows = None if rows is None else np.asarray(rows, np.int64)
        total = len(self.x) if rows is None else len(rows)
        step = max(1, SCORE_BYTES // (4 * (self.x.shape[1] + 1)))
        for s in range(0, total, step):
            if rows is None:
                r, xs, sq = np.arange(s, min(total, s + step)), self.x[s:s + step], self.sq[s:s + step]
            else:
                r = rows[s:s + step]
                xs, sq = self.x[r], self.sq[r]
            labels, d2 = knn.nearest_centroid(xs, centroids, self.device, distances, sq, self.threads)
            yield r, xs, sq, labels, d2

    def lloyd_stats(self, centroids: np.ndarray, rows: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Per-centroid sums (int64, fixed point: x * FIXED_POINT rounded, so that adding partitions in any grouping
        gives the same total) and int64 counts of this partition's vectors (or local `rows`) assigned to them, and
        the fixed-point sum of their squared norms (:func:`inertia_from_sums` makes the step's inertia of these)."""
        k, d = centroids.shape
        sums = np.zeros((k, d), np.int64)
        counts = np.zeros(k, np.int64)
        norms = 0
        for _, xs, sq, labels, _ in self._assign_chunks(centroids, rows, distances=False):
            sums += fixed_point_sums(xs, labels, k, self.threads)
            counts += np.bincount(labels, minlength=k)
            norms += fixed_point_square_norms(sq)
        return sums, counts, norms

    def assign(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid (L2) of every row: (labels int64, squared distances float32)."""
        labels = np.empty(len(self.x), np.int64)
        d2 = np.empty(len(self.x), np.float32)
        for r, _, _, lab, dist in self._assign_chunks(centroids, None):
            labels[r], d2[r] = lab, dist
        return labels, d2

    def take(self, local_rows: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(local_rows, np.int64)]

    # -- reduced-precision recall, range search ------------------------------------------------------------------------
    def _measure_recall(self, q: np.ndarray, k: int, scores: np.ndarray, cand: np.ndarray) -> None:
        """Recall@k of reduced-precision candidates in this partition, on the first RECALL_QUERIES queries of a block:
        their exact top-k here (float32 FAISS candidates, rescored) against the top-k rescored from the candidates
        the reduced-precision scores found.  Rescoring keeps every found neighbour exact, so a miss is a true
        neighbour the reduced precision did not propose; summed into info() as recall_sample / recall_hits."""
        m = min(RECALL_QUERIES, len(q))
        qs = q[:m]
        tol = knn.score_tolerance(qs, self.db_norm, self.score_dtype)
        _, found = knn.rescore(qs, self.x, knn.prune(scores[:m], cand[:m], k, tol), k, self.threads)
        _, true = knn.knn_search(qs, self.x, k, device="cpu", backend="faiss")
        self.recall_sample += int((true >= 0).sum())
        self.recall_hits += sum(len(np.intersect1d(t[t >= 0], f[f >= 0])) for t, f in zip(true, found))

    def range_search(self, q: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row of this partition with inner product > `radius` per query (:func:`curation.engine.knn.range_search`,
        exact; with an IVF index its candidates, rescored: recall < 1): (lims, sims, global ids)."""
        lims, sims, ids = knn.range_search(q, self.x, radius, device=self.device, backend=self.backend,
                                           dtype=self.score_dtype, device_db=self.device_db, index=self.ivf,
                                           db_norm=self.db_norm)
        return lims, sims, ids + self.part.offset


def shared_ivf(plan: PartitionPlan, placement: "Placement") -> tuple[bytes, str] | None:
    """One empty IVF index (quantizer, PQ codebooks) trained on a sample of the whole pool drawn by global row with
    the seed, serialised: every partition's searcher adds its rows to a copy, so the lists a query probes and the
    codes it is ranked by are the pool's, not the partition's, and an IVF search gives the same candidates at any
    budget (up to a query's quantizer scores tied within float32 rounding).  The sample is read one partition at a
    time and holds at most ``IVF_TRAIN_MAX_ROWS`` rows."""
    import faiss

    from curation.engine.retrieval import ivf_train_rows, train_ivf

    pl, n = placement, plan.rows
    if pl.index == "exact" or n < 2:
        return None
    rows = ivf_train_rows(n, pl.nlist, pl.seed)
    sample = []
    for part in plan.partitions:
        _, x = read_partition(part, plan.keys_filter, with_keys=False)
        if rows is None:
            sample.append(x)
        else:
            lo, hi = np.searchsorted(rows, [part.offset, part.offset + part.rows])
            sample.append(x[rows[lo:hi] - part.offset])
        del x
    index, desc = train_ivf(np.concatenate(sample), n, pl.index, pl.nlist, pl.nprobe, pl.pq_m, pl.seed)
    return faiss.serialize_index(index).tobytes(), desc


# ------------------------------------------------------------------------------------------------- placement
@dataclass
class Placement:
    use_ray: bool = False
    searchers: int = 0  # partitions held at once; 0 = auto
    device: str = "auto"  # "auto": CUDA searchers when the cluster (or this machine) has GPUs
    index: str = "exact"
    nlist: int = 0
    nprobe: int = 32
    pq_m: int = 0
    rerank: int = 0  # ivf_pq: re-rank this many x k candidates exactly
    score_dtype: str = "float32"  # float16 / bfloat16: torch candidate scoring, recall measured (KnnRun.recall)
    seed: int = 0
    place_timeout_s: float = 600.0  # a searcher not placed and loaded within this is an error naming its resources
    call_timeout_s: float = 6 * 3600.0  # one call on the searchers of a wave (guards against a lost actor only)


class Workers:
    """Opens PartitionWorkers for a plan, wave by wave; keeps them open across calls when one wave holds all.

    On Ray each searcher asks for one GPU where the device setting and the cluster allow (:mod:`curation.cluster.gpu`),
    and for the memory budget; never for a CPU: the stage worker that drives them holds one (and no GPU), and
    several stage workers may run at once - waiting for resources they hold would deadlock."""

    def __init__(self, plan: PartitionPlan, placement: Placement):
        from curation.cluster import gpu

        self.plan = plan
        self.pl = placement
        self.infos: list[dict] = []  # info() of every worker opened, for peak-memory reports
        self._held: list | None = None
        self._ivf = None  # the pool's IVF index (shared_ivf), trained once; on Ray its object reference
        if placement.use_ray:
            import ray

            self.ray = ray
            total = ray.cluster_resources()
            self.gpus = gpu.worker_gpus(placement.device)
            node_mem = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
            self.memory = int(min(plan.budget_bytes, 0.9 * node_mem)) if node_mem else 0
            fit = int(total.get("memory", 0) // self.memory) if self.memory else len(plan.partitions)
            auto = max(1, int(total.get("GPU", 0))) if self.gpus else max(1, min(int(total.get("CPU", 1)), fit))
            self.device = "cuda" if self.gpus else "cpu"  # a searcher without CUDA falls back to its CPU
        else:
            self.ray = None
            self.gpus = 0
            self.memory = 0
            auto = 1  # in-process: one partition in memory at a time
            self.device = gpu.resolve(placement.device, fallback=True)
        self.width = max(1, min(placement.searchers or auto, len(plan.partitions) or 1))

    def resources(self) -> dict:
        """What one searcher actor asks Ray for."""
        return {"num_cpus": 0, "num_gpus": self.gpus, "memory": self.memory}

    @property
    def waves(self) -> list[list[Partition]]:
        ps = self.plan.partitions
        return [ps[i:i + self.width] for i in range(0, len(ps), self.width)]

    def open(self, parts: list[Partition]) -> list:
        pl = self.pl
        if pl.index != "exact" and self._ivf is None:
            self._ivf = shared_ivf(self.plan, pl)
            if self.ray is not None and self._ivf is not None:
                self._ivf = self.ray.put(self._ivf)  # one copy in the object store for every searcher of every wave
        template = self._ivf
        args = dict(keys_filter=self.plan.keys_filter, device=self.device, index=pl.index, nlist=pl.nlist,
                    nprobe=pl.nprobe, seed=pl.seed, pq_m=pl.pq_m, rerank=pl.rerank, score_dtype=pl.score_dtype,
                    ivf_template=template)
        if self.ray is None:
            return [PartitionWorker(p, **args) for p in parts]
        actor = self.ray.remote(PartitionWorker).options(**self.resources(), scheduling_strategy="SPREAD")
        handles = [actor.remote(p, threads=0 if self.gpus else 1, **args) for p in parts]
        refs = [h.info.remote() for h in handles]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=pl.place_timeout_s)
        if len(ready) < len(refs):
            waiting = [p.index for p, r in zip(parts, refs) if r not in ready]
            for h in handles:
                self.ray.kill(h)
            raise RuntimeError(
                f"searchers of partitions {waiting} asking {self.resources()} could not be placed (or load their "
                f"partition) within {pl.place_timeout_s:.0f} s; the cluster has {self.ray.cluster_resources()}")
        self.ray.get(refs)  # a searcher that failed to start raises its error here
        return handles

    def _get(self, refs: list, method: str, handles: list) -> list:
        from ray.exceptions import GetTimeoutError

        try:
            return self.ray.get(refs, timeout=self.pl.call_timeout_s)
        except GetTimeoutError:
            raise RuntimeError(f"searchers ({len(handles)}, asking {self.resources()}) did not answer {method} "
                               f"within {self.pl.call_timeout_s:.0f} s") from None

    def call(self, handles: list, method: str, *args) -> list:
        if self.ray is None:
            return [getattr(h, method)(*args) for h in handles]
        refs = [self.ray.put(a) if isinstance(a, np.ndarray) else a for a in args]
        return self._get([getattr(h, method).remote(*refs) for h in handles], method, handles)

    def call_each(self, handles: list, method: str, per_handle_args: list) -> list:
        """method(*args) on each handle with its own argument tuple."""
        if self.ray is None:
            return [getattr(h, method)(*a) for h, a in zip(handles, per_handle_args)]
        return self._get([getattr(h, method).remote(*a) for h, a in zip(handles, per_handle_args)], method, handles)

    def close(self, handles: list) -> None:
        try:
            self.infos += self.call(handles, "info")
        except Exception:  # noqa: BLE001 - a lost searcher has nothing to report; the others are stopped anyway
            pass
        finally:
            if self.ray is not None:
                for h in handles:
                    self.ray.kill(h)

    @contextlib.contextmanager
    def opened(self, wave: int):
        """The handles of wave `wave`: kept open (and reused) when one wave holds every partition, else opened
        here and closed on exit."""
        waves = self.waves
        if len(waves) == 1:
            if self._held is None:
                self._held = self.open(waves[0])
            yield self._held
            return
        handles = self.open(waves[wave])
        try:
            yield handles
        finally:
            self.close(handles)

    def map(self, method: str, *args) -> list:
        """method(*args) on every partition, results in partition order."""
        return self.map_each(method, lambda part: args)

    def map_each(self, method: str, args_of) -> list:
        """method(*args_of(partition)) on every partition, results in partition order."""
        out = []
        for w, wave in enumerate(self.waves):
            with self.opened(w) as handles:
                out += self.call_each(handles, method, [tuple(args_of(p)) for p in wave])
        return out

    def reduce_each(self, method: str, args_of, add):
        """``add``-reduced method(*args_of(partition)) over every partition: what summing map_each's list gives,
        without holding one result per partition.  On Ray each wave's results are added pairwise by Ray tasks (a
        tree: the partitions' results never meet in one process, only the wave's total comes here); in-process they
        are added as they come.  `add` must be associative and commutative on the results (the Lloyd statistics are
        integers), so the grouping changes nothing."""
        total = None
        for w, wave in enumerate(self.waves):
            with self.opened(w) as handles:
                per = [tuple(args_of(p)) for p in wave]
                if self.ray is None:
                    parts = (getattr(h, method)(*a) for h, a in zip(handles, per))
                else:
                    refs = [getattr(h, method).remote(*a) for h, a in zip(handles, per)]
                    adder = self.ray.remote(num_cpus=0)(add)  # as the searchers: the driving worker holds the CPU
                    while len(refs) > 1:
                        pairs = [adder.remote(refs[i], refs[i + 1]) for i in range(0, len(refs) - 1, 2)]
                        refs = pairs + refs[len(pairs) * 2:]
                    parts = self._get(refs, method, handles)
                for part in parts:
                    total = part if total is None else add(total, part)
        return total

    def release(self) -> None:
        if self._held is not None:
            self.close(self._held)
            self._held = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# ------------------------------------------------------------------------------------------------- search
def _query_blocks(queries, block: int) -> Iterator[tuple[int, np.ndarray]]:
    if isinstance(queries, PartitionPlan):
        yield from iter_query_blocks(queries, block)
    else:
        q = np.ascontiguousarray(queries, np.float32)
        for s in range(0, len(q), block):
            yield s, q[s:s + block]


def _block_starts(queries, block: int) -> list[int]:
    """First row of every query block, as _query_blocks cuts them (blocks never straddle partitions)."""
    if isinstance(queries, PartitionPlan):
        return [p.offset + s for p in queries.partitions for s in range(0, p.rows, block)]
    return list(range(0, len(queries), block))


def _search_block(workers: "Workers", handles: list, out: Path, start: int, q: np.ndarray, kk: int, w: int,
                  last: int, exclude_self: bool, edge_threshold: float | None) -> None:
    """Search one query block in wave `w`'s partitions, merge with the earlier waves' result, store it."""
    prev = _read_partial(out / _block_name(start, w - 1)) if w > 0 else None
    floor = prev[0][:, kk - 1].copy() if prev is not None and prev[0].shape[1] >= kk else None
    results = workers.call(handles, "search", q, kk, floor, _first_candidates(workers.waves, w, kk))
    sims = [r[0] for r in results]
    ids = [r[1] for r in results]
    if prev is not None:
        sims.append(prev[0])
        ids.append(prev[1])
    # one searcher's answer is already its merged top-kk
    s, i = (sims[0], ids[0]) if len(sims) == 1 else merge_topk(sims, ids, kk)
    if w < last:
        _write_partial(out / _block_name(start, w), s, i)
    else:
        if exclude_self:
            s, i = drop_self(s, i, start)
        if edge_threshold is not None:
            write_edges(out / "edges" / _block_name(start), start, s, i, edge_threshold)
        write_block(out / _block_name(start), start, s, i)
    if w > 0:
        (out / _block_name(start, w - 1)).unlink(missing_ok=True)


def _first_candidates(waves: list[list[Partition]], w: int, kk: int) -> int:
    """Candidates a partition of wave `w` is first asked for: twice the share of a query's top-kk it holds on
    average (its rows over all rows searched by then), plus the tie margin; the searcher widens where needed."""
    seen = sum(p.rows for wave in waves[:w] for p in wave)
    rows = max((p.rows for p in waves[w]), default=0)
    return int(np.ceil(2 * kk * rows / max(1, seen + rows))) + knn.TIE_MARGIN if w else 0


def _block_name(start: int, wave: int | None = None) -> str:
    """A finished block's result (Parquet, read by the callers) or a partial one merged up to `wave` (raw arrays:
    written and read once per wave, so their format is the fastest numpy has, uncompressed .npz)."""
    return f"block-{start:012d}" + (".parquet" if wave is None else f".w{wave:04d}.npz")


def _write_partial(path: Path, sims: np.ndarray, ids: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, sims=sims, ids=ids)

    _scratch(path, write)


def _read_partial(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z["sims"], z["ids"]


def _scratch(path: Path, write) -> None:
    """Write a working file atomically (temporary name, rename) without recording it as a unit output: block
    results and partial waves are the search's resumable state, not the stage's outputs (partials are deleted)."""
    with atomic_path(path, record=False) as tmp:
        write(tmp)


def _write_json(path: Path, obj) -> None:
    _scratch(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, sort_keys=True)))


def write_block(path: Path, start: int, sims: np.ndarray, ids: np.ndarray) -> None:
    n, k = ids.shape
    table = pa.table({
        "query": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), k),
        "sims": pa.FixedSizeListArray.from_arrays(pa.array(sims.reshape(-1)), k),
    })
    _scratch(path, lambda tmp: pq.write_table(table, tmp))


def read_block(path: Path) -> tuple[int, np.ndarray, np.ndarray]:
    t = pq.read_table(path)
    n = t.num_rows
    if n == 0:
        return 0, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
    ids = t["ids"].combine_chunks().flatten().to_numpy().reshape(n, -1)
    sims = t["sims"].combine_chunks().flatten().to_numpy().reshape(n, -1)
    return int(t["query"][0].as_py()), sims.astype(np.float32), ids.astype(np.int64)


def write_edges(path: Path, start: int, sims: np.ndarray, ids: np.ndarray, threshold: float) -> None:
    mask = (sims > threshold) & (ids >= 0)
    src = np.repeat(np.arange(start, start + len(ids), dtype=np.int64), ids.shape[1])[mask.ravel()]
    table = pa.table({"src": pa.array(src), "dst": pa.array(ids[mask]), "sim": pa.array(sims[mask])})
    _scratch(path, lambda tmp: pq.write_table(table, tmp))


@dataclass
class KnnRun:
    out_dir: Path
    blocks: list[Path]  # result files, in query order
    edges: list[Path]  # edge files (with edge_threshold), in query order
    partitions: int
    waves: int
    searchers: int  # partitions held at once
    worker_infos: list[dict]
    index: str

    @property
    def recall_sample(self) -> int:
        """Reduced-precision scoring: true per-partition neighbours of the sampled queries (0 at float32)."""
        return sum(i.get("recall_sample", 0) for i in self.worker_infos)

    @property
    def recall_hits(self) -> int:
        """Of those, the ones the reduced-precision candidates found."""
        return sum(i.get("recall_hits", 0) for i in self.worker_infos)

    @property
    def recall(self) -> float:
        """recall@k of the reduced-precision path (1.0 when nothing was sampled: float32 scoring is exact)."""
        return self.recall_hits / self.recall_sample if self.recall_sample else 1.0

    def results(self) -> tuple[np.ndarray, np.ndarray]:
        """All blocks concatenated (sims, ids), held in memory: queries x k (retrieval's anchors; the dedup graph's
        whole pool, n x k, which the edge files could stream instead)."""
        parts = [read_block(p) for p in self.blocks]
        parts = [p for p in parts if p[1].size]
        if not parts:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
        return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def partitioned_knn(queries, db: PartitionPlan, k: int, out_dir: str | Path, *, placement: Placement | None = None,
                    block: int = 65_536, exclude_self: bool = False, edge_threshold: float | None = None,
                    workers: Workers | None = None) -> KnnRun:
    """Top-`k` inner-product neighbours in `db` of every query (a PartitionPlan of the pool, or an array).

    `exclude_self` (queries are `db` itself): each row's own match is removed.  Results: one Parquet file per query
    block under `out_dir` (columns query, ids, sims; ids are global db rows, -1 padded).  A rerun with the same
    inputs skips finished blocks; with other inputs (another plan signature, k or threshold) `out_dir` is
    cleared first."""
    out = Path(out_dir)
    placement = placement or Placement()
    kk = k + 1 if exclude_self else k
    sig = {"db": db.signature(), "queries": queries.signature() if isinstance(queries, PartitionPlan) else
           f"array:{len(queries)}", "k": k, "exclude_self": exclude_self, "edge_threshold": edge_threshold,
           "block": block, "index": placement.index, "nlist": placement.nlist, "nprobe": placement.nprobe,
           "pq_m": placement.pq_m, "rerank": placement.rerank, "seed": placement.seed,
           "score_dtype": placement.score_dtype}
    sig_path = out / "plan.json"
    if sig_path.exists() and _read_json(sig_path) != sig:
        shutil.rmtree(out)
    (out / "edges").mkdir(parents=True, exist_ok=True)
    if not sig_path.exists():
        _write_json(sig_path, sig)
    own = workers is None
    workers = workers or Workers(db, placement)
    waves = workers.waves
    last = len(waves) - 1
    width_path = out / "waves.json"
    if not width_path.exists() or _read_json(width_path) != [len(w) for w in waves]:
        for partial in out.glob("block-*.w*"):  # merged over other waves: not resumable here
            partial.unlink()
        _write_json(width_path, [len(w) for w in waves])

    def done_wave(start: int) -> int:
        """Last wave whose partitions are merged into this block's stored result (-1: none)."""
        if (out / _block_name(start)).exists():
            return last
        for w in range(last - 1, -1, -1):
            if (out / _block_name(start, w)).exists():
                return w
        return -1

    starts = _block_starts(queries, block)
    try:
        for w in range(len(waves)):
            pending = {start for start in starts if done_wave(start) < w}
            if not pending:
                continue
            with workers.opened(w) as handles:
                for start, q in _query_blocks(queries, block):
                    if start in pending:
                        _search_block(workers, handles, out, start, q, kk, w, last, exclude_self, edge_threshold)
    finally:
        if own:
            workers.release()
    edges = [out / "edges" / _block_name(s) for s in starts] if edge_threshold is not None else []
    return KnnRun(out, [out / _block_name(s) for s in starts], edges, len(db.partitions), len(waves),
                  workers.width, workers.infos, placement.index)


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------------- range search
def partitioned_range_search(queries, db: PartitionPlan, radius: float, *, placement: Placement | None = None,
                             block: int = 65_536, workers: Workers | None = None
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row of `db` with inner product > `radius` per query (a PartitionPlan or an array), searched in every
    partition (:meth:`PartitionWorker.range_search`, wave by wave, query blocks of `block` rows) and merged per
    query: (lims int64 [nq + 1], sims float32, global ids int64), highest similarity first, ties to the smaller id.
    Exact search gives the same result whatever the partitioning; the result is held in memory (unlike
    :func:`partitioned_knn`'s block files), so it is for queries whose neighbourhoods fit."""
    placement = placement or Placement()
    own = workers is None
    workers = workers or Workers(db, placement)
    found: dict[int, list] = {}  # block start -> its per-partition results
    sizes: dict[int, int] = {}
    try:
        for w in range(len(workers.waves)):
            with workers.opened(w) as handles:
                for start, q in _query_blocks(queries, block):
                    sizes[start] = len(q)
                    found.setdefault(start, []).extend(workers.call(handles, "range_search", q, float(radius)))
    finally:
        if own:
            workers.release()
    blocks = [knn.merge_ranges(found[s], sizes[s]) for s in sorted(found)]
    if not blocks:
        return knn.empty_ranges(0)
    lims = [np.zeros(1, np.int64)]
    for b in blocks:
        lims.append(b[0][1:] + lims[-1][-1])
    return np.concatenate(lims), np.concatenate([b[1] for b in blocks]), np.concatenate([b[2] for b in blocks])
