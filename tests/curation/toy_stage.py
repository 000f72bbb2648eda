"""A stage that is not part of lvd, for the tests of the stage registry: an "aesthetic" filter between filter and
hash that drops dark images.  It names no other stage: its units, keys and images come from the base class."""

from __future__ import annotations

import numpy as np

from curation.pipeline import accounting
from curation.data.images import decode_image
from curation.data.samples import iter_shard_samples
from curation.stages.base import Stage, Unit

#: images whose mean grey level is below this are dropped
DARK_BELOW = 100.0


class BrightnessStage(Stage):
    name = "brightness"
    order = 25  # after filter (20), before hash (30)
    ledger = True
    drop_reasons = ("too_dark",)
    per_shard = True

    def plan(self) -> list[Unit]:
        return [Unit(shard) for shard in self.input_shards()]

    def run_unit(self, unit: Unit) -> dict:
        rows = self.input_rows(unit.id)
        keys, urls = rows["key"].to_pylist(), rows["url"].to_pylist()
        grey = {}
        for sample in iter_shard_samples(self.input_tar(unit.id), set(keys)):
            im, _ = decode_image(sample.data, drop_animated=False)
            grey[sample.key] = float(np.asarray(im.convert("L"), np.float64).mean())
        reasons = [None if grey[k] >= DARK_BELOW else "too_dark" for k in keys]
        details = [None if r is None else f"mean grey {grey[k]:.1f} < {DARK_BELOW}" for k, r in zip(keys, reasons)]
        accounting.write_ledger(self.root, self.name, unit.id,
                                accounting.make_ledger(self.name, keys, urls, reasons, details))
        return {"kept": reasons.count(None), "dropped": len(keys) - reasons.count(None)}
