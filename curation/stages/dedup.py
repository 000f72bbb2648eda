"""dedup: one duplicate graph per run - hash groups, copy-detection neighbours and evaluation images - and the
verdict on every pool image (DINOv2 App. A.3, with the hash stage's groups joined in).

One global unit (``final``), after the hash stage has grouped and the sscd stage has described every image the
filter kept (hash duplicates included) and every evaluation set:

1. **Hash edges**: every image is linked to its hash group (same decoded pixels, or PCA/pHash codes within
   ``hash.hamming_threshold`` bits; ``hash/groups.parquet``).  Hash duplicates stay nodes, so a chain original ->
   hash copy -> SSCD copy stays one component.
2. **Self edges**: the k = ``dedup.k`` nearest pool neighbours of every pool image by cosine similarity (exact,
   ties to the smaller key: :mod:`curation.engine.knn` on the partition searchers of
   :func:`curation.engine.partitioned_dedup.partitioned_dedup_graph`, one partition when the pool fits
   ``scale.worker_memory_gb``, so the graph is the same at any budget); an edge where similarity >
   ``dedup.threshold`` (0.6).
3. **Evaluation edges**: the k nearest evaluation images of every pool image; an edge where similarity >
   ``dedup.eval_threshold`` (0.45).
4. Connected components over pool and evaluation nodes together (:mod:`curation.engine.components`, vectorised).

Verdicts, in order of precedence:

* a component holding an evaluation image is dropped whole: ``eval_contamination`` (``detail`` names one evaluation
  image of the component), whichever link - hash or SSCD - joined the image to it;
* otherwise the component keeps one image, its **survivor** (``dedup.survivor``, below), and drops the others:
  ``exact_duplicate`` for an image with the same pixels as another member it is judged through (``detail`` names
  the survivor and that twin), ``near_duplicate`` for an image in the survivor's hash group (``detail``: the
  survivor and the Hamming distance), ``copy_duplicate`` for the rest (``detail``: the survivor and the cosine).

**Survivor** (``dedup.survivor``, :mod:`curation.rules.survivor`).  ``original`` (default) prefers the source of the
edits: not a canvas copy (screenshot, border, padding) or crop of another member by a containment test on the
hash stage's small canvases, then the least edge fill (uniform or low-detail, any colour), the largest
resolution, the best JPEG quality, the SSCD medoid, bytes per pixel and sharpness.  ``resolution``: largest
resolution, then smallest key.

Outputs: ``dedup/components.parquet`` (schema ``components``: every pool and evaluation image with its component,
component size, kept flag, reason, nearest neighbour and similarity; evaluation rows have ``kept`` false and no
reason, and their keys are written ``eval/<set>/<key>`` wherever they appear as a neighbour),
``stats/dedup_thresholds.parquet`` (how many pool images have a nearest pool / evaluation neighbour above each
threshold of ``dedup.stats_thresholds``), ``stats/component_sizes.parquet`` (histogram), with ``dedup.score_dtype``
float16 / bfloat16 ``stats/dedup_search.json`` (the pool searches' recall against float32 scoring), then the ledger
unit ``final`` with one row per key the stage received (the keys the filter kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curation.pipeline import accounting
from curation.engine.components import first_of_equal, kept_of_component, pick_one_per_component
from curation.engine.distributed_knn import Placement
from curation.rules.hashing import hamming
from curation.engine.partitioned_dedup import partitioned_dedup_graph
from curation.engine.partitioned_pool import pool_plan
from curation.engine.partitions import array_plan, plan_keys
from curation.stages.base import Stage, Unit
from curation.rules.survivor import FILL_STEP, HashInfo, medoid_scores, read_hash_info, survivor_priority  # noqa: F401
from curation.pipeline.storage import write_json, write_table
from curation.data.vectors import load_descriptors

FINAL = "final"
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate", "copy_duplicate", "eval_contamination")


# the survivor rule (curation/rules/survivor.py), under the names this module has always exported
def hash_links(info: HashInfo) -> tuple[np.ndarray, np.ndarray]:
    """The hash groups as extra pool-pool edges of the duplicate graph: each grouped image to its group's label."""
    linked = np.flatnonzero(info.group != np.arange(len(info.group)))
    return linked, info.group[linked]


