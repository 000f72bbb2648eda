"""retrieve: choose the pool images to keep, by similarity to curated anchor sets (DINOv2 paper, sec. 3).

Units, one per anchor set (``set-<name>``) plus ``set-<balanced.name>`` when ``retrieve.balanced`` is given; each
writes ``retrieve/sets/<name>/{neighbors,selection,clusters}.parquet`` and, last, ``summary.json`` (its done mark):

* ``sample``: the k nearest pool images of each anchor (exact by default, recall@k 1.0; ``ivf_flat`` / ``ivf_pq``
  with recall@k against exact measured on ``recall_sample`` anchors; ``recall_at_k_vs_exact`` is null for the other
  methods, which do not search k nearest neighbours);
* ``cluster``: k-means of the pool into C clusters (C clamped to pool size / 4; cached in ``retrieve/_kmeans/`` and
  shared by the sets that use the same C), anchors assigned to their nearest centroid, from every cluster with
  more than m anchors up to n random pool images, at most ``cap`` per set; each selected image records its most
  similar anchor of the set;
* ``balanced`` (no anchors): hierarchical k-means with resampling and balanced top-down sampling to
  ``target_size`` (:mod:`curation.retrieval`);
* ``as_is``: the anchor set itself, copied (source ``anchors/<set>``).

``finalize`` merges them: ``retrieve/neighbors.parquet``; ``retrieve/selection.parquet`` (one row per selected image,
keeping its best match: highest similarity, ties to the set listed first); ``stats/retrieval_stats.parquet``;
``stats/cluster_stats.parquet``; and the ledger unit ``final`` for the pool keys received (kept = selected, else
``not_selected``, or ``embed_failed`` for images the embedder could not decode).

The pool is held in memory as float32 (N x D x 4 bytes: 40 GB for 10M x 1024), once per worker process, while a
third of ``scale.worker_memory_gb`` holds it; a larger pool is searched and clustered by partitions
(:mod:`curation.partitioned_pool`: searcher actors, Lloyd k-means; results under ``retrieve/_partitioned/``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation import accounting
from curation import retrieval as R
from curation.partitioned_pool import PartitionedPool, pool_plan
from curation.samples import iter_image_set
from curation.stages.base import Stage, Unit
from curation.workers import wants_gpu
from curation.storage import atomic_path, read_table, read_tables, write_json, write_table
from curation.vectors import input_keys, load_descriptors

_POOL_CACHE: dict = {}


def load_pool(root: Path, stage: str = "retrieve"):
    """(keys, vectors, urls dict, input table) of the pool images `stage` receives (cached per process)."""
    root = Path(root)
    parts = sorted((root / "embed" / "pool").glob("part-*.parquet"))
    inputs = input_keys(root, stage)
    sig = (str(root), tuple((p.name, p.stat().st_mtime_ns) for p in parts), inputs.num_rows)
    if _POOL_CACHE.get("sig") != sig:
        keys, vecs = load_descriptors(parts, inputs["key"].to_pylist())
        _POOL_CACHE.clear()
        _POOL_CACHE.update(sig=sig, value=(keys, vecs, inputs))
    return _POOL_CACHE["value"]


def _anchor_vectors(root: Path, name: str):
    return load_descriptors(sorted((Path(root) / "embed" / "anchors" / name).glob("part-*.parquet")))


def _selection_table(rows: dict, n: int) -> pa.Table:
    def col(name, typ):
        v = rows.get(name)
        return pa.array([None] * n if v is None else list(v), typ)

    return pa.table({
        "key": col("key", pa.string()), "source": col("source", pa.string()), "url": col("url", pa.string()),
        "anchor_set": col("anchor_set", pa.string()), "anchor_key": col("anchor_key", pa.string()),
        "rank": col("rank", pa.int32()), "similarity": col("similarity", pa.float32()),
        "cluster": col("cluster", pa.int64()),
    })


def _quantiles(sims) -> dict:
    sims = np.asarray(sims, np.float64)
    sims = sims[np.isfinite(sims)]
    if not len(sims):
        return {"similarity_p05": None, "similarity_p50": None, "similarity_p95": None}
    q = np.quantile(sims, [0.05, 0.5, 0.95])
    return {"similarity_p05": float(q[0]), "similarity_p50": float(q[1]), "similarity_p95": float(q[2])}


class RetrieveStage(Stage):
    name = "retrieve"

    def resources(self) -> dict[str, float]:

        return {"num_cpus": 1, "num_gpus": wants_gpu(self.cfg.retrieve.device)}

    # -- planning ----------------------------------------------------------------------------------------------
    def _sets(self) -> list[dict]:
        rc = self.cfg.retrieve
        sets = [{"name": a.name, "method": a.method} for a in rc.anchor_sets]
        if rc.balanced is not None:
            sets.append({"name": rc.balanced.name, "method": "balanced"})
        return sets

    def plan(self) -> list[Unit]:
        return [Unit(f"set-{s['name']}", s) for s in self._sets()]

    def _set_dir(self, name: str) -> Path:
        return self.dir / "sets" / name

    def is_done(self, unit: Unit) -> bool:
        return (self._set_dir(unit.payload["name"]) / "summary.json").exists()

    def _partitioned_pool(self, method: str) -> PartitionedPool | None:
        """The pool as partitions of ``scale.worker_memory_gb`` when it needs more than one (sample and cluster
        retrieval; balanced sampling still loads the pool)."""
        if method not in ("sample", "cluster"):
            return None
        files = sorted((self.root / "embed" / "pool").glob("part-*.parquet"))
        plan = pool_plan(files, input_keys(self.root, self.name)["key"], self.cfg.scale)
        return PartitionedPool(plan, self.cfg, self.dir / "_partitioned", self.cfg.retrieve.device) if plan else None

    # -- one anchor set ----------------------------------------------------------------------------------------
    def run_unit(self, unit: Unit) -> dict:
        name, method = unit.payload["name"], unit.payload["method"]
        out = self._set_dir(name)
        rc = self.cfg.retrieve
        acfg = next((a for a in rc.anchor_sets if a.name == name), None)
        neighbors = pa.table({"anchor_set": pa.array([], pa.string())})
        clusters = None
        summary = {"anchor_set": name, "method": method, "recall_at_k_vs_exact": None, "index": None}
        if method == "as_is":
            keys = [s.key for s in iter_image_set(acfg.path, acfg.format)]
            n = len(keys)
            sel = _selection_table({"key": keys, "source": [f"anchors/{name}"] * n, "anchor_set": [name] * n,
                                    "anchor_key": keys}, n)
            summary.update(anchors=n, retrieved=n, sims=[])
        else:
            pool = self._partitioned_pool(method)  # None while the pool fits one worker's budget
            pkeys, pvecs, inputs = (pool.keys, pool, input_keys(self.root, self.name)) if pool else load_pool(self.root)
            urls = dict(zip(inputs["key"].to_pylist(), inputs["url"].to_pylist()))
            try:
                if method == "sample":
                    sel, neighbors, summary = self._sample(acfg, pkeys, pvecs, urls, summary)
                elif method == "cluster":
                    sel, clusters, summary = self._cluster(acfg, pkeys, pvecs, urls, summary)
                else:
                    sel, clusters, summary = self._balanced(pkeys, pvecs, urls, summary)
            finally:
                if pool:
                    pool.close()
        sims = summary.pop("sims")
        summary.update(_quantiles(sims), selected=sel.num_rows)
        if neighbors.num_rows:
            write_table(out / "neighbors.parquet", neighbors, "neighbors")
        if clusters is not None:
            write_table(out / "clusters.parquet", clusters, "cluster_stats")
        write_table(out / "selection.parquet", sel, "selection")
        write_json(out / "summary.json", summary)
        return {"selected": sel.num_rows}

    def _sample(self, acfg, pkeys, pvecs, urls, summary):
        rc = self.cfg.retrieve
        akeys, avecs = _anchor_vectors(self.root, acfg.name)
        if isinstance(pvecs, PartitionedPool):
            res = pvecs.search(avecs, acfg.k, acfg.name, rc.recall_sample)
        else:
            res = R.search(avecs, pvecs, acfg.k, rc.index, nlist=rc.nlist, nprobe=rc.nprobe, pq_m=rc.pq_m,
                           recall_sample=rc.recall_sample, seed=self.cfg.seed, device=rc.device,
                           rerank=rc.pq_rerank)
        nq, k = res.ids.shape
        ok = res.ids.reshape(-1) >= 0
        pk = np.asarray(pkeys, dtype=object)
        ak = np.asarray(akeys, dtype=object)
        neighbors = pa.table({
            "anchor_set": pa.array([acfg.name] * int(ok.sum()), pa.string()),
            "anchor_key": pa.array(np.repeat(ak, k)[ok].tolist(), pa.string()),
            "rank": pa.array(np.tile(np.arange(k), nq)[ok], pa.int32()),
            "pool_key": pa.array(pk[res.ids.reshape(-1)[ok]].tolist(), pa.string()),
            "similarity": pa.array(res.sims.reshape(-1)[ok], pa.float32()),
        })
        pid, aid, rank, sim = R.sample_select(res.sims, res.ids)
        keys = pk[pid].tolist()
        n = len(keys)
        sel = _selection_table({"key": keys, "source": ["pool"] * n, "url": [urls.get(x) for x in keys],
                                "anchor_set": [acfg.name] * n, "anchor_key": ak[aid].tolist(), "rank": rank,
                                "similarity": sim}, n)
        summary.update(anchors=len(akeys), retrieved=int(ok.sum()), sims=res.sims.reshape(-1)[ok],
                       recall_at_k_vs_exact=res.recall, index=res.index, k=k)
        return sel, neighbors, summary

    def _pool_kmeans(self, pvecs, C: int):
        """Pool k-means with C clusters, cached under retrieve/_kmeans (shared by sets with the same C)."""
        rc = self.cfg.retrieve
        lloyd = isinstance(pvecs, PartitionedPool)  # Lloyd iterations over the partitions
        path = self.dir / "_kmeans" / f"pool-C{C}-seed{self.cfg.seed}-n{len(pvecs)}{'-lloyd' if lloyd else ''}.npz"
        if path.exists():
            z = np.load(path)
            return z["centroids"], z["labels"]
        if lloyd:
            cents, labels = pvecs.kmeans(C, rc.kmeans_iters)
        else:
            cents = R.kmeans(pvecs, C, rc.kmeans_iters, self.cfg.seed)
            labels, _ = R.assign(pvecs, cents, rc.device)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, centroids=cents, labels=labels)
        return cents, labels

    def _cluster(self, acfg, pkeys, pvecs, urls, summary):
        rc = self.cfg.retrieve
        akeys, avecs = _anchor_vectors(self.root, acfg.name)
        C = R.sensible_clusters(acfg.clusters, len(pvecs))
        if len(pvecs):
            cents, labels = self._pool_kmeans(pvecs, C)
            alabels, _ = R.assign(avecs, cents, rc.device)
        else:
            C, labels, alabels = 1, np.zeros(0, np.int64), np.zeros(len(akeys), np.int64)
        cs = R.cluster_select(labels, alabels, C, acfg.min_anchors_per_cluster, acfg.per_cluster, acfg.cap,
                              self.cfg.seed)
        pk = np.asarray(pkeys, dtype=object)
        keys = pk[cs.pool_idx].tolist()
        n = len(keys)
        # the most similar anchor of the set, for provenance and the report's grids
        sims, ids = R.knn(pvecs[cs.pool_idx], avecs, 1, device=rc.device) if n and len(akeys) else (None, None)
        ak = np.asarray(akeys, dtype=object)
        sel = _selection_table({
            "key": keys, "source": ["pool"] * n, "url": [urls.get(x) for x in keys], "anchor_set": [acfg.name] * n,
            "anchor_key": ak[ids[:, 0]].tolist() if ids is not None else None,
            "similarity": sims[:, 0] if sims is not None else None, "cluster": labels[cs.pool_idx]}, n)
        clusters = pa.table({"anchor_set": [acfg.name] * C, "cluster": np.arange(C, dtype=np.int64),
                             "size": cs.sizes.astype(np.int64), "anchors": cs.anchors.astype(np.int64),
                             "selected": cs.selected.astype(np.int64)})
        summary.update(anchors=len(akeys), retrieved=n, clusters=C, sims=sims[:, 0] if sims is not None else [],
                       index="kmeans")
        return sel, clusters, summary

    def _balanced(self, pkeys, pvecs, urls, summary):
        rc, bc = self.cfg.retrieve, self.cfg.retrieve.balanced
        if len(pvecs):
            levels = R.hierarchical_kmeans(pvecs, bc.levels, bc.resampling_steps, bc.resample_sizes,
                                           rc.kmeans_iters, self.cfg.seed, rc.device)
            idx = R.balanced_sample(levels, bc.target_size, self.cfg.seed, bc.leaf_sampling, pvecs)
            labels = levels[0].assignment
        else:
            levels, idx, labels = [], np.zeros(0, np.int64), np.zeros(0, np.int64)
        pk = np.asarray(pkeys, dtype=object)
        keys = pk[idx].tolist()
        n = len(keys)
        sel = _selection_table({"key": keys, "source": ["pool"] * n, "url": [urls.get(x) for x in keys],
                                "anchor_set": [bc.name] * n, "cluster": labels[idx]}, n)
        top = levels[-1].centroids.shape[0] if levels else 0
        C = len(levels[0].centroids) if levels else 0
        clusters = pa.table({"anchor_set": [bc.name] * C, "cluster": np.arange(C, dtype=np.int64),
                             "size": np.bincount(labels, minlength=C).astype(np.int64),
                             "anchors": np.zeros(C, np.int64),
                             "selected": np.bincount(labels[idx], minlength=C).astype(np.int64)})
        summary.update(anchors=0, retrieved=n, sims=[], index="hierarchical_kmeans",
                       levels=[len(lv.centroids) for lv in levels], top_clusters=top)
        return sel, clusters, summary

    # -- merge -------------------------------------------------------------------------------------------------
    def finalize(self) -> None:
        if accounting.ledger_path(self.root, self.name, "final").exists():
            return
        sets = self._sets()
        order = {s["name"]: i for i, s in enumerate(sets)}
        sels, nbrs, clus, summaries = [], [], [], []
        for s in sets:
            d = self._set_dir(s["name"])
            summaries.append(json.loads((d / "summary.json").read_text()))
            sels.append(read_table(d / "selection.parquet", "selection"))
            if (d / "neighbors.parquet").exists():
                nbrs.append(read_table(d / "neighbors.parquet", "neighbors"))
            if (d / "clusters.parquet").exists():
                clus.append(read_table(d / "clusters.parquet", "cluster_stats"))
        write_table(self.dir / "neighbors.parquet", pa.concat_tables(nbrs) if nbrs else read_tables([], "neighbors"),
                    "neighbors")
        stats = self.root / "stats"
        write_table(stats / "cluster_stats.parquet", pa.concat_tables(clus) if clus else read_tables([], "cluster_stats"),
                    "cluster_stats")
        allsel = pa.concat_tables(sels).to_pandas() if sels else read_tables([], "selection").to_pandas()
        # union: one row per (source, key), its best match (highest similarity, then the set listed first)
        allsel["_order"] = allsel["anchor_set"].map(order)
        allsel["_sim"] = allsel["similarity"].fillna(-np.inf)
        allsel = allsel.sort_values(["source", "key", "_sim", "_order"], ascending=[True, True, False, True],
                                    kind="mergesort")
        nsets = allsel.groupby(["source", "key"])["anchor_set"].transform("nunique")
        allsel["_shared"] = nsets > 1
        union = allsel.drop_duplicates(["source", "key"], keep="first")
        union_t = pa.Table.from_pandas(union.drop(columns=["_order", "_sim", "_shared"]), preserve_index=False)
        write_table(self.dir / "selection.parquet", union_t, "selection")
        rows = []
        for s, summ in zip(sets, summaries):
            mine = allsel[allsel["anchor_set"] == s["name"]]
            rows.append({
                "anchor_set": s["name"], "method": s["method"], "anchors": summ.get("anchors", 0),
                "retrieved": summ.get("retrieved", 0), "unique": int(len(mine)),
                "overlap_other_sets": int(mine["_shared"].sum()),
                "similarity_p05": summ.get("similarity_p05"), "similarity_p50": summ.get("similarity_p50"),
                "similarity_p95": summ.get("similarity_p95"), "recall_at_k_vs_exact": summ.get("recall_at_k_vs_exact"),
            })
        write_table(stats / "retrieval_stats.parquet", pa.Table.from_pylist(rows), "retrieval_stats")
        for line in R.degenerate_sets(rows):
            print(f"[retrieve] WARNING degenerate retrieval: {line}", file=sys.stderr, flush=True)
        self._write_ledger(set(union.loc[union["source"] == "pool", "key"]))

    def _write_ledger(self, selected: set[str]) -> None:
        inputs = input_keys(self.root, self.name)
        failed = {}
        for p in (self.root / "embed" / "pool" / "failed").glob("part-*.parquet"):
            for r in read_table(p, "embed_failures").to_pylist():
                failed[r["key"]] = f"{r['reason']}: {r['detail']}"
        embedded = set()
        for p in (self.root / "embed" / "pool").glob("part-*.parquet"):
            embedded.update(read_table(p).column("key").to_pylist())
        keys, urls, reasons, details = [], [], [], []
        for key, url in zip(inputs["key"].to_pylist(), inputs["url"].to_pylist()):
            keys.append(key)
            urls.append(url)
            if key in selected:
                reasons.append(None)
                details.append(None)
            elif key not in embedded:
                reasons.append("embed_failed")
                details.append(failed.get(key, "no embedding"))
            else:
                reasons.append("not_selected")
                details.append(None)
        accounting.write_ledger(self.root, self.name, "final",
                                accounting.make_ledger(self.name, keys, urls, reasons, details))
