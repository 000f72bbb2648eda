"""dedup: one duplicate graph per run - hash groups, copy-detection neighbours and evaluation images - and the
verdict on every pool image (DINOv2 App. A.3, with the hash stage's groups joined in).

One global unit (``final``), after the hash stage has grouped and the sscd stage has described every image the
filter kept (hash duplicates included) and every evaluation set:

1. **Hash edges**: every image is linked to its hash group (same decoded pixels, or PCA/pHash codes within
   ``hash.hamming_threshold`` bits; ``hash/groups.parquet``).  Hash duplicates stay nodes, so a chain original ->
   hash copy -> SSCD copy stays one component.
2. **Self edges**: the k = ``dedup.k`` nearest pool neighbours of every pool image by cosine similarity
   (:func:`curation.knn.knn_search`: exact FAISS flat on CPU, chunked torch matmul + top-k on CUDA); an edge where
   similarity > ``dedup.threshold`` (0.6).
3. **Evaluation edges**: the k nearest evaluation images of every pool image; an edge where similarity >
   ``dedup.eval_threshold`` (0.45).
4. Connected components over pool and evaluation nodes together (:mod:`curation.components`, vectorised).

Verdicts, in order of precedence:

* a component holding an evaluation image is dropped whole: ``eval_contamination`` (``detail`` names one evaluation
  image of the component), whichever link - hash or SSCD - joined the image to it;
* otherwise the component keeps one image, its **survivor** (``dedup.survivor``, below), and drops the others:
  ``exact_duplicate`` for an image with the same pixels as another member it is judged through (``detail`` names
  the survivor and that twin), ``near_duplicate`` for an image in the survivor's hash group (``detail``: the
  survivor and the Hamming distance), ``copy_duplicate`` for the rest (``detail``: the survivor and the cosine).

**Survivor** (``dedup.survivor``).  ``original`` (default) prefers the source of the edits, by in turn:
(1) the least ``border_fill`` (hash stage), in steps of :data:`FILL_STEP`: a border, letterbox padding or the
corners of a rotated copy on a larger canvas add uniform fill at the edges (measured on real photographs: copies
0.14-0.34, sources 0-0.02), so such a copy loses to its source although its canvas is larger; (2) the largest
resolution (size before download's resize), which puts a source before its downscaled and cropped copies; (3) the
SSCD medoid, the largest summed cosine similarity to the component's other members (rounded to 1e-4), which among
same-size edits (JPEG, colour, text, flip) picks the one the others were made from - edits of one source are each
close to it and less close to each other; (4) the smallest key.  ``resolution`` is the plain rule: largest
resolution, then smallest key (it keeps a bordered, padded or rotated copy over its source).  No rule can tell an
upscaled copy from its source by pixels alone: both rules keep the larger.

Measured (tests/curation/test_duplicate_graph.py corpora: tiles of three photographs with real edits through the
real hash stage, SSCD similarities modelled as copy.source 0.85, copy.copy 0.72): in 12 source + one copy pairs
(border, padding, rotation, half size, JPEG q40, text) the source survives in 8 under ``original``, 2 under
``resolution`` and 2 under medoid-first (a pair's medoid is a tie, so resolution decides); the 4 misses are the
same-size JPEG and text pairs, where the key decides.  In 4 groups of a source and 3-5 edits the source survives in
4 under ``original`` and medoid-first, 0 under ``resolution``.

Outputs: ``dedup/components.parquet`` (schema ``components``: every pool and evaluation image with its component,
component size, kept flag, reason, nearest neighbour and similarity; evaluation rows have ``kept`` false and no
reason, and their keys are written ``eval/<set>/<key>`` wherever they appear as a neighbour),
``stats/dedup_thresholds.parquet`` (how many pool images have a nearest pool / evaluation neighbour above each
threshold of ``dedup.stats_thresholds``), ``stats/component_sizes.parquet`` (histogram), then the ledger unit
``final`` with one row per key the filter kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import accounting
from curation.components import connected_components, first_of_equal, pick_one_per_component
from curation.distributed_knn import Placement
from curation.knn import knn_search, resolve_device
from curation.partitioned_dedup import partitioned_dedup_graph
from curation.partitioned_pool import in_ray, pool_plan
from curation.partitions import plan_keys
from curation.stages.base import Stage, Unit
from curation.hashing import hamming
from curation.storage import read_table, write_table
from curation.vectors import input_keys, load_descriptors
from curation.workers import cluster_has_gpu

FINAL = "final"
FILL_STEP = 0.1  # border_fill differences below one step (JPEG noise, natural flat edges) do not decide


@dataclass
class HashInfo:
    """Per pool image (in key order), what the hash stage measured; neutral values when it did not run."""

    sha: np.ndarray  # pixel hash per image (the key itself when unknown: no exact twins)
    group: np.ndarray  # hash group label (own index when unknown)
    codes: np.ndarray | None  # packed hash codes, for the near_duplicate detail
    resolution: np.ndarray  # pixels before download's resize when known, else as stored; 0 when unknown
    fill: np.ndarray  # border_fill, 0 when unknown


def read_hash_info(root, keys: list[str]) -> HashInfo:
    """The hash stage's groups and per-image measurements for `keys` (sorted), or neutral values without it."""
    n = len(keys)
    info = HashInfo(np.array(keys, dtype=object), np.arange(n), None, np.zeros(n, np.int64), np.zeros(n))
    groups_path = root / "hash" / "groups.parquet"
    if groups_path.exists():
        g = read_table(groups_path, "hash_groups")
        if g["key"].to_pylist() != keys:
            raise RuntimeError(f"dedup: hash/groups.parquet holds {g.num_rows} images but the filter kept {n} "
                               "(rerun the hash stage)")
        info.sha = np.array(g["pixel_sha256"].to_pylist(), dtype=object)
        info.group = np.array(g["group"], np.int64)
        info.codes = np.stack([np.frombuffer(b, np.uint8) for b in g["hash"].to_pylist()]) if n else None
    parts = sorted((root / "hash").glob("part-*.parquet"))
    if parts:
        cols = ["key", "width", "height", "original_width", "original_height", "border_fill"]
        t = pa.concat_tables([pq.read_table(p, columns=cols) for p in parts])
        ow = np.array(t["original_width"].fill_null(0), np.int64)
        oh = np.array(t["original_height"].fill_null(0), np.int64)
        res = np.where(ow * oh > 0, ow * oh, np.array(t["width"], np.int64) * np.array(t["height"], np.int64))
        row = {k: i for i, k in enumerate(t["key"].to_pylist())}
        idx = np.array([row.get(k, -1) for k in keys], np.int64)
        found = idx >= 0
        info.resolution[found] = res[idx[found]]
        info.fill[found] = np.array(t["border_fill"], np.float64)[idx[found]]
    return info