def rows_with_duplicates(labels: np.ndarray, n: int) -> np.ndarray:
    """The pool rows (of the first `n` nodes) whose component holds another node, pool or evaluation image: the
    only rows whose descriptors the survivor rule and the verdict details read."""
    return np.flatnonzero(np.bincount(labels)[labels[:n]] > 1) if n else np.zeros(0, np.int64)


class LoadedRows:
    """Some rows of an [n, d] matrix, indexed by their row numbers in the whole (reading a row that was not loaded
    is an error): what the verdicts of a partitioned dedup read instead of the whole pool's descriptors."""

    def __init__(self, n: int, rows: np.ndarray, vectors: np.ndarray):
        self.shape = (n, vectors.shape[1])
        self.size = n * vectors.shape[1]
        self._at = np.full(n, -1, np.int64)
        self._at[rows] = np.arange(len(rows))
        self._vectors = vectors

    def __getitem__(self, idx):
        at = self._at[idx]
        if np.any(at < 0):
            raise IndexError("a descriptor the dedup verdicts read was not loaded")
        return self._vectors[at]


# ------------------------------------------------------------------------------------------------------ the graph
def dedup_graph(
    pool: np.ndarray,
    evals: np.ndarray,
    k: int,
    threshold: float,
    eval_threshold: float,
    device: str = "auto",
    links: tuple[np.ndarray, np.ndarray] | None = None,
    partitions: int = 1,
) -> dict[str, np.ndarray]:
    """The dedup graph of arrays in memory, by the stage's own engine (:func:`partitioned_dedup_graph` on a plan of
    `partitions` partitions of `pool`).  Nodes 0..n-1 are pool rows, n..n+m-1 evaluation rows; `links` are extra
    pool-pool edges (the hash groups).

    Returns labels (component per node), self_sims/self_ids (pool k-NN without self), eval_sims/eval_ids
    (pool -> eval k-NN, eval ids as node numbers), eval_nn_sims/eval_nn_ids (eval -> nearest pool)."""
    import shutil
    import tempfile

    work = tempfile.mkdtemp(prefix="lvd-dedup-")
    try:
        g = partitioned_dedup_graph(array_plan(pool, partitions), np.asarray(evals, np.float32), k, threshold,
                                    eval_threshold, work, Placement(device=device), links=links)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    g.pop("self_edge_files", None)
    g.pop("eval_edge_files", None)
    return g


# --------------------------------------------------------------------------------------------------- the verdicts
@dataclass
class DuplicateVerdicts:
    """The verdict on every pool image of a duplicate graph (arrays in pool order)."""

    kept: np.ndarray  # bool: the image is kept
    reasons: list[str | None]  # the drop reason (None: kept)
    survivor: np.ndarray  # the pool index its component keeps (before evaluation contamination drops it)
    twin: np.ndarray  # the member of its pixel set (same pixels, same component) judged against the survivor
    eval_node: np.ndarray  # the smallest evaluation node of its component, -1 when there is none


