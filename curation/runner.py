"""The stage runner: runs the configured stages in order, unit by unit, on Ray or in-process.

* Units already complete (their ledger / marker exists) are skipped, so a killed run resumes where it stopped
  and rerunning a finished run does nothing.
* At most ``ray.max_in_flight`` unit tasks are queued at once (back-pressure), each retried up to
  ``ray.max_retries`` times by Ray, whether it raised or its worker died.
* A unit that still fails is reported by name at the end of its stage; the other units finish first, and the
  run stops before later stages, which would read incomplete input.
* After each stage the funnel and drops tables are rebuilt and the accounting invariants are checked.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from curation import accounting
from curation.config import CurateConfig, check_resume, dump_config
from curation.stages import stage_class
from curation.stages.base import Stage, Unit
from curation.storage import clean_temporaries, write_text
from curation.urllists import check_inputs

log = logging.getLogger("lvd")


class StageFailed(RuntimeError):
    pass


def run_unit_task(stage_name: str, cfg_json: dict, root: str, unit: Unit) -> dict[str, Any]:
    """The body of one Ray task (also called directly when running without Ray)."""
    cfg = CurateConfig.model_validate(cfg_json)
    stage = stage_class(stage_name)(cfg, Path(root))
    t0 = time.time()
    summary = stage.run_unit(unit) or {}
    summary["seconds"] = round(time.time() - t0, 3)
    return summary


class LocalExecutor:
    """Runs units one after another in this process (debugging, and environments without Ray)."""

    def map(self, stage: Stage, units: Sequence[Unit], on_done: Callable[[Unit, dict | None, Exception | None], None]):
        cfg_json = stage.cfg.model_dump(mode="json")
        for unit in units:
            try:
                result = run_unit_task(stage.name, cfg_json, str(stage.root), unit)
            except Exception as err:  # noqa: BLE001 - reported per unit, the run goes on
                on_done(unit, None, err)
            else:
                on_done(unit, result, None)


class RayExecutor:
    """Runs units as Ray tasks with bounded concurrency and retries."""

    def __init__(self, max_in_flight: int, max_retries: int):
        import ray

        self.ray = ray
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self._remote = ray.remote(run_unit_task)

    def fit_to_cluster(self, res: dict[str, float]) -> dict[str, float]:
        """Clamp a request to the largest node: asking for more CPUs/GPUs than any node has would queue forever."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        max_cpu = max((n.get("CPU", 0) for n in nodes), default=1) or 1
        max_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
        return {"num_cpus": min(res.get("num_cpus", 1), max_cpu), "num_gpus": min(res.get("num_gpus", 0), max_gpu)}

    def map(self, stage: Stage, units: Sequence[Unit], on_done):
        ray = self.ray
        cfg_json = stage.cfg.model_dump(mode="json")
        res = self.fit_to_cluster(stage.resources())
        task = self._remote.options(
            num_cpus=res["num_cpus"], num_gpus=res["num_gpus"],
            max_retries=self.max_retries, retry_exceptions=True, name=f"lvd-{stage.name}",
        )
        pending = list(units)[::-1]
        in_flight: dict[Any, Unit] = {}
        while pending or in_flight:
            while pending and len(in_flight) < self.max_in_flight:
                unit = pending.pop()
                in_flight[task.remote(stage.name, cfg_json, str(stage.root), unit)] = unit
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                unit = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as err:  # noqa: BLE001
                    on_done(unit, None, err)
                else:
                    on_done(unit, result, None)


def make_executor(cfg: CurateConfig):
    if cfg.ray.local:
        return LocalExecutor()
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    return RayExecutor(cfg.ray.max_in_flight, cfg.ray.max_retries)


def prepare_run_root(cfg: CurateConfig) -> Path:
    """Create the run root and write (or check) RUN/config.yaml and the URL lists' fingerprint RUN/inputs.json."""
    root = Path(cfg.run_root)
    root.mkdir(parents=True, exist_ok=True)
    saved = root / "config.yaml"
    if saved.exists():
        check_resume(cfg, saved.read_text())
    check_inputs(root, cfg.input)  # a changed URL list is refused like a changed config
    if not saved.exists():
        write_text(saved, dump_config(cfg))
    return root


def run_stage(stage: Stage, executor, progress: bool = True) -> dict[str, Any]:
    t0 = time.time()
    removed = clean_temporaries(stage.dir)
    units = stage.plan()
    todo = [u for u in units if not stage.is_done(u)]
    skipped = len(units) - len(todo)
    msg = f"[{stage.name}] {len(units)} units, {skipped} already complete"
    if removed:
        msg += f", removed {removed} partial files of an interrupted run"
    print(msg, flush=True)
    failures: list[tuple[Unit, Exception]] = []
    totals: dict[str, float] = {}
    bar = tqdm(total=len(todo), desc=stage.name, unit="shard", disable=not progress or not todo, file=sys.stderr)

    def on_done(unit, result, err):
        if err is not None:
            failures.append((unit, err))
            bar.write(f"[{stage.name}] unit {unit.id} failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
        else:
            for k, v in result.items():
                if isinstance(v, (int, float)):
                    totals[k] = totals.get(k, 0) + v
            bar.set_postfix({k: int(v) for k, v in totals.items() if k != "seconds"}, refresh=False)
        bar.update(1)

    if todo:
        executor.map(stage, todo, on_done)
    bar.close()
    if failures:
        names = ", ".join(u.id for u, _ in failures[:20])
        raise StageFailed(
            f"stage {stage.name!r}: {len(failures)} of {len(units)} units failed after retries ({names}); "
            f"first error: {failures[0][1]}. Completed units are kept: rerun the same command to retry the rest."
        )
    stage.finalize()
    totals.pop("seconds", None)
    return {"units": len(units), "skipped": skipped, "ran": len(todo), "seconds": round(time.time() - t0, 2), **totals}


def run_pipeline(cfg: CurateConfig, stages: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run `stages` (default: the config's) in pipeline order; return per-stage summaries."""
    root = prepare_run_root(cfg)
    names = list(stages) if stages else list(cfg.stages)
    executor = None
    summaries = {}
    for name in names:
        stage = stage_class(name)(cfg, root)
        if executor is None:
            executor = make_executor(cfg)
        summaries[name] = run_stage(stage, executor, progress=progress)
        accounting.update_stats(root)
        accounting.check_invariants(root)
    return summaries