def medoid_scores(labels: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Each node's summed cosine similarity to the other nodes of its component (0 when alone), rounded to 1e-4.

    x_i . (S_c - x_i) with S_c the component's descriptor sum: O(n d), no pairwise matrix."""
    n = len(labels)
    score = np.zeros(n)
    multi = np.flatnonzero(np.bincount(labels)[labels] > 1) if n else np.zeros(0, np.int64)
    if not multi.size:
        return score
    order = multi[np.argsort(labels[multi], kind="stable")]
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    xs = X[order].astype(np.float64)
    sums = np.add.reduceat(xs, starts, axis=0)
    comp = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(order)]))
    score[order] = np.einsum("ij,ij->i", xs, sums[comp] - xs)
    return np.round(score, 4)


def survivor_priority(rule: str, labels: np.ndarray, X: np.ndarray, info: HashInfo) -> list[np.ndarray]:
    """Sort keys (smallest first) for :func:`curation.components.pick_one_per_component` under `rule`."""
    if rule == "resolution":
        return [-info.resolution]
    if rule == "original":
        return [np.floor(info.fill / FILL_STEP), -info.resolution, -medoid_scores(labels, X)]
    raise ValueError(f"unknown dedup.survivor {rule!r}")


def dedup_graph(
    pool: np.ndarray,
    evals: np.ndarray,
    k: int,
    threshold: float,
    eval_threshold: float,
    device: str = "auto",
    links: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The dedup graph and its components.  Nodes 0..n-1 are pool rows, n..n+m-1 evaluation rows; `links` are
    extra pool-pool edges (the hash groups).

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
    if links is not None:
        src.append(np.asarray(links[0], np.int64))
        dst.append(np.asarray(links[1], np.int64))
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

        gpu = self.cfg.dedup.device != "cpu" and cluster_has_gpu()
        return {"num_cpus": self.num_cpus, "num_gpus": 1 if gpu else 0}

    def plan(self) -> list[Unit]:
        return [Unit(FINAL)]

    def is_done(self, unit: Unit) -> bool:
        return accounting.ledger_path(self.root, self.name, unit.id).exists()

    def run_unit(self, unit: Unit) -> dict:
        dc = self.cfg.dedup
        inputs = input_keys(self.root, self.name)
        in_keys = inputs["key"].to_pylist()
        keys, X = load_descriptors((self.root / "sscd" / "pool").glob("part-*.parquet"))
        if keys != in_keys:
            raise RuntimeError(f"dedup: sscd described {len(keys)} pool images but the previous stage kept "
                               f"{len(in_keys)} (run the sscd stage first)")
        eval_names, eval_keys, eval_vecs = [], [], []
        for es in dc.eval_sets:
            ek, ev = load_descriptors((self.root / "sscd" / "eval" / es.name).glob("part-*.parquet"))
            if ev.size and X.size and ev.shape[1] != X.shape[1]:
                raise RuntimeError(f"dedup: eval set {es.name} descriptors have dimension {ev.shape[1]}, pool "
                                   f"{X.shape[1]}")
            eval_names += [es.name] * len(ek)
            eval_keys += [f"eval/{es.name}/{k}" for k in ek]
            if len(ek):
                eval_vecs.append(ev)
        n, m = len(keys), len(eval_keys)
        d = X.shape[1] if X.size else (eval_vecs[0].shape[1] if eval_vecs else 1)
        X = X.reshape(n, d) if n else np.zeros((0, d), np.float32)
        E = np.concatenate(eval_vecs) if eval_vecs else np.zeros((0, d), np.float32)
        info = read_hash_info(self.root, keys)
        linked = np.flatnonzero(info.group != np.arange(n))
        device = resolve_device(dc.device)
        links = (linked, info.group[linked])
        plan = pool_plan(sorted((self.root / "sscd" / "pool").glob("part-*.parquet")), None, self.cfg.scale)
        if plan is not None and plan_keys(plan) == keys:  # issue 10: the k-NN search by partitions on searcher
            # actors (files in key order, as the sscd stage writes them; X is still read whole for the details)
            g = partitioned_dedup_graph(plan, E, dc.k, dc.threshold, dc.eval_threshold, self.dir / "_partitioned",
                                        Placement(use_ray=in_ray() and not self.cfg.ray.local, device=dc.device,
                                                  searchers=self.cfg.scale.searchers), self.cfg.scale.query_block,
                                        links=links)
        else:
            g = dedup_graph(X, E, dc.k, dc.threshold, dc.eval_threshold, device=device, links=links)
        labels = g["labels"]
        node_keys = np.array(keys + eval_keys, dtype=object)

        # components with an evaluation image: the (smallest) eval node of each such component
        comp_eval = np.full(n + m, -1, np.int64)
        if m:
            ev_nodes = np.arange(n, n + m)
            order = np.argsort(-ev_nodes)  # assign larger first so the smallest eval node wins
            comp_eval[labels[ev_nodes[order]]] = ev_nodes[order]
        pool_labels = labels[:n]
        pool_eval = comp_eval[pool_labels]
        contaminated = pool_eval >= 0

        # one survivor per component (evaluation nodes never win: only pool nodes take part)
        priority = survivor_priority(dc.survivor, pool_labels, X, info)
        keep = pick_one_per_component(pool_labels, priority)
        kept_of = np.full(n + m, -1, np.int64)
        kept_of[pool_labels[keep]] = np.flatnonzero(keep)
        survivor = kept_of[pool_labels]
        keep &= ~contaminated
        # same pixels inside a component: one image per pixel set is judged against the survivor (the survivor
        # itself where it is in the set), the others are its exact duplicates
        _, sha_id = np.unique(info.sha.astype(str), return_inverse=True) if n else (None, np.zeros(0, np.int64))
        pixel_set = first_of_equal(np.stack([pool_labels.astype(np.int64), sha_id.ravel()], 1))
        twin = pick_one_per_component(pixel_set, [~(np.arange(n) == survivor), *priority])
        twin_of = np.full(n, -1, np.int64)
        twin_of[pixel_set[twin]] = np.flatnonzero(twin)
        twin_of = twin_of[pixel_set]

        method = self.cfg.hash.method
        reasons, details = [], []
        for i in range(n):
            j = survivor[i]
            if contaminated[i]:
                reasons.append("eval_contamination")
                e = pool_eval[i]
                sim = float(X[i] @ E[e - n])
                via = "" if sim > dc.eval_threshold else ", joined through its duplicates"
                details.append(f"duplicate component with evaluation image {node_keys[e]} (cosine {sim:.3f}{via})")
            elif keep[i]:
                reasons.append(None)
                details.append(None)
            elif twin_of[i] != i:
                reasons.append("exact_duplicate")
                same = "" if twin_of[i] == j else f" as {keys[twin_of[i]]}"
                details.append(f"duplicate of {keys[j]} (same pixels{same})")
            elif info.group[i] == info.group[j]:
                reasons.append("near_duplicate")
                dist = int(hamming(info.codes[i:i + 1], info.codes[j:j + 1])[0])
                details.append(f"duplicate of {keys[j]} ({method} hash Hamming distance {dist})")
            else:
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
        return {"kept": int(keep.sum()), **{r: reasons.count(r) for r in
                                             ("exact_duplicate", "near_duplicate", "copy_duplicate",
                                              "eval_contamination")}}

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