def decide_duplicates(labels: np.ndarray, priority, is_eval: np.ndarray, pixels: np.ndarray | None = None,
                      hash_group: np.ndarray | None = None) -> DuplicateVerdicts:
    """Keep one image per component, drop the rest with their reason (a pure function: arrays in, verdicts out).

    ``labels``: the component of every node of the graph, pool and evaluation nodes; ``is_eval``: which nodes are
    evaluation images; ``priority``: one sort key per pool image or a sequence of them (smallest first, ties to
    the smaller index; :func:`survivor_priority`); ``pixels``: an id of each pool image's decoded pixels (equal ids:
    same pixels; default all different); ``hash_group``: each pool image's hash group (default: each alone).

    A component holding an evaluation image is dropped whole (``eval_contamination``); any other keeps its
    survivor, the pool image first under ``priority`` (evaluation images never survive), and drops the others:
    ``exact_duplicate`` when another member with the same pixels is judged in its place (one per pixel set: the
    survivor where it is in the set, else the set's first under ``priority``), ``near_duplicate`` when it shares
    the survivor's hash group, else ``copy_duplicate``."""
    labels = np.asarray(labels, np.int64)
    is_eval = np.asarray(is_eval, bool)
    pool_labels = labels[~is_eval]
    n = len(pool_labels)
    keys = [priority] if isinstance(priority, np.ndarray) else list(priority)
    eval_nodes = np.flatnonzero(is_eval)
    none = len(labels)
    first_eval = np.full(int(labels.max()) + 1 if none else 0, none, np.int64)
    np.minimum.at(first_eval, labels[eval_nodes], eval_nodes)
    eval_node = first_eval[pool_labels]
    eval_node[eval_node == none] = -1
    contaminated = eval_node >= 0

    keep = pick_one_per_component(pool_labels, keys)
    survivor = kept_of_component(pool_labels, keep)
    if pixels is None or not n:
        pixel_id = np.arange(n)
    else:
        _, pixel_id = np.unique(np.asarray(pixels).astype(str), return_inverse=True)
    pixel_set = first_of_equal(np.stack([pool_labels, pixel_id.ravel()], 1))
    twin = kept_of_component(pixel_set, pick_one_per_component(pixel_set, [np.arange(n) != survivor, *keys]))
    group = np.arange(n) if hash_group is None else np.asarray(hash_group)

    kept = keep & ~contaminated
    duplicate = ~kept & ~contaminated
    exact = duplicate & (twin != np.arange(n))
    near = duplicate & ~exact & (group == group[survivor])
    reasons = np.select([contaminated, exact, near, duplicate],
                        ["eval_contamination", "exact_duplicate", "near_duplicate", "copy_duplicate"], "")
    return DuplicateVerdicts(kept, [r or None for r in reasons.tolist()], survivor, twin, eval_node)


def duplicate_details(v: DuplicateVerdicts, keys: list[str], eval_keys: list[str], X: np.ndarray, E: np.ndarray,
                      codes: np.ndarray | None, hash_method: str, eval_threshold: float) -> list[str | None]:
    """The ledger detail of each pool image's verdict: the survivor it duplicates and how (same pixels, the hash
    Hamming distance or the cosine), or the evaluation image of its component.  Evaluation nodes are numbered after
    the pool's (``eval_keys[node - len(keys)]``)."""
    n = len(keys)
    details: list[str | None] = []
    for i, reason in enumerate(v.reasons):
        j = v.survivor[i]
        if reason is None:
            details.append(None)
        elif reason == "eval_contamination":
            e = v.eval_node[i] - n
            sim = float(X[i] @ E[e])
            via = "" if sim > eval_threshold else ", joined through its duplicates"
            details.append(f"duplicate component with evaluation image {eval_keys[e]} (cosine {sim:.3f}{via})")
        elif reason == "exact_duplicate":
            same = "" if v.twin[i] == j else f" as {keys[v.twin[i]]}"
            details.append(f"duplicate of {keys[j]} (same pixels{same})")
        elif reason == "near_duplicate":
            dist = int(hamming(codes[i:i + 1], codes[j:j + 1])[0])
            details.append(f"duplicate of {keys[j]} ({hash_method} hash Hamming distance {dist})")
        else:
            details.append(f"duplicate of {keys[j]} (cosine {float(X[i] @ X[j]):.3f})")
    return details


