"""retrieve: choose the pool images to keep, by similarity to curated anchor sets (DINOv2 paper, sec. 3).

Units, one per anchor set (``set-<name>``) plus ``set-<balanced.name>`` when ``retrieve.balanced`` is given; each
runs the set's method and writes ``retrieve/sets/<name>/{neighbors,selection,clusters}.parquet`` and
``summary.json`` (counts, quantiles).  The methods - ``sample`` (k nearest pool images per anchor), ``cluster``
(pool k-means, clusters the anchors fall in), ``balanced`` (hierarchical k-means and balanced sampling, no anchors)
and ``as_is`` (the anchor set itself) - are plug-ins, one module each, behind one dispatch table
(:mod:`curation.stages.retrieval_methods`); ``recall_at_k_vs_exact`` is null for the methods that do not search k
nearest neighbours with an index.

``finalize`` merges them: ``retrieve/neighbors.parquet``; ``retrieve/selection.parquet`` (one row per selected image,
keeping its best match: highest similarity, ties to the set listed first); ``stats/retrieval_stats.parquet``;
``stats/cluster_stats.parquet``; and the ledger unit ``final`` for the pool keys received (kept = selected, else
``not_selected``, or ``embed_failed`` for images the embedder could not decode).

Every method reads the pool through one engine (:mod:`curation.engine.partitioned_pool`): partitions of
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

from curation.pipeline import accounting
from curation.engine import retrieval as R
from curation.engine.partitioned_pool import PartitionedPool
from curation.stages.base import Stage, Unit
from curation.stages.retrieval_methods import Anchors, Method, Pool, Selection, method
from curation.stages.retrieval_methods.balanced import BalancedMethod
from curation.pipeline.storage import atomic_path, read_table, read_tables, write_json, write_table


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


def set_summary(name: str, method_name: str, sel: Selection) -> dict:
    """A set's ``summary.json``: its method, counts, the search it ran and the quantiles of its similarities."""
    return {"anchor_set": name, "method": method_name, "recall_at_k_vs_exact": sel.recall, "index": sel.index,
            "anchors": sel.anchors, "retrieved": sel.retrieved, **sel.details, **_quantiles(sel.similarities),
            "selected": sel.rows.num_rows}


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
            sets.append({"name": rc.balanced.name, "method": BalancedMethod.name})
        return sets

    def plan(self) -> list[Unit]:
        return [Unit(f"set-{s['name']}", s) for s in self._sets()]

    # -- one set ----------------------------------------------------------------------------------------------
    def run_unit(self, unit: Unit) -> dict:
        name, m = unit.payload["name"], method(unit.payload["method"])
        sel = self._select(m, self._anchors(m, name))
        out = self.layout.retrieve_set_dir(name)
        if sel.neighbors is not None and sel.neighbors.num_rows:
            write_table(out / "neighbors.parquet", sel.neighbors, "neighbors")
        if sel.clusters is not None:
            write_table(out / "clusters.parquet", sel.clusters, "cluster_stats")
        write_table(self.layout.retrieve_set_selection(name), sel.rows, "selection")
        write_json(out / "summary.json", set_summary(name, m.name, sel))
        return {"selected": sel.rows.num_rows}

    def _anchors(self, m: Method, name: str) -> Anchors:
        rc = self.settings
        config = next((a for a in rc.anchor_sets if a.name == name), None) if m.anchor_set else rc.balanced
        files = self.layout.vectors_parts("embed", "anchors", name) if m.embeds_anchors else []
        return Anchors(name, config, tuple(files))

    def _select(self, m: Method, anchors: Anchors) -> Selection:
        """Run method `m` on the pool this stage received (read as partitions of ``scale.worker_memory_gb``;
        searched with the configured index by an indexed method, exactly by the others)."""
        if not m.reads_pool:
            return m.select(None, anchors, self.settings)
        inputs = self.input_keys()
        vectors = PartitionedPool.of_stage(self, self.layout.vectors_parts("embed", "pool"), inputs["key"],
                                           self.settings.device, self.settings if m.indexed else None)
        pool = Pool(np.asarray(vectors.keys, dtype=object), vectors,
                    dict(zip(inputs["key"].to_pylist(), inputs["url"].to_pylist())), self.seed,
                    lambda C: self._pool_kmeans(vectors, C))
        try:
            return m.select(pool, anchors, self.settings)
        finally:
            vectors.close()

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
