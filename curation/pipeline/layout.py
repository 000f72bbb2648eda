"""The run layout: every path of a run, and which stage's output feeds which stage.

A run root holds one folder per stage plus run-wide files::

    RUN/config.yaml                     the run's config (a rerun must match it)
    RUN/inputs.json                     fingerprint of the URL lists
    RUN/_markers/<stage>/<unit>.json    completion markers: a unit is done when its marker matches its outputs
    RUN/_tarindex/<stage>/<shard>.parquet   member offsets of a stage's tar shards (random access)
    RUN/<stage>/_ledger/<unit>.parquet  the stage's verdict on every key it received (ledger stages only)
    RUN/download/<shard>.tar|.parquet   fetched images | one status row per URL
    RUN/filter/<shard>.tar              images that passed the filters (the pool)
    RUN/hash/part-<shard>.parquet       per-image pixel hashes and thumbnails; RUN/hash/groups.parquet
    RUN/sscd/{pool,eval/<set>}/part-*.parquet      copy-detection descriptors
    RUN/dedup/components.parquet        the duplicate graph's components and verdicts
    RUN/embed/{pool,anchors/<set>,eval/<set>}/part-*.parquet   retrieval embeddings
    RUN/retrieve/{neighbors,selection}.parquet, RUN/retrieve/sets/<set>/...
    RUN/shards/lvd-*.tar                the curated dataset (tars only); RUN/shards_meta/ its index and manifest
    RUN/stats/*.parquet, RUN/stats/report.html     funnel, drops, statistics, the report

Stages ask the layout for paths instead of composing them, and never list another stage's folder themselves: the
layout resolves what a stage reads (:meth:`RunLayout.input_ledger_stage`, :meth:`RunLayout.pool_tar_stage`) from
the stages' declarations (:mod:`curation.stages`) and the run's configured stage list, not from what happens to
exist on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from curation.stages import ledger_stages, pool_tar_stages, stage_order

#: the final dataset's metadata folder (kept out of shards/, which holds tars only)
SHARDS_META = "shards_meta"


class RunLayout:
    """Paths of one run root; ``stages`` is the run's configured stage list (default: every stage)."""

    def __init__(self, root: str | Path, stages: Sequence[str] | None = None):
        self.root = Path(root)
        self.stages = tuple(s for s in stage_order() if stages is None or s in set(stages))

    @classmethod
    def of(cls, cfg, root: str | Path | None = None) -> "RunLayout":
        """The layout of a curation config's run (``root`` overrides ``cfg.run_root``)."""
        return cls(root if root is not None else cfg.run_root, cfg.stages)

    # ------------------------------------------------------------------------------------------- run-wide files
    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def inputs_file(self) -> Path:
        return self.root / "inputs.json"

    def markers_dir(self, stage: str) -> Path:
        return self.root / "_markers" / stage

    def tarindex(self, tar: Path) -> Path:
        """The member index of a stage's tar shard ``RUN/<stage>/<shard>.tar``."""
        return self.root / "_tarindex" / tar.parent.name / f"{tar.stem}.parquet"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    def stats(self, name: str) -> Path:
        """A run statistics table, ``RUN/stats/<name>.parquet``."""
        return self.stats_dir / f"{name}.parquet"

    @property
    def report_html(self) -> Path:
        return self.stats_dir / "report.html"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    # ------------------------------------------------------------------------------------------------- ledgers
    def ledger_dir(self, stage: str) -> Path:
        return self.root / stage / "_ledger"

    def ledger_part(self, stage: str, unit_id: str) -> Path:
        return self.ledger_dir(stage) / f"{unit_id}.parquet"

    def ledger_parts(self, stage: str) -> list[Path]:
        return sorted(self.ledger_dir(stage).glob("*.parquet"))

    def shard_ledger_parts(self, stage: str) -> list[Path]:
        """The per-shard ledger parts of a stage (named by shard number; not ``precheck`` or ``final``)."""
        return sorted(self.ledger_dir(stage).glob("[0-9]*.parquet"))

    # -------------------------------------------------------------------------------------- input resolution
    def input_ledger_stage(self, stage: str) -> str | None:
        """The ledger stage whose kept keys ``stage`` receives: the nearest earlier ledger stage of this run; when the
        run configures none (its earlier stages ran before, under another stage list), the nearest earlier one whose
        ledger exists, else the nearest earlier one."""
        earlier = _before(ledger_stages(), stage)
        return self._nearest(earlier, lambda s: bool(self.ledger_parts(s))) or (earlier[-1] if earlier else None)

    def pool_tar_stage(self, stage: str | None = None) -> str:
        """The stage whose tar shards hold the pool images that ``stage`` (default: any later stage) reads: the
        nearest earlier stage of this run that writes pool tars (``filter`` when the run filters); when the run
        configures none, the nearest earlier one whose tars exist, else the first one (``download``)."""
        earlier = pool_tar_stages() if stage is None else _before(pool_tar_stages(), stage)
        return self._nearest(earlier, lambda s: any((self.root / s).glob("[0-9]*.tar"))) or pool_tar_stages()[0]

    def _nearest(self, earlier: list[str], written) -> str | None:
        """The last of `earlier` this run configures; when it configures none, the last one `written` says an
        earlier run wrote; None when neither."""
        chosen = [s for s in earlier if s in self.stages] or [s for s in earlier if written(s)]
        return chosen[-1] if chosen else None

    def pool_tar(self, shard: str, stage: str | None = None) -> Path:
        """The pool tar shard ``shard`` as ``stage`` reads it."""
        return self.root / self.pool_tar_stage(stage) / f"{shard}.tar"

    def pool_tars(self, stage: str | None = None) -> list[Path]:
        return sorted((self.root / self.pool_tar_stage(stage)).glob("[0-9]*.tar"))

    # ------------------------------------------------------------------------------------------------ download
    @property
    def download_inputs_dir(self) -> Path:
        return self.root / "download" / "_inputs"

    @property
    def download_plan(self) -> Path:
        return self.download_inputs_dir / "plan.json"

    def download_input(self, shard: str) -> Path:
        """The URL rows of one download shard (Arrow IPC), written by the plan."""
        return self.download_inputs_dir / f"{shard}.arrow"

    def download_tar(self, shard: str) -> Path:
        return self.root / "download" / f"{shard}.tar"

    def download_status(self, shard: str) -> Path:
        """img2dataset's per-URL status rows of one shard."""
        return self.root / "download" / f"{shard}.parquet"

    # ------------------------------------------------------------------------------------------- filter, hash
    def filter_tar(self, shard: str) -> Path:
        return self.root / "filter" / f"{shard}.tar"

    def hash_part(self, shard: str) -> Path:
        return self.root / "hash" / f"part-{shard}.parquet"

    def hash_parts(self) -> list[Path]:
        return sorted((self.root / "hash").glob("part-*.parquet"))

    @property
    def hash_groups(self) -> Path:
        return self.root / "hash" / "groups.parquet"

    @property
    def hash_pca(self) -> Path:
        return self.root / "hash" / "pca.npz"

    # ------------------------------------------------------------------------ descriptors (sscd) and embeddings
    def vectors_dir(self, stage: str, kind: str, set_name: str | None = None) -> Path:
        """Where ``stage`` (sscd or embed) writes vectors of ``kind`` (pool, eval, anchors; sets by name)."""
        base = self.root / stage / kind
        return base / set_name if set_name is not None else base

    def vectors_part(self, stage: str, kind: str, part: str, set_name: str | None = None) -> Path:
        return self.vectors_dir(stage, kind, set_name) / f"part-{part}.parquet"

    def vectors_parts(self, stage: str, kind: str, set_name: str | None = None) -> list[Path]:
        return sorted(self.vectors_dir(stage, kind, set_name).glob("part-*.parquet"))

    def failed_part(self, stage: str, kind: str, part: str, set_name: str | None = None) -> Path:
        """The table of the images ``stage`` could not describe in one part (``.../failed/part-<part>.parquet``)."""
        return self.vectors_dir(stage, kind, set_name) / "failed" / f"part-{part}.parquet"

    def failed_parts(self, stage: str, kind: str = "pool") -> list[Path]:
        """Per-part tables of the images ``stage`` could not describe (``<stage>/<kind>/failed/``)."""
        return sorted((self.vectors_dir(stage, kind) / "failed").glob("part-*.parquet"))

    # --------------------------------------------------------------------------------------------------- dedup
    @property
    def dedup_components(self) -> Path:
        return self.root / "dedup" / "components.parquet"

    def scratch(self, stage: str, name: str) -> Path:
        """A stage's resumable scratch folder (``RUN/<stage>/_<name>``): not an output, may be deleted."""
        return self.root / stage / f"_{name}"

    # ------------------------------------------------------------------------------------------------ retrieve
    @property
    def retrieve_neighbors(self) -> Path:
        return self.root / "retrieve" / "neighbors.parquet"

    @property
    def retrieve_selection(self) -> Path:
        return self.root / "retrieve" / "selection.parquet"

    def retrieve_set_dir(self, set_name: str) -> Path:
        return self.root / "retrieve" / "sets" / set_name

    def retrieve_set_selection(self, set_name: str) -> Path:
        return self.retrieve_set_dir(set_name) / "selection.parquet"

    def retrieve_set_dirs(self) -> list[Path]:
        """The per-set folders the retrieve stage wrote (``RUN/retrieve/sets/<set>``), by name."""
        return sorted(p for p in (self.root / "retrieve" / "sets").glob("*") if p.is_dir())

    # -------------------------------------------------------------------------------------------------- shards
    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard_tar(self, name: str) -> Path:
        return self.shards_dir / f"{name}.tar"

    @property
    def shards_meta(self) -> Path:
        return self.root / SHARDS_META

    @property
    def shards_manifest(self) -> Path:
        return self.shards_meta / "manifest.json"

    @property
    def shards_index(self) -> Path:
        return self.shards_meta / "index.parquet"

    @property
    def shards_plan(self) -> Path:
        """Every selected image's shard, position and source location (the stage's plan)."""
        return self.shards_meta / "_plan.parquet"

    def shards_index_part(self, name: str) -> Path:
        """The index rows of output shard ``name`` (merged into ``shards_index`` by finalize)."""
        return self.shards_meta / "_index" / f"{name}.parquet"

    def shards_index_parts(self) -> list[Path]:
        return sorted((self.shards_meta / "_index").glob("lvd-*.parquet"))

    def shards_staging(self, set_name: str) -> Path:
        """The staging tar of an ``as_is`` anchor set's selected images (outside ``shards/``)."""
        return self.shards_meta / "_staging" / f"{set_name}.tar"


def _before(stages: Sequence[str], stage: str) -> list[str]:
    """The stages of `stages` that come before `stage` in the pipeline."""
    order = stage_order()
    return [s for s in stages if order.index(s) < order.index(stage)]
