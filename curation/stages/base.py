"""What a stage is, for the runner.

A stage splits its work into *units* (usually one input shard each).  ``run_unit`` is a plain function of the
config, the run root and the unit: it writes its outputs atomically and its ledger part last, so ``is_done`` can
tell a finished unit from an interrupted one.  Stages with a global step (grouping duplicates, building a k-NN
graph, retrieval) do it in ``finalize``, which must also be idempotent.  Nothing here imports Ray: the same code
runs inside Ray tasks, in a plain process, and in GPU benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from curation.config import CurateConfig


@dataclass(frozen=True)
class Unit:
    id: str
    payload: dict[str, Any] = field(default_factory=dict)


class Stage:
    name: ClassVar[str]
    #: resources one unit task asks Ray for; a stage that can use a GPU sets num_gpus when one exists
    num_cpus: ClassVar[float] = 1.0

    def __init__(self, cfg: CurateConfig, root: Path | None = None):
        self.cfg = cfg
        self.root = Path(root if root is not None else cfg.run_root)
        self.dir = self.root / self.name

    def resources(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": 0}

    def plan(self) -> list[Unit]:
        """The units of work, deterministic for a given config and run root."""
        return []

    def is_done(self, unit: Unit) -> bool:
        raise NotImplementedError

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        """Do one unit; return a small JSON-able summary (counts) for the progress line."""
        raise NotImplementedError

    def finalize(self) -> None:
        """Global work after every unit is done (idempotent)."""
