"""``balanced`` (``retrieve.balanced``, no anchors): hierarchical k-means of the pool with resampling, then balanced
top-down sampling to ``target_size`` (Vo et al. 2024, arXiv 2405.15613; :mod:`curation.engine.retrieval`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from curation.engine import retrieval as R
from curation.stages.retrieval_methods import Method, Selection


class BalancedMethod(Method):
    name = "balanced"
    anchor_set = False  # configured as retrieve.balanced, not as an anchor set's method
    embeds_anchors = False

    def select(self, pool, anchors, settings) -> Selection:
        bc = anchors.config
        if len(pool):
            levels = R.hierarchical_kmeans(pool.vectors, bc.levels, bc.resampling_steps, bc.resample_sizes,
                                           settings.kmeans_iters, pool.seed, settings.device)
            idx = R.balanced_sample(levels, bc.target_size, pool.seed, bc.leaf_sampling)
            labels = levels[0].assignment
        else:
            levels, idx, labels = [], np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows = pool.selection(idx, anchors.name, cluster=labels[idx])
        C = len(levels[0].centroids) if levels else 0
        clusters = pa.table({"anchor_set": [anchors.name] * C, "cluster": np.arange(C, dtype=np.int64),
                             "size": np.bincount(labels, minlength=C).astype(np.int64),
                             "anchors": np.zeros(C, np.int64),
                             "selected": np.bincount(labels[idx], minlength=C).astype(np.int64)})
        return Selection(rows, anchors=0, retrieved=rows.num_rows, index="hierarchical_kmeans", clusters=clusters,
                         details={"levels": [len(lv.centroids) for lv in levels],
                                  "top_clusters": levels[-1].centroids.shape[0] if levels else 0})
