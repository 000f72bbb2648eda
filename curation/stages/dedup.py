"""dedup: copy-detection self-deduplication and relative deduplication against evaluation sets (DINOv2 App. A.3).

One global unit (``final``), after the sscd stage has described the pool (keys kept by hash) and every evaluation
set:

1. **Self graph**: the k = ``dedup.k`` nearest pool neighbours of every pool image by cosine similarity
   (:func:`curation.knn.knn_search`: exact FAISS flat on CPU, chunked torch matmul + top-k on CUDA); an edge where
   similarity > ``dedup.threshold`` (0.6).
2. **Relative graph**: the k nearest evaluation images of every pool image; an edge where similarity >
   ``dedup.eval_threshold`` (0.45).
3. Connected components over pool and evaluation nodes together (:mod:`curation.components`, vectorised).
   A component holding any evaluation image is dropped whole (``eval_contamination``, ``detail`` names one
   evaluation image of the component).  Otherwise one image per component is kept - the largest resolution
   (size before download's resize, from the hash tables), then the smallest key, as in the hash stage - and the
   others are ``copy_duplicate`` with ``detail`` naming the kept key and the cosine similarity to it.

Outputs: ``dedup/components.parquet`` (schema ``components``: every pool and evaluation image with its component,
component size, kept flag, reason, nearest neighbour and similarity; evaluation rows have ``kept`` false and no
reason, and their keys are written ``eval/<set>/<key>`` wherever they appear as a neighbour),
``stats/dedup_thresholds.parquet`` (how many pool images have a nearest pool / evaluation neighbour above each
threshold of ``dedup.stats_thresholds``), ``stats/component_sizes.parquet`` (histogram), then the ledger unit
``final`` with one row per key the hash stage kept.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import accounting
from curation.components import connected_components, pick_one_per_component
from curation.distributed_knn import Placement
from curation.knn import knn_search, resolve_device
from curation.partitioned_dedup import partitioned_dedup_graph
from curation.partitioned_pool import in_ray, pool_plan
from curation.stages.base import Stage, Unit
from curation.stages.sscd import read_descriptors
from curation.storage import write_table

FINAL = "final"


def _resolution(root, keys: list[str]) -> np.ndarray:
    """Pixels per key (size before download's resize when known) from hash/part-*.parquet; 0 when unknown."""
    parts = sorted((root / "hash").glob("part-*.parquet"))
    if not parts:
        return np.zeros(len(keys), np.int64)
    cols = ["key", "width", "height", "original_width", "original_height"]
    t = pa.concat_tables([pq.read_table(p, columns=cols) for p in parts])
    ow = np.array(t["original_width"].fill_null(0), np.int64)
    oh = np.array(t["original_height"].fill_null(0), np.int64)
    res = np.where(ow * oh > 0, ow * oh, np.array(t["width"], np.int64) * np.array(t["height"], np.int64))
    by_key = dict(zip(t["key"].to_pylist(), res.tolist()))
    return np.array([by_key.get(k, 0) for k in keys], np.int64)


def dedup_graph(
    pool: np.ndarray,
    evals: np.ndarray,
    k: int,
    threshold: float,
    eval_threshold: float,
    device: str = "auto",
) -> dict[str, np.ndarray]:
    """The dedup graph and its components.  Nodes 0..n-1 are pool rows, n..n+m-1 evaluation rows.

    Returns labels (component per node), self_sims/self_ids (pool k-NN without self), eval_sims/eval_ids
    (pool -> eval k-NN, eval ids as node numbers), eval_nn_sims/eval_nn_ids (eval -> nearest pool)."""
    n, m = len(pool), len(evals)
    out: dict[str, np.ndarray] = {}
    if n:
        sims, ids = knn_search(pool, pool, min(k + 1, n), device=device)
        # drop each row's own match (normally rank 0; with exact duplicates it may sit anywhere in the list)
        own = ids == np.arange(n)[:, None]
        drop_last = ~own.any(1)
        own[drop_last, -1] = True  # keep a rectangular k: drop the last column where self did not appear
        keep = ~own
        self_sims = sims[keep].reshape(n, -1)
        self_ids = ids[keep].reshape(n, -1)
    else:
        self_sims = np.zeros((0, 0), np.float32)
        self_ids = np.zeros((0, 0), np.int64)
    src = [np.repeat(np.arange(n), self_ids.shape[1])[(self_sims > threshold).ravel()]]
    dst = [self_ids[self_sims > threshold]]
    if m and n:
        esims, eids = knn_search(pool, evals, min(k, m), device=device)
        mask = esims > eval_threshold
        src.append(np.repeat(np.arange(n), eids.shape[1])[mask.ravel()])
        dst.append(eids[mask] + n)
        nn_s, nn_i = knn_search(evals, pool, 1, device=device)
    else:
        esims, eids = np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        nn_s, nn_i = np.full((m, 1), -np.inf, np.float32), np.full((m, 1), -1, np.int64)
    src_a, dst_a = np.concatenate(src), np.concatenate(dst)
    ok = dst_a >= 0  # -1 ids pad searches with fewer than k rows
    out["labels"] = connected_components(n + m, src_a[ok], dst_a[ok])
    out.update(self_sims=self_sims, self_ids=self_ids, eval_sims=esims, eval_ids=eids + n,
               eval_nn_sims=nn_s[:, 0], eval_nn_ids=nn_i[:, 0])
    return out


class DedupStage(Stage):
    name = "dedup"

    def resources(self) -> dict[str, float]:
        from curation.stages.sscd import _cluster_has_gpu

        gpu = self.cfg.dedup.device != "cpu" and _cluster_has_gpu()
        return {"num_cpus": self.num_cpus, "num_gpus": 1 if gpu else 0}

    def plan(self) -> list[Unit]:
        return [Unit(FINAL)]

    def is_done(self, unit: Unit) -> bool:
        return accounting.ledger_path(self.root, self.name, unit.id).exists()

    def run_unit(self, unit: Unit) -> dict:
        dc = self.cfg.dedup
        inputs = accounting.kept_keys(self.root, accounting.previous_ledger_stage(self.name))
        in_keys = inputs["key"].to_pylist()
        keys, X = read_descriptors((self.root / "sscd" / "pool").glob("part-*.parquet"))
        if keys != in_keys:
            raise RuntimeError(f"dedup: sscd described {len(keys)} pool images but the previous stage kept "
                               f"{len(in_keys)} (run the sscd stage first)")
        eval_names, eval_keys, eval_vecs = [], [], []
        for es in dc.eval_sets:
            ek, ev = read_descriptors((self.root / "sscd" / "eval" / es.name).glob("part-*.parquet"))
            if ev.size and X.size and ev.shape[1] != X.shape[1]:
                raise RuntimeError(f"dedup: eval set {es.name} descriptors have dimension {ev.shape[1]}, pool "
                                   f"{X.shape[1]}")
            eval_names += [es.name] * len(ek)
            eval_keys += [f"eval/{es.name}/{k}" for k in ek]
            if len(ek):
                eval_vecs.append(ev)
        n, m = len(keys), len(eval_keys)
        E = np.concatenate(eval_vecs) if eval_vecs else np.zeros((0, X.shape[1] if X.size else 1), np.float32)
        device = resolve_device(dc.device)
        plan = pool_plan(sorted((self.root / "sscd" / "pool").glob("part-*.parquet")), None, self.cfg.scale)
        if plan is None:
            g = dedup_graph(X, E, dc.k, dc.threshold, dc.eval_threshold, device=device)
        else:  # issue 10: the k-NN search by partitions on searcher actors (X is still read whole for the details)
            g = partitioned_dedup_graph(plan, E, dc.k, dc.threshold, dc.eval_threshold, self.dir / "_partitioned",
                                        Placement(use_ray=in_ray() and not self.cfg.ray.local, device=dc.device,
                                                  searchers=self.cfg.scale.searchers), self.cfg.scale.query_block)
        labels = g["labels"]
        node_keys = np.array(keys + eval_keys, dtype=object)

        # components with an evaluation image: the (smallest) eval node of each such component
        comp_eval = np.full(n + m, -1, np.int64)
        if m:
            ev_nodes = np.arange(n, n + m)
            order = np.argsort(-ev_nodes)  # assign larger first so the smallest eval node wins
            comp_eval[labels[ev_nodes[order]]] = ev_nodes[order]
        pool_eval = comp_eval[labels[:n]]
        contaminated = pool_eval >= 0

        # one kept image per clean component: largest resolution, then smallest key (keys are sorted)
        res = _resolution(self.root, keys)
        priority = np.concatenate([-res, np.zeros(m, np.int64)])
        is_pool = np.arange(n + m) < n
        # evaluation nodes never win: give them the worst priority
        priority = np.where(is_pool, priority, np.iinfo(np.int64).max)
        keep_node = pick_one_per_component(labels, priority)
        kept_of = np.full(n + m, -1, np.int64)
        kept_of[labels[keep_node]] = np.flatnonzero(keep_node)
        pool_kept_of = kept_of[labels[:n]]
        keep = keep_node[:n] & ~contaminated

        reasons, details = [], []
        for i in range(n):
            if contaminated[i]:
                reasons.append("eval_contamination")
                e = pool_eval[i]
                sim = float(X[i] @ E[e - n])
                details.append(f"duplicate component with evaluation image {node_keys[e]} (cosine {sim:.3f})")
            elif keep[i]:
                reasons.append(None)
                details.append(None)
            else:
                j = pool_kept_of[i]
                reasons.append("copy_duplicate")
                details.append(f"duplicate of {keys[j]} (cosine {float(X[i] @ X[j]):.3f})")

        # nearest neighbour of every node (pool: best of pool and eval neighbours; eval: nearest pool image)
        ss, si = g["self_sims"], g["self_ids"]
        es_, ei = g["eval_sims"], g["eval_ids"]
        best_s = np.full(n, -np.inf, np.float32)
        best_i = np.full(n, -1, np.int64)
        if ss.size:
            best_s, best_i = ss[:, 0].copy(), si[:, 0].copy()
        if es_.size:
            better = es_[:, 0] > best_s
            best_s[better], best_i[better] = es_[better, 0], ei[better, 0]
        nn_s = np.concatenate([best_s, g["eval_nn_sims"]])
        nn_i = np.concatenate([best_i, g["eval_nn_ids"]])
        sizes = np.bincount(labels, minlength=n + m)[labels] if n + m else np.zeros(0, np.int64)
        comp = pa.table({
            "key": pa.array(node_keys[:n].tolist() + [k.split("/", 2)[2] for k in eval_keys], pa.string()),
            "source": pa.array(["pool"] * n + [f"eval/{s}" for s in eval_names], pa.string()),
            "component": pa.array(labels.astype(np.int64)),
            "component_size": pa.array(sizes.astype(np.int64)),
            "kept": pa.array(np.concatenate([keep, np.zeros(m, bool)])),
            "reason": pa.array(reasons + [None] * m, pa.string()),
            "nearest_key": pa.array([node_keys[j] if j >= 0 else None for j in nn_i], pa.string()),
            "nearest_similarity": pa.array([float(s) if np.isfinite(s) else None for s in nn_s], pa.float32()),
        })
        write_table(self.dir / "components.parquet", comp, "components")
        self._write_stats(g, labels, n, m, eval_names)
        url = dict(zip(in_keys, inputs["url"].to_pylist()))
        ledger = accounting.make_ledger(self.name, keys, [url[k] for k in keys], reasons, details)
        accounting.write_ledger(self.root, self.name, FINAL, ledger)
        return {"kept": int(keep.sum()), "copy_duplicate": reasons.count("copy_duplicate"),
                "eval_contamination": reasons.count("eval_contamination")}

    def _write_stats(self, g, labels, n, m, eval_names) -> None:
        dc = self.cfg.dedup
        thresholds = sorted(set(dc.stats_thresholds) | {dc.threshold, dc.eval_threshold})
        rows = []
        ss = g["self_sims"]
        top = ss[:, 0] if ss.size else np.full(n, -np.inf)
        for t in thresholds:
            above = int((top > t).sum())
            rows.append({"kind": "self", "threshold": t, "images_above": above,
                         "fraction_above": above / n if n else 0.0, "edges_above": int((ss > t).sum())})
        es, ei = g["eval_sims"], g["eval_ids"]
        names = np.array(eval_names, dtype=object)
        for name in dict.fromkeys(eval_names):
            if es.size:
                mine = (ei >= n) & (names[np.clip(ei - n, 0, max(m - 1, 0))] == name)
                s = np.where(mine, es, -np.inf)
            else:
                s = np.full((n, 1), -np.inf)
            best = s.max(1) if s.size else np.full(n, -np.inf)
            for t in thresholds:
                above = int((best > t).sum())
                rows.append({"kind": f"eval/{name}", "threshold": t, "images_above": above,
                             "fraction_above": above / n if n else 0.0, "edges_above": int((s > t).sum())})
        write_table(self.root / "stats" / "dedup_thresholds.parquet", pa.Table.from_pylist(rows), "dedup_thresholds")
        comp_sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
        has_eval = np.zeros(len(comp_sizes), bool)
        if m:
            has_eval[labels[n:]] = True
        present = comp_sizes > 0
        sizes = comp_sizes[present]
        hist_rows = []
        for size in np.unique(sizes):
            sel = comp_sizes == size
            hist_rows.append({"component_size": int(size), "components": int(sel.sum()),
                              "images": int(size * sel.sum()), "with_eval": int((sel & has_eval).sum())})
        table = pa.Table.from_pylist(hist_rows) if hist_rows else None
        if table is None:
            from schemas import empty

            table = empty("component_sizes")
        write_table(self.root / "stats" / "component_sizes.parquet", table, "component_sizes")