# ------------------------------------------------------------------------------------------------ output tables
def nearest_neighbours(g: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, node) of every node's nearest neighbour: for a pool image the best of its pool and evaluation
    neighbours, for an evaluation image its nearest pool image (-inf, -1: none)."""
    ss, si = g["self_sims"], g["self_ids"]
    es, ei = g["eval_sims"], g["eval_ids"]
    best_s = np.full(n, -np.inf, np.float32)
    best_i = np.full(n, -1, np.int64)
    if ss.size:
        best_s, best_i = ss[:, 0].copy(), si[:, 0].copy()
    if es.size:
        better = es[:, 0] > best_s
        best_s[better], best_i[better] = es[better, 0], ei[better, 0]
    return np.concatenate([best_s, g["eval_nn_sims"]]), np.concatenate([best_i, g["eval_nn_ids"]])


def components_table(g: dict[str, np.ndarray], keys: list[str], eval_names: list[str], eval_keys: list[str],
                     v: DuplicateVerdicts) -> pa.Table:
    """``dedup/components.parquet``: every pool then evaluation node with its component and verdict."""
    n, m = len(keys), len(eval_keys)
    labels = g["labels"]
    node_keys = np.array(keys + eval_keys, dtype=object)
    nn_s, nn_i = nearest_neighbours(g, n)
    sizes = np.bincount(labels, minlength=n + m)[labels] if n + m else np.zeros(0, np.int64)
    return pa.table({
        "key": pa.array(keys + [k.split("/", 2)[2] for k in eval_keys], pa.string()),
        "source": pa.array(["pool"] * n + [f"eval/{s}" for s in eval_names], pa.string()),
        "component": pa.array(labels.astype(np.int64)),
        "component_size": pa.array(sizes.astype(np.int64)),
        "kept": pa.array(np.concatenate([v.kept, np.zeros(m, bool)])),
        "reason": pa.array(v.reasons + [None] * m, pa.string()),
        "nearest_key": pa.array([node_keys[j] if j >= 0 else None for j in nn_i], pa.string()),
        "nearest_similarity": pa.array([float(s) if np.isfinite(s) else None for s in nn_s], pa.float32()),
    })


def threshold_stats(g: dict[str, np.ndarray], n: int, eval_names: list[str], thresholds: list[float]) -> pa.Table:
    """``stats/dedup_thresholds.parquet``: per threshold, how many pool images have a nearest pool neighbour
    (kind ``self``) or a nearest image of each evaluation set (``eval/<set>``) above it, and how many edges."""
    m = len(eval_names)
    rows = []

    def add(kind: str, best: np.ndarray, sims: np.ndarray) -> None:
        for t in thresholds:
            above = int((best > t).sum())
            rows.append({"kind": kind, "threshold": t, "images_above": above,
                         "fraction_above": above / n if n else 0.0, "edges_above": int((sims > t).sum())})

    ss = g["self_sims"]
    add("self", ss[:, 0] if ss.size else np.full(n, -np.inf), ss)
    es, ei = g["eval_sims"], g["eval_ids"]
    names = np.array(eval_names, dtype=object)
    for name in dict.fromkeys(eval_names):
        if es.size:
            mine = (ei >= n) & (names[np.clip(ei - n, 0, max(m - 1, 0))] == name)
            s = np.where(mine, es, -np.inf)
        else:
            s = np.full((n, 1), -np.inf)
        add(f"eval/{name}", s.max(1) if s.size else np.full(n, -np.inf), s)
    return pa.Table.from_pylist(rows)


def component_size_histogram(labels: np.ndarray, n: int) -> pa.Table:
    """``stats/component_sizes.parquet``: components and images per component size, and how many of those
    components hold an evaluation image (nodes from `n` on)."""
    comp_sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    has_eval = np.zeros(len(comp_sizes), bool)
    if len(labels) > n:
        has_eval[labels[n:]] = True
    rows = []
    for size in np.unique(comp_sizes[comp_sizes > 0]):
        sel = comp_sizes == size
        rows.append({"component_size": int(size), "components": int(sel.sum()),
                     "images": int(size * sel.sum()), "with_eval": int((sel & has_eval).sum())})
    if not rows:
        from schemas import empty

        return empty("component_sizes")
    return pa.Table.from_pylist(rows)


# -------------------------------------------------------------------------------------------------------- stage
class DedupStage(Stage):
    name = "dedup"
    section = "dedup"
    order = 50
    ledger = True
    # one duplicate graph (hash groups + SSCD neighbours + evaluation images): eval_contamination takes precedence
    # over the others whenever an image's component holds an evaluation image
    drop_reasons = ("exact_duplicate", "near_duplicate", "copy_duplicate", "eval_contamination")

    def resources(self) -> dict[str, float]:
        # the worker drives the global step: its searchers hold the GPUs (one each), it holds none
        return {"num_cpus": self.num_cpus, "num_gpus": 0}

    def plan(self) -> list[Unit]:
        return [Unit(FINAL)]

    def run_unit(self, unit: Unit) -> dict:
        s = self.settings
        inputs = self.input_keys()
        keys = inputs["key"].to_pylist()
        n = len(keys)
        info = read_hash_info(self.layout, keys)
        # by partitions (one when the pool fits the budget): the graph first, then only the vectors the verdicts read
        plan = pool_plan(self.layout.vectors_parts("sscd", "pool"), None, self.scale)
        self._check_described(plan_keys(plan), keys)
        eval_names, eval_keys, E = self._eval_descriptors(plan.dim or None)
        g = self._partitioned_graph(plan, E, info)
        X = self._vectors_of_duplicates(keys, g["labels"], E.shape[1])
        labels = g["labels"]
        is_eval = np.arange(len(labels)) >= n
        v = decide_duplicates(labels, survivor_priority(s.survivor, labels[:n], X, info), is_eval, info.sha,
                              info.group)
        details = duplicate_details(v, keys, eval_keys, X, E, info.codes, info.method, s.eval_threshold)

        write_table(self.layout.dedup_components, components_table(g, keys, eval_names, eval_keys, v), "components")
        thresholds = sorted(set(s.stats_thresholds) | {s.threshold, s.eval_threshold})
        write_table(self.layout.stats("dedup_thresholds"), threshold_stats(g, n, eval_names, thresholds),
                    "dedup_thresholds")
        write_table(self.layout.stats("component_sizes"), component_size_histogram(labels, n), "component_sizes")
        if s.score_dtype != "float32":  # what the reduced precision cost: true neighbours its scores did not propose
            write_json(self.layout.stats_dir / "dedup_search.json",
                       {"score_dtype": s.score_dtype, "recall_vs_float32": g["search_recall"],
                        "neighbours_sampled": g["search_recall_sample"], "k": s.k})
        url = dict(zip(inputs["key"].to_pylist(), inputs["url"].to_pylist()))
        ledger = accounting.make_ledger(self.name, keys, [url[k] for k in keys], v.reasons, details)
        accounting.write_ledger_by_shard(self.root, self.name, ledger, self.layout.input_ledger_stage(self.name))
        return {"kept": int(v.kept.sum()), **{r: v.reasons.count(r) for r in DUPLICATE_REASONS}}

    @staticmethod
    def _check_described(described: list[str], in_keys: list[str]) -> None:
        """The sscd stage described exactly the images this stage received."""
        if described != in_keys:
            raise RuntimeError(f"dedup: sscd described {len(described)} pool images but the previous stage kept "
                               f"{len(in_keys)} (run the sscd stage first)")

    def _eval_descriptors(self, dim: int | None) -> tuple[list[str], list[str], np.ndarray]:
        """(set name, node key ``eval/<set>/<key>``, descriptors [m, d]) of every evaluation image, in set order;
        d is the pool's dimension `dim` (the first evaluation set's when the pool is empty, else 1)."""
        names, node_keys, vecs = [], [], []
        for es in self.image_sets["eval"]:
            ek, ev = load_descriptors(self.layout.vectors_parts("sscd", "eval", es.name))
            if ev.size and dim and ev.shape[1] != dim:
                raise RuntimeError(f"dedup: eval set {es.name} descriptors have dimension {ev.shape[1]}, pool "
                                   f"{dim}")
            names += [es.name] * len(ek)
            node_keys += [f"eval/{es.name}/{k}" for k in ek]
            if len(ek):
                vecs.append(ev)
        d = dim or (vecs[0].shape[1] if vecs else 1)
        return names, node_keys, np.concatenate(vecs) if vecs else np.zeros((0, d), np.float32)

    def _partitioned_graph(self, plan, E: np.ndarray, info: HashInfo) -> dict[str, np.ndarray]:
        """The duplicate graph by partitions of ``scale.worker_memory_gb``, on searcher actors when the run is on Ray
        (the sscd files are in key order, as the sscd stage writes them)."""
        s = self.settings
        placement = Placement(use_ray=self.uses_ray(), device=s.device, searchers=self.scale.searchers,
                              score_dtype=s.score_dtype)
        return partitioned_dedup_graph(plan, E, s.k, s.threshold, s.eval_threshold,
                                       self.layout.scratch(self.name, "partitioned"), placement,
                                       self.scale.query_block, links=hash_links(info))

    def _vectors_of_duplicates(self, keys: list[str], labels: np.ndarray, dim: int) -> "LoadedRows":
        """The descriptors the survivor rule and the details read: those of pool images in components of more than
        one node (a pool image alone in its component is kept and needs none), read shard by shard."""
        rows = rows_with_duplicates(labels, len(keys))
        _, vectors = load_descriptors(self.layout.vectors_parts("sscd", "pool"), [keys[i] for i in rows])
        return LoadedRows(len(keys), rows, vectors.reshape(len(rows), dim))
