"""The stage contract: what a stage declares, and what the runner does with it.

A stage declares

* ``name`` and ``section``: its name and the config section it is configured by.  A stage reads only its own
  section (``self.settings``), the run-wide settings (``self.seed``, ``self.scale``, ``self.images``,
  ``self.uses_ray()``) and the run's inputs (``self.url_lists``, ``self.image_sets``); what it needs from other
  stages comes through the run layout (``self.layout``: every path) and their output files;
* ``reads`` / ``writes``: the artefacts it consumes and produces (names of :data:`ARTEFACTS`, documented there);
* ``resources()``: what one worker of the stage asks the cluster for (CPUs, a GPU when it can use one);
* ``setup()``: run once per worker before its first unit (models are loaded here, into the stage object, never
  into module globals);
* ``plan()``: its units of work (usually one input shard each), deterministic for a config and run root;
* ``run_unit(unit)``: one unit; outputs are written atomically (:mod:`curation.pipeline.storage`) and the runner records
  them in the unit's completion marker;
* ``finalize()``: global work after every unit is done (grouping duplicates, retrieval), idempotent.

*Unit done* has one meaning: the unit's completion marker exists and matches its outputs
(:mod:`curation.pipeline.markers`); the runner checks it, stages do not.  Stages do not import Ray (``uses_ray`` only asks
whether it is running): the same stage runs in a Ray actor, in a plain process, and in GPU benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from curation.pipeline import accounting
from curation.config import CurateConfig
from curation.pipeline.layout import RunLayout

#: every artefact a stage reads or writes, by name -> what it is (paths: :class:`curation.pipeline.layout.RunLayout`)
ARTEFACTS = {
    "url_lists": "the input URL lists (Parquet/CSV/TSV/text)",
    "download.shards": "fetched images, WebDataset tars RUN/download/<shard>.tar",
    "download.status": "img2dataset's status row per URL, RUN/download/<shard>.parquet",
    "filter.shards": "images that passed the filters (the pool), RUN/filter/<shard>.tar",
    "pool.shards": "the pool's tars as the run defines them: filter.shards when the run filters, else download's",
    "hash.parts": "per-image pixel sha256, pHash thumbnail and border fill, RUN/hash/part-<shard>.parquet",
    "hash.groups": "exact and perceptual-hash groups, RUN/hash/groups.parquet",
    "sscd.descriptors": "copy-detection descriptors of pool and eval images, RUN/sscd/{pool,eval/<set>}/",
    "dedup.components": "components of the duplicate graph and their verdicts, RUN/dedup/components.parquet",
    "embed.vectors": "retrieval embeddings of pool, anchor and eval images, RUN/embed/{pool,anchors/<set>,eval/<set>}/",
    "retrieve.selection": "the retrieved pool images and their anchors, RUN/retrieve/{selection,neighbors}.parquet",
    "shards.tars": "the curated dataset, RUN/shards/lvd-*.tar, with RUN/shards_meta/{index.parquet,manifest.json}",
    "image_sets": "the anchor and evaluation image sets named in the config (folders, tars, Parquet)",
    "ledgers": "every ledger stage's verdict per key (RUN/<stage>/_ledger/)",
    "stats": "run statistics and the report, RUN/stats/",
}


@dataclass(frozen=True)
class Unit:
    id: str
    payload: dict[str, Any] = field(default_factory=dict)


class Stage:
    name: ClassVar[str]
    #: the config section this stage is configured by (None: the stage has no settings of its own)
    section: ClassVar[str | None] = None
    #: artefacts (keys of ARTEFACTS) the stage reads and writes
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    #: CPUs one worker asks for; a stage that can use a GPU overrides resources()
    num_cpus: ClassVar[float] = 1.0

    def __init__(self, cfg: CurateConfig, root: Path | None = None):
        self.layout = RunLayout.of(cfg, root)
        self.root = self.layout.root
        self.dir = self.layout.stage_dir(self.name)
        self.settings = getattr(cfg, self.section) if self.section else None
        self.seed = cfg.seed
        self.scale = cfg.scale
        self.images = cfg.images  # image limits and encoding every stage that decodes or writes images shares
        self.url_lists = cfg.input  # the run's inputs: the URL lists (download) and the image sets
        self.in_process = cfg.ray.local
        self.image_sets = cfg.image_sets()
        #: how the runner builds this stage in a worker (stage name, the config as JSON, run root); not for stages
        self.worker_args = (self.name, cfg.model_dump(mode="json"), str(self.root))

    # ------------------------------------------------------------------------------------------ the contract
    def resources(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": 0}

    def setup(self) -> None:
        """Once per worker, before its first unit: load models, open what every unit shares."""

    def plan(self) -> list[Unit]:
        """The units of work, deterministic for a given config and run root."""
        return []

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        """Do one unit; return a small JSON-able summary (counts) for the progress line."""
        raise NotImplementedError

    def finalize(self) -> None:
        """Global work after every unit is done (idempotent)."""

    # ------------------------------------------------------------------------------------------ shared helpers
    def uses_ray(self) -> bool:
        """Whether work inside this stage (partitioned searches) may start Ray actors: the run is on Ray."""
        if self.in_process:
            return False
        try:
            import ray
        except ImportError:  # pragma: no cover
            return False
        return ray.is_initialized()

    def input_keys(self) -> pa.Table:
        """(key, url) of the pool images this stage receives, sorted by key: the kept keys of the nearest earlier
        ledger stage of this run (one rule, from the config's stage list)."""
        prev = self.layout.input_ledger_stage(self.name)
        if prev is None:
            raise RuntimeError(f"stage {self.name!r} has no earlier ledger stage to take its input from")
        return accounting.kept_keys(self.root, prev)

