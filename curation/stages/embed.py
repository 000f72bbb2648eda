"""embed: one embedding per image of the pool, of every anchor set and of every evaluation set.

Units (outputs written atomically):

* ``pool-NNNNN``: the run's pool tar ``NNNNN.tar`` (:meth:`curation.pipeline.layout.RunLayout.pool_tars`), restricted to
  the keys kept by the nearest earlier ledger stage (:func:`curation.data.samples.shard_input_keys`)
  -> ``embed/pool/part-NNNNN.parquet``;
* ``anchors-<set>``: an anchor set (``as_is`` sets are copied, never searched, so they are not embedded)
  -> ``embed/anchors/<set>/part-00000.parquet``;
* ``eval-<set>``: an evaluation set -> ``embed/eval/<set>/part-00000.parquet``.

Tables have schema ``descriptors`` (key, source, L2-normalised float32 vector), sorted by key.  An image that
cannot be decoded is listed in ``.../failed/part-NNNNN.parquet`` (written first); retrieve drops such pool keys
with reason ``embed_failed``.  A pool shard whose images were all dropped earlier writes an empty part.

The embedder (:func:`curation.models.embedder.build_embedder`, ``embed.model``) is built once per worker in
:meth:`EmbedStage.setup`.  Images go through the one decode-and-describe pipeline (:mod:`curation.models.describe`),
decoded once with the run's pixel limit (``images.max_image_pixels``): decoding and resize/crop run in
``embed.num_workers`` DataLoader worker processes, each taking every n-th sample of the unit's stream; batches
travel as uint8 (4x less than float32) through pinned memory and are normalised on the GPU; the model runs under
bf16 autocast on CUDA with ``embed.batch_size`` images per step, so the GPU is fed ``embed.prefetch_factor``
batches ahead.  On CPU a model is the bottleneck, so the task's cores are split by
:func:`curation.models.describe.loader_plan` (on 2 cores: decode inline, both cores for the model).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pyarrow as pa

from curation.data.samples import iter_image_set, iter_shard_samples, shard_input_keys
from curation.stages.base import Stage, Unit
from curation.stages.retrieval_methods import method
from curation.pipeline.storage import write_table
from curation.data.vectors import descriptor_table
from curation.cluster import gpu


def failures_table(failures: list[tuple[str, str, str]], source: str) -> pa.Table:
    """(key, reason, detail) rows -> a table of schema ``embed_failures``."""
    return pa.table({
        "key": pa.array([f[0] for f in failures], pa.string()),
        "source": pa.array([source] * len(failures), pa.string()),
        "reason": pa.array([f[1] for f in failures], pa.string()),
        "detail": pa.array([f[2] for f in failures], pa.string()),
    })


class EmbedStage(Stage):
    name = "embed"
    section = "embed"
    order = 60
    per_shard = True

    def resources(self) -> dict[str, float]:
        return {"num_cpus": 1, "num_gpus": gpu.worker_gpus(self.settings.device) if self.settings.model != "pixels" else 0}

    def setup(self) -> None:
        from curation.models.embedder import build_embedder  # torch: loaded by the workers, not the registry

        self.embedder = build_embedder(self.settings)

    def plan(self) -> list[Unit]:
        units = [Unit(f"pool-{t.stem}", {"kind": "pool", "part": t.stem}) for t in self.layout.pool_tars(self.name)]
        for a in self.image_sets["anchors"]:
            if method(a.method).embeds_anchors:
                units.append(Unit(f"anchors-{a.name}", {"kind": "anchors", "set": a.name, "path": str(a.path),
                                                        "format": a.format, "part": "00000"}))
        for e in self.image_sets["eval"]:
            units.append(Unit(f"eval-{e.name}", {"kind": "eval", "set": e.name, "path": str(e.path),
                                                 "format": "auto", "part": "00000"}))
        return units

    def run_unit(self, unit: Unit) -> dict:
        from curation.models.describe import describe_in_task

        p = unit.payload
        kind, part, set_name = p["kind"], p["part"], p.get("set")
        if kind == "pool":
            samples = partial(iter_shard_samples, self.layout.pool_tar(part, self.name),
                              shard_input_keys(self.layout, self.name, part))
            source = "pool"
        else:
            samples = partial(iter_image_set, Path(p["path"]), p["format"])
            source = f"{kind}/{set_name}"
        t0 = time.time()
        s = self.settings
        out = describe_in_task(self.embedder, samples, s.num_workers, s.batch_size, prefetch_factor=s.prefetch_factor,
                               max_pixels=self.images.max_image_pixels)
        if out.failures:
            write_table(self.layout.failed_part(self.name, kind, part, set_name), failures_table(out.failures, source),
                        "embed_failures")
        write_table(self.layout.vectors_part(self.name, kind, part, set_name),
                    descriptor_table(out.keys, out.vectors, source), "descriptors")
        return {"embedded": len(out.keys), "failed": len(out.failures), "embed_seconds": round(time.time() - t0, 3)}
