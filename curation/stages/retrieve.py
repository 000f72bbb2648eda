"""retrieve: choose the pool images to keep, by similarity to curated anchor sets (DINOv2 paper, sec. 3).

Units, one per anchor set (``set-<name>``) plus ``set-<balanced.name>`` when ``retrieve.balanced`` is given; each
writes ``retrieve/sets/<name>/{neighbors,selection,clusters}.parquet`` and ``summary.json`` (counts, quantiles):

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

Every method reads the pool through one engine (:mod:`curation.partitioned_pool`): partitions of
``scale.worker_memory_gb`` (one when the pool fits), searched and clustered by searchers - Ray actors when the run is
on Ray, else objects in the worker - with results under ``retrieve/_partitioned/``.  Exact search, k-means and
hierarchical k-means give the same selection at any budget and number of searchers; an IVF index is built per
partition, so its (approximate) result depends on the partitioning.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pyarrow as pa

from curation import accounting
from curation import retrieval as R
from curation.knn import knn_search
from curation.partitioned_pool import PartitionedPool
from curation.samples import iter_image_set
from curation.stages.base import Stage, Unit
from curation.storage import atomic_path, read_table, read_tables, write_json, write_table
from curation.vectors import load_descriptors

NO_NEIGHBORS = pa.table({"anchor_set": pa.array([], pa.string())})  # a set that searched no k nearest neighbours


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


def ledger_verdicts(keys: list[str], selected: set[str], embedded: set[str], failed: dict[str, str]
                    ) -> tuple[list[str | None], list[str | None]]:
    """(reason, detail) per pool key the stage received: kept (None) when selected; ``embed_failed`` when the
    embedder has no vector for it (detail: its failure, from `failed`, or "no embedding"); else ``not_selected``."""
    reasons, details = [], []
    for key in keys:
        if key in selected:
            reasons.append(None)
            details.append(None)
        elif key not in embedded:
            reasons.append("embed_failed")
            details.append(failed.get(key, "no embedding"))
        else:
            reasons.append("not_selected")
            details.append(None)
    return reasons, details


def union_of_selections(sels: list[pa.Table], set_names: list[str]) -> tuple[pa.Table, pd.DataFrame]:
    """The union of the sets' selections (sets in `set_names` order): one row per (source, key), its best match
    (highest similarity, then the set listed first), sorted by (source, key); and every set's rows with
    ``_shared``: the image is selected by another set too."""
    allsel = pa.concat_tables(sels).to_pandas() if sels else read_tables([], "selection").to_pandas()
    allsel["_order"] = allsel["anchor_set"].map({name: i for i, name in enumerate(set_names)})
    allsel["_sim"] = allsel["similarity"].fillna(-np.inf)
    allsel = allsel.sort_values(["source", "key", "_sim", "_order"], ascending=[True, True, False, True],
                                kind="mergesort")
    allsel["_shared"] = allsel.groupby(["source", "key"])["anchor_set"].transform("nunique") > 1
    union = allsel.drop_duplicates(["source", "key"], keep="first")
    union_t = pa.Table.from_pandas(union.drop(columns=["_order", "_sim", "_shared"]), preserve_index=False)
    return union_t, allsel


def retrieval_stats(sets: list[dict], summaries: list[dict], shared: pd.DataFrame) -> list[dict]:
    """``stats/retrieval_stats.parquet`` rows: per set its summary's counts and quantiles, the images it selected
    (``unique``) and how many of them another set selected too (`shared`: :func:`union_of_selections`)."""
    rows = []
    for s, summ in zip(sets, summaries):
        mine = shared[shared["anchor_set"] == s["name"]]
        rows.append({
            "anchor_set": s["name"], "method": s["method"], "anchors": summ.get("anchors", 0),
            "retrieved": summ.get("retrieved", 0), "unique": int(len(mine)),
            "overlap_other_sets": int(mine["_shared"].sum()),
            "similarity_p05": summ.get("similarity_p05"), "similarity_p50": summ.get("similarity_p50"),
            "similarity_p95": summ.get("similarity_p95"), "recall_at_k_vs_exact": summ.get("recall_at_k_vs_exact"),
        })
    return rows


class RetrieveStage(Stage):
    name = "retrieve"
    section = "retrieve"
    order = 70
    ledger = True
    drop_reasons = ("not_selected", "embed_failed")

    def resources(self) -> dict[str, float]:
        # the worker drives the global steps: its searchers hold the GPUs (one each), it holds none
        return {"num_cpus": 1, "num_gpus": 0}

    # -- planning ----------------------------------------------------------------------------------------------
    def _sets(self) -> list[dict]:
        rc = self.settings
        sets = [{"name": a.name, "method": a.method} for a in rc.anchor_sets]
        if rc.balanced is not None:
            sets.append({"name": rc.balanced.name, "method": "balanced"})
        return sets

    def plan(self) -> list[Unit]:
        return [Unit(f"set-{s['name']}", s) for s in self._sets()]

    # -- the pool and the anchors -------------------------------------------------------------------------------
    def _pool(self, method: str) -> PartitionedPool:
        """The pool of the images this stage receives, as partitions of ``scale.worker_memory_gb``; sample retrieval
        searches with the configured index, the other methods exactly."""
        return PartitionedPool.of_stage(self, self.layout.vectors_parts("embed", "pool"), self.input_keys()["key"],
                                        self.settings.device, self.settings if method == "sample" else None)

    def _anchor_vectors(self, name: str) -> tuple[list[str], np.ndarray]:
        return load_descriptors(self.layout.vectors_parts("embed", "anchors", name))

    # -- one anchor set ----------------------------------------------------------------------------------------
    def run_unit(self, unit: Unit) -> dict:
        name, method = unit.payload["name"], unit.payload["method"]
        acfg = next((a for a in self.settings.anchor_sets if a.name == name), None)
        summary = {"anchor_set": name, "method": method, "recall_at_k_vs_exact": None, "index": None}
        if method == "as_is":
            sel, neighbors, clusters, summary = self._as_is(acfg, summary)
        else:
            sel, neighbors, clusters, summary = self._from_pool(method, acfg, summary)
        sims = summary.pop("sims")
        summary.update(_quantiles(sims), selected=sel.num_rows)
        out = self.layout.retrieve_set_dir(name)
        if neighbors.num_rows:
            write_table(out / "neighbors.parquet", neighbors, "neighbors")
        if clusters is not None:
            write_table(out / "clusters.parquet", clusters, "cluster_stats")
        write_table(self.layout.retrieve_set_selection(name), sel, "selection")
        write_json(out / "summary.json", summary)
        return {"selected": sel.num_rows}

    def _as_is(self, acfg, summary):
        """The anchor set itself (source ``anchors/<set>``)."""
        keys = [s.key for s in iter_image_set(acfg.path, acfg.format)]
        n = len(keys)
        sel = _selection_table({"key": keys, "source": [f"anchors/{acfg.name}"] * n, "anchor_set": [acfg.name] * n,
                                "anchor_key": keys}, n)
        summary.update(anchors=n, retrieved=n, sims=[])
        return sel, NO_NEIGHBORS, None, summary

    def _from_pool(self, method: str, acfg, summary):
        """(selection, neighbours, clusters, summary) of a set retrieved from the pool, by partitions."""
        neighbors, clusters = NO_NEIGHBORS, None
        pool = self._pool(method)
        pkeys, pvecs, inputs = pool.keys, pool, self.input_keys()
        urls = dict(zip(inputs["key"].to_pylist(), inputs["url"].to_pylist()))
        try:
            if method == "sample":
                sel, neighbors, summary = self._sample(acfg, pkeys, pvecs, urls, summary)
            elif method == "cluster":
                sel, clusters, summary = self._cluster(acfg, pkeys, pvecs, urls, summary)
            else:
                sel, clusters, summary = self._balanced(pkeys, pvecs, urls, summary)
        finally:
            pool.close()
        return sel, neighbors, clusters, summary

    def _sample(self, acfg, pkeys, pvecs, urls, summary):
        rc = self.settings
        akeys, avecs = self._anchor_vectors(acfg.name)
        res = pvecs.search(avecs, acfg.k, acfg.name, rc.recall_sample)
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
        rc = self.settings
        name = f"pool-C{C}-seed{self.seed}-n{len(pvecs)}.npz"
        path = self.layout.scratch(self.name, "kmeans") / name
        if path.exists():
            z = np.load(path)
            return z["centroids"], z["labels"]
        res = pvecs.kmeans(C, rc.kmeans_iters, self.seed)
        cents, labels = res.centroids, res.labels
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, centroids=cents, labels=labels)
        return cents, labels

    def _cluster(self, acfg, pkeys, pvecs, urls, summary):
        rc = self.settings
        akeys, avecs = self._anchor_vectors(acfg.name)
        C = R.sensible_clusters(acfg.clusters, len(pvecs))
        if len(pvecs):
            cents, labels = self._pool_kmeans(pvecs, C)
            alabels, _ = R.assign(avecs, cents, rc.device)
        else:
            C, labels, alabels = 1, np.zeros(0, np.int64), np.zeros(len(akeys), np.int64)
        cs = R.cluster_select(labels, alabels, C, acfg.min_anchors_per_cluster, acfg.per_cluster, acfg.cap,
                              self.seed)
        pk = np.asarray(pkeys, dtype=object)
        keys = pk[cs.pool_idx].tolist()
        n = len(keys)
        # the most similar anchor of the set, for provenance and the report's grids
        sims, ids = knn_search(pvecs[cs.pool_idx], avecs, 1, device=rc.device) if n and len(akeys) else (None, None)
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
        rc, bc = self.settings, self.settings.balanced
        if len(pvecs):
            levels = R.hierarchical_kmeans(pvecs, bc.levels, bc.resampling_steps, bc.resample_sizes,
                                           rc.kmeans_iters, self.seed, rc.device)
            idx = R.balanced_sample(levels, bc.target_size, self.seed, bc.leaf_sampling)
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
        if self.layout.ledger_parts(self.name):  # written last (an interrupted finalize is removed and redone)
            return
        sets = self._sets()
        sels, nbrs, clus, summaries = self._read_sets(sets)
        write_table(self.layout.retrieve_neighbors,
                    pa.concat_tables(nbrs) if nbrs else read_tables([], "neighbors"), "neighbors")
        write_table(self.layout.stats("cluster_stats"),
                    pa.concat_tables(clus) if clus else read_tables([], "cluster_stats"), "cluster_stats")
        union, shared = union_of_selections(sels, [s["name"] for s in sets])
        write_table(self.layout.retrieve_selection, union, "selection")
        rows = retrieval_stats(sets, summaries, shared)
        write_table(self.layout.stats("retrieval_stats"), pa.Table.from_pylist(rows), "retrieval_stats")
        for line in R.degenerate_sets(rows):
            print(f"[retrieve] WARNING degenerate retrieval: {line}", file=sys.stderr, flush=True)
        self._write_ledger({k for k, src in zip(union["key"].to_pylist(), union["source"].to_pylist())
                            if src == "pool"})

    def _read_sets(self, sets: list[dict]) -> tuple[list[pa.Table], list[pa.Table], list[pa.Table], list[dict]]:
        """Every set unit's (selection, neighbours, clusters, summary), in set order (sets without neighbours or
        clusters add none)."""
        sels, nbrs, clus, summaries = [], [], [], []
        for s in sets:
            d = self.layout.retrieve_set_dir(s["name"])
            summaries.append(json.loads((d / "summary.json").read_text()))
            sels.append(read_table(self.layout.retrieve_set_selection(s["name"]), "selection"))
            if (d / "neighbors.parquet").exists():
                nbrs.append(read_table(d / "neighbors.parquet", "neighbors"))
            if (d / "clusters.parquet").exists():
                clus.append(read_table(d / "clusters.parquet", "cluster_stats"))
        return sels, nbrs, clus, summaries

    def _write_ledger(self, selected: set[str]) -> None:
        inputs = self.input_keys()
        failed = {}
        for p in self.layout.failed_parts("embed"):
            for r in read_table(p, "embed_failures").to_pylist():
                failed[r["key"]] = f"{r['reason']}: {r['detail']}"
        embedded = set()
        for p in self.layout.vectors_parts("embed", "pool"):
            embedded.update(read_table(p).column("key").to_pylist())
        keys, urls = inputs["key"].to_pylist(), inputs["url"].to_pylist()
        reasons, details = ledger_verdicts(keys, selected, embedded, failed)
        accounting.write_ledger_by_shard(self.root, self.name, accounting.make_ledger(self.name, keys, urls, reasons,
                                         details), self.layout.input_ledger_stage(self.name))
