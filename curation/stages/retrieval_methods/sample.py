"""``sample``: the k nearest pool images of each anchor (DINOv2 sec. 3, sample-based retrieval).

Exact search by default (recall@k 1.0); ``retrieve.index: ivf_flat`` / ``ivf_pq`` with recall@k against exact
measured on ``retrieve.recall_sample`` anchors.  Each selected image records the anchor it is nearest to.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from curation.engine import retrieval as R
from curation.stages.retrieval_methods import Method, Selection


class SampleMethod(Method):
    name = "sample"
    indexed = True
    neighbors = True

    def select(self, pool, anchors, settings) -> Selection:
        k = anchors.config.k
        akeys, avecs = anchors.vectors()
        res = pool.vectors.search(avecs, k, anchors.name, settings.recall_sample)
        nq, k = res.ids.shape
        ok = res.ids.reshape(-1) >= 0
        ak = np.asarray(akeys, dtype=object)
        neighbors = pa.table({
            "anchor_set": pa.array([anchors.name] * int(ok.sum()), pa.string()),
            "anchor_key": pa.array(np.repeat(ak, k)[ok].tolist(), pa.string()),
            "rank": pa.array(np.tile(np.arange(k), nq)[ok], pa.int32()),
            "pool_key": pa.array(pool.keys[res.ids.reshape(-1)[ok]].tolist(), pa.string()),
            "similarity": pa.array(res.sims.reshape(-1)[ok], pa.float32()),
        })
        pid, aid, rank, sim = R.sample_select(res.sims, res.ids)
        rows = pool.selection(pid, anchors.name, anchor_key=ak[aid].tolist(), rank=rank, similarity=sim)
        return Selection(rows, anchors=len(akeys), retrieved=int(ok.sum()), similarities=res.sims.reshape(-1)[ok],
                         index=res.index, recall=res.recall, neighbors=neighbors, details={"k": k})
