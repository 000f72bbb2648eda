"""``as_is``: the anchor set itself, copied into the dataset (source ``anchors/<set>``); nothing is searched, so
the set is not embedded and the pool is not read."""

from __future__ import annotations

from curation.stages.retrieval_methods import Method, Selection, selection_table


class AsIsMethod(Method):
    name = "as_is"
    embeds_anchors = False
    reads_pool = False

    def select(self, pool, anchors, settings) -> Selection:
        keys = anchors.image_keys()
        n = len(keys)
        rows = selection_table({"key": keys, "source": [f"anchors/{anchors.name}"] * n,
                                "anchor_set": [anchors.name] * n, "anchor_key": keys}, n)
        return Selection(rows, anchors=n, retrieved=n)
