"""sscd: copy-detection descriptors for the pool and every evaluation set.

Units: one per pool shard (``pool-NNNNN``: the run's pool tar, :meth:`curation.pipeline.layout.RunLayout.pool_tars`,
restricted to the keys the input ledger stage kept, :func:`curation.data.samples.shard_input_keys`) and one per
evaluation set (``eval-<name>``, read with :func:`curation.data.samples.iter_image_set`).  Outputs (schema
``descriptors``): ``sscd/pool/part-NNNNN.parquet`` and ``sscd/eval/<set>/part-00000.parquet``.

Descriptor (``sscd.descriptor``), built once per worker in :meth:`SSCDStage.setup` by
:func:`curation.models.embedder.build_copy_embedder`:

* ``sscd`` - the SSCD ResNet-50 (:mod:`curation.models.sscd`; ``sscd.weights``, random weights when null, for
  tests only), batches of ``sscd.batch_size``, on CUDA under bf16 autocast with channels-last memory
  (``sscd.precision``, ``sscd.channels_last``).  On CPU it runs fp32 with the task's cores split by
  :func:`curation.models.describe.loader_plan` (on 2 cores: decode inline, both cores for the model) and batches of at
  most :data:`curation.models.embedder.CPU_BATCH`.  ``short288`` preprocessing keeps the aspect ratio, so it runs
  batch 1.
* ``pixels`` - :func:`curation.models.sscd.pixel_descriptor`, computed in the decode workers (no model).

Images go through the one decode-and-describe pipeline (:mod:`curation.models.describe`): decoded once with the run's
pixel limit (``images.max_image_pixels``), in ``sscd.num_workers`` DataLoader worker processes, each taking every
num_workers-th sample of the stream (so shards are read streaming).

A pool unit describes every image the previous ledger stage (filter) kept: hash duplicates too, since the dedup
stage joins hash groups and SSCD neighbours in one graph.  A unit with no such image writes an empty part.  A pool
image that fails to decode is an error (the filter decoded it); an evaluation image that cannot be decoded is
skipped with a warning (it is not a pool row, so no ledger entry).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from curation.data.samples import iter_image_set, iter_shard_samples, shard_input_keys
from curation.stages.base import Stage, Unit
from curation.pipeline.storage import write_table
from curation.data.vectors import descriptor_table
from curation.cluster import gpu

if TYPE_CHECKING:
    from curation.models.describe import Described

log = logging.getLogger("lvd")


class SSCDStage(Stage):
    name = "sscd"
    section = "sscd"
    order = 40
    per_shard = True

    def resources(self) -> dict[str, float]:
        gpus = 0
        if self.settings.descriptor == "sscd" and self.settings.device != "cpu":
            gpus = int(gpu.cluster_gpus() > 0)
        return {"num_cpus": max(self.num_cpus, float(min(self.settings.num_workers, 4)) or 1.0), "num_gpus": gpus}

    def setup(self) -> None:
        from curation.models.embedder import build_copy_embedder  # torch: loaded by the workers, not the registry

        self.embedder = build_copy_embedder(self.settings)

    def plan(self) -> list[Unit]:
        units = [Unit(f"pool-{t.stem}", {"kind": "pool", "shard": t.stem}) for t in self.layout.pool_tars(self.name)]
        for es in self.image_sets["eval"]:
            units.append(Unit(f"eval-{es.name}", {"kind": "eval", "set": es.name, "path": str(es.path)}))
        return units

    def run_unit(self, unit: Unit) -> dict:
        if unit.payload["kind"] == "pool":
            return self._describe_shard(unit, unit.payload["shard"])
        return self._describe_eval_set(unit, unit.payload["set"], Path(unit.payload["path"]))

    def _describe_shard(self, unit: Unit, shard: str) -> dict:
        keys = shard_input_keys(self.layout, self.name, shard)
        tar = self.layout.pool_tar(shard, self.name)
        out = self._describe(partial(iter_shard_samples, tar, keys))
        if out.failures:  # pool images were decoded by the filter: a failure here is a real error
            raise RuntimeError(f"sscd {unit.id}: {len(out.failures)} pool images failed to decode, "
                               f"e.g. {out.failures[0]}")
        if set(out.keys) != keys:
            raise RuntimeError(f"sscd {unit.id}: {len(keys - set(out.keys))} kept keys missing from {tar}")
        write_table(self.layout.vectors_part(self.name, "pool", shard),
                    descriptor_table(out.keys, out.vectors, "pool"), "descriptors")
        return {"described": len(out.keys), "skipped": 0}

    def _describe_eval_set(self, unit: Unit, set_name: str, path: Path) -> dict:
        out = self._describe(partial(iter_image_set, path))
        for key, reason, detail in out.failures:
            log.warning("sscd %s: skipping undecodable evaluation image %s: %s: %s", unit.id, key, reason, detail)
        write_table(self.layout.vectors_part(self.name, "eval", "00000", set_name),
                    descriptor_table(out.keys, out.vectors, f"eval/{set_name}"), "descriptors")
        return {"described": len(out.keys), "skipped": len(out.failures)}

    def _describe(self, samples) -> Described:
        from curation.models.describe import describe_in_task

        return describe_in_task(self.embedder, samples, self.settings.num_workers, self.settings.batch_size,
                                max_pixels=self.images.max_image_pixels)
