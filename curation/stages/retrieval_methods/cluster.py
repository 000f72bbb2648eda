"""``cluster``: k-means of the pool, and pool images from the clusters the anchors fall in (DINOv2 sec. 3,
cluster-based retrieval).

The pool is clustered into C = ``clusters`` (clamped to pool size / 4; cached, shared by the sets that use the same
C); each anchor is assigned to its nearest centroid; from every cluster with more than ``min_anchors_per_cluster``
anchors up to ``per_cluster`` random pool images are taken, at most ``cap`` per set.  Each selected image records
its most similar anchor of the set, for provenance and the report's grids.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from curation.engine import retrieval as R
from curation.engine.knn import knn_search
from curation.stages.retrieval_methods import Method, Selection


class ClusterMethod(Method):
    name = "cluster"

    def select(self, pool, anchors, settings) -> Selection:
        acfg = anchors.config
        akeys, avecs = anchors.vectors()
        C = R.sensible_clusters(acfg.clusters, len(pool))
        if len(pool):
            cents, labels = pool.kmeans(C)
            alabels, _ = R.assign(avecs, cents, settings.device)
        else:
            C, labels, alabels = 1, np.zeros(0, np.int64), np.zeros(len(akeys), np.int64)
        cs = R.cluster_select(labels, alabels, C, acfg.min_anchors_per_cluster, acfg.per_cluster, acfg.cap,
                              pool.seed)
        n = len(cs.pool_idx)
        sims, ids = (knn_search(pool.vectors[cs.pool_idx], avecs, 1, device=settings.device) if n and len(akeys)
                     else (None, None))
        ak = np.asarray(akeys, dtype=object)
        rows = pool.selection(cs.pool_idx, anchors.name,
                              anchor_key=ak[ids[:, 0]].tolist() if ids is not None else None,
                              similarity=sims[:, 0] if sims is not None else None, cluster=labels[cs.pool_idx])
        clusters = pa.table({"anchor_set": [anchors.name] * C, "cluster": np.arange(C, dtype=np.int64),
                             "size": cs.sizes.astype(np.int64), "anchors": cs.anchors.astype(np.int64),
                             "selected": cs.selected.astype(np.int64)})
        return Selection(rows, anchors=len(akeys), retrieved=n, similarities=sims[:, 0] if sims is not None else (),
                         index="kmeans", clusters=clusters, details={"clusters": C})
