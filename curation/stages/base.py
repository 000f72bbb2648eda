"""The stage contract: what a stage declares, and what the runner does with it.

A stage declares, once, on its class (the registry, :mod:`curation.stages`, derives the pipeline order, the ledger
stages, the pool-tar stages and the drop-reason vocabulary from these):

* ``name``, ``order`` (its place in the chain: stages run in increasing order) and ``section`` (the config section
  it is configured by).  A stage reads only its own section (``self.settings``), the run-wide settings
  (``self.seed``, ``self.scale``, ``self.images``, ``self.uses_ray()``) and the run's inputs (``self.url_lists``,
  ``self.image_sets``);
* ``ledger`` and ``drop_reasons``: it writes a ledger (a verdict per key it received), dropping keys only for these
  reasons; ``pool_tars``: it writes tar shards of the pool images it keeps, which later stages read instead of the
  earlier ones; ``per_shard``: its units are the pool shards;
* its input is never another stage's name: it asks this base for it (:meth:`Stage.input_keys`,
  :meth:`Stage.input_shards`, :meth:`Stage.input_rows`, :meth:`Stage.input_tar`), which the run layout resolves
  from the registry and the run's stage list;
* ``resources()``: what one worker of the stage asks the cluster for (CPUs, a GPU when it can use one);
* ``setup()``: run once per worker before its first unit (models are loaded here, into the stage object, never
  into module globals);
* ``plan()``: its units of work (usually one input shard each), deterministic for a config and run root;
* ``run_unit(unit)``: one unit; outputs are written atomically (:mod:`curation.pipeline.storage`) and the runner records
  them in the unit's completion marker;
* ``finalize()``: global work after every unit is done (merging per-unit outputs, hash grouping), idempotent.

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
from curation.data.samples import shard_input_rows
from curation.stages import class_path


@dataclass(frozen=True)
class Unit:
    id: str
    payload: dict[str, Any] = field(default_factory=dict)


class Stage:
    name: ClassVar[str]
    #: its place in the chain (stages run in increasing order; the built-in ones are 10, 20, ... 90)
    order: ClassVar[int]
    #: the config section this stage is configured by (None: the stage has no settings of its own)
    section: ClassVar[str | None] = None
    #: whether it writes a ledger: one verdict per key it received, kept or dropped for one of `drop_reasons`
    ledger: ClassVar[bool] = False
    drop_reasons: ClassVar[tuple[str, ...]] = ()
    #: whether it writes tar shards of the pool images it keeps (later stages read those instead of earlier ones)
    pool_tars: ClassVar[bool] = False
    #: whether its units are the pool shards (unit id ``<shard>`` or ``pool-<shard>``)
    per_shard: ClassVar[bool] = False
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
        #: how the runner builds this stage in a worker (its class path, the config as JSON, run root); not for
        #: stages
        self.worker_args = (class_path(type(self)), cfg.model_dump(mode="json"), str(self.root))

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

    def input_shards(self) -> list[str]:
        """The pool shards this stage receives (ids ``NNNNN``): those the pool-tar stage it reads judged and wrote
        a tar for."""
        parts = self.layout.shard_ledger_parts(self.layout.pool_tar_stage(self.name))
        return [p.stem for p in parts if self.input_tar(p.stem).exists()]

    def input_tar(self, shard: str) -> Path:
        """The tar holding the pool images of `shard` this stage reads."""
        return self.layout.pool_tar(shard, self.name)

    def input_rows(self, shard: str) -> pa.Table:
        """(key, url) of the pool images of `shard` this stage receives, sorted by key
        (:func:`curation.data.samples.shard_input_rows`)."""
        return shard_input_rows(self.layout, self.name, shard)
