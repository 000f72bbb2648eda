"""The stage runner: runs the configured stages in order, unit by unit, on Ray or in-process.

* Units already done (their completion marker matches their outputs, see :mod:`curation.pipeline.markers`) are skipped,
  so a killed run resumes where it stopped and rerunning a finished run does nothing; a unit whose outputs were
  truncated or altered since is redone.
* The other units run on ``StageWorker``s, each of which builds the stage and calls its ``setup()`` once: at most
  ``ray.max_in_flight`` Ray actors per stage (a unit waits in the driver until a worker is free: back-pressure),
  or one in-process worker.  A unit is retried up to ``ray.max_retries`` times, whether it raised or its worker
  died (Ray restarts a dead worker, which sets up again).
* A unit that still fails is reported by name at the end of its stage; the other units finish first, and the
  run stops before later stages, which would read incomplete input.
* After each stage the funnel and drops tables are rebuilt and the accounting invariants are checked.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow.compute as pc
from tqdm.auto import tqdm

from curation.pipeline import accounting, markers, retry, storage
from curation.config import ConfigError, CurateConfig, check_resume, dump_config
from curation.cluster.local_cluster import prepare_to_join
from curation.pipeline.layout import RunLayout
from curation.pipeline.runlock import run_root_lock
from curation.stages import stage_class
from curation.stages.base import Stage, Unit
from curation.pipeline.storage import clean_temporaries, crash_point, write_text
from curation.data.urllists import check_inputs

log = logging.getLogger("lvd")


#: without a terminal (a file, a Ray job's log), a stage longer than this prints a progress line this often
HEARTBEAT_S = 60.0


class StageFailed(RuntimeError):
    pass


def build_stage(stage: str, cfg_json: dict, root: str) -> Stage:
    """Build a stage in a worker from its name or class path (``package.module:Class``: importing it registers a
    stage the driver registered, so the config's stage list validates here too)."""
    cls = stage_class(stage)
    return cls(CurateConfig.model_validate(cfg_json), Path(root))


def execute_unit(stage: Stage, unit: Unit) -> dict[str, Any]:
    """Run one unit and write its completion marker (the list of outputs it wrote) last."""
    t0 = time.time()
    try:
        with storage.recording() as outputs:
            summary = stage.run_unit(unit) or {}
    except BaseException:
        # its partial files go with it (one unit runs at a time in a worker process, so this process's
        # temporaries under the stage's folders are this unit's)
        for folder in (stage.dir, markers.marker_path(stage.root, stage.name, unit.id).parent):
            storage.remove_own_temporaries(folder)
        raise
    markers.write_marker(stage.root, stage.name, unit.id, dict.fromkeys(outputs))
    summary["seconds"] = round(time.time() - t0, 3)
    return summary


class StageWorker:
    """One worker of a stage: builds the stage and runs its ``setup()`` once, then runs units one after another
    (a Ray actor on a cluster, a plain object in-process)."""

    def __init__(self, stage: str, cfg_json: dict, root: str):
        self.stage = build_stage(stage, cfg_json, root)
        self.stage.setup()

    def ready(self) -> bool:
        return True

    def run(self, unit: Unit) -> dict[str, Any]:
        return execute_unit(self.stage, unit)


class LocalExecutor:
    """Runs units one after another in this process, on one worker (debugging, and environments without Ray)."""

    def map(self, stage: Stage, units: Sequence[Unit], on_done: Callable[[Unit, dict | None, Exception | None], None]):
        try:
            worker = StageWorker(*stage.worker_args)
        except Exception as err:  # noqa: BLE001 - setup failed: every unit fails with its reason
            for unit in units:
                on_done(unit, None, err)
            return
        for unit in units:
            try:
                result = worker.run(unit)
            except Exception as err:  # noqa: BLE001 - reported per unit, the run goes on
                on_done(unit, None, err)
            else:
                on_done(unit, result, None)


class RayExecutor:
    """Runs a stage's units on a pool of Ray actors (one ``StageWorker`` each, set up once), at most
    ``max_in_flight`` of them, retrying a unit up to ``max_retries`` times whether it raised or its worker died
    (a dead worker is restarted, up to ``max_retries`` times, and sets up again)."""

    def __init__(self, max_in_flight: int, max_retries: int):
        import ray

        self.ray = ray
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self._actor = ray.remote(StageWorker)

    def fit_to_cluster(self, res: dict[str, float]) -> dict[str, float]:
        """Clamp a request to the largest node: asking for more CPUs/GPUs than any node has would queue forever."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        max_cpu = max((n.get("CPU", 0) for n in nodes), default=1) or 1
        max_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
        return {"num_cpus": min(res.get("num_cpus", 1), max_cpu), "num_gpus": min(res.get("num_gpus", 0), max_gpu)}

    def map(self, stage: Stage, units: Sequence[Unit], on_done):
        ray = self.ray
        res = self.fit_to_cluster(stage.resources())
        actor = self._actor.options(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"],
                                    max_restarts=self.max_retries, name=None)
        workers = [actor.remote(*stage.worker_args) for _ in range(min(self.max_in_flight, len(units)))]
        starting = {w.ready.remote(): w for w in workers}  # a worker gets units once its setup() has finished
        idle: list = []
        pending = deque(units)
        attempts: dict[str, int] = {}
        running: dict[Any, tuple[Any, Unit]] = {}
        last_error: Exception | None = None
        try:
            while pending or running:
                while idle and pending:
                    w = idle.pop()
                    unit = pending.popleft()
                    running[w.run.remote(unit)] = (w, unit)
                if not starting and not running:  # every worker is gone: the rest cannot run
                    for unit in pending:
                        on_done(unit, None, last_error or RuntimeError("no worker of the stage could start"))
                    return
                (ref,), _ = ray.wait(list(starting) + list(running), num_returns=1)
                if ref in starting:
                    w = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - its setup() failed for good
                        last_error = err
                    else:
                        idle.append(w)
                    continue
                w, unit = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as err:  # the worker died; Ray restarts it (setup again)
                    starting[w.ready.remote()] = w
                    self._retry_or_fail(unit, err, attempts, pending, on_done)
                except Exception as err:  # noqa: BLE001 - the unit raised; the worker is fine
                    idle.append(w)
                    self._retry_or_fail(unit, err, attempts, pending, on_done)
                else:
                    idle.append(w)
                    on_done(unit, result, None)
        finally:
            for w in workers:
                ray.kill(w)

    def _retry_or_fail(self, unit, err, attempts, pending, on_done) -> None:
        attempts[unit.id] = attempts.get(unit.id, 0) + 1
        if attempts[unit.id] <= self.max_retries:
            pending.appendleft(unit)
        else:
            on_done(unit, None, err)


def describe_ray_target(address: str | None) -> str:
    """Say which Ray this driver is about to use: ray.init() without an address silently joins a cluster already
    running on this machine (`ray start`), and starts a private one only when there is none."""
    if address:
        source = "ray.address" if address != os.environ.get("RAY_ADDRESS") else "RAY_ADDRESS"
        return f"ray: connecting to the cluster at {address} (from {source})"
    try:
        from ray._private.services import canonicalize_bootstrap_address

        running = canonicalize_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - a private Ray helper: only the wording of this line depends on it
        running = None
    if running:
        return (f"ray: joining the Ray cluster already running on this machine at {running} (ray start); set "
                "ray.address or --ray-address to choose another, or --local to run without Ray")
    return "ray: no cluster running here; starting a private Ray for this run (ends with it)"


def make_executor(cfg: CurateConfig):
    if cfg.ray.local:
        return LocalExecutor()
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
        print(describe_ray_target(address), flush=True)
        note = prepare_to_join(address)
        if note:
            print(note, flush=True)
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    return RayExecutor(cfg.ray.max_in_flight, cfg.ray.max_retries)


def in_ray_job() -> bool:
    """True in the driver of a `ray job submit` job (Ray's job supervisor sets this variable for it)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def prepare_run_root(cfg: CurateConfig) -> Path:
    """Create the run root and write (or check) RUN/config.yaml and the URL lists' fingerprint RUN/inputs.json; a
    run root that cannot be used is a ConfigError (one line), as is a relative one inside a Ray job."""
    root = Path(cfg.run_root)
    if in_ray_job() and not root.is_absolute():
        raise ConfigError(
            f"config error: run_root {str(root)!r} is relative: inside a Ray job it would land in the job's "
            f"temporary copy of the working directory ({os.getcwd()}) and be lost; give an absolute path on storage "
            "every node shares (or --run-root)")
    saved = RunLayout(root).config_file
    try:
        root.mkdir(parents=True, exist_ok=True)
        if saved.exists():
            check_resume(cfg, saved.read_text())
        else:
            write_text(saved, dump_config(cfg))
    except FileExistsError:
        raise ConfigError(f"config error: run_root {root} is a file, not a folder") from None
    except NotADirectoryError:
        raise ConfigError(f"config error: run_root {root} lies under a file, not a folder") from None
    except OSError as err:
        raise ConfigError(f"config error: run_root {root} is not usable: {err.strerror} "
                          f"({err.filename or root})") from None
    check_inputs(root, cfg.input)  # a changed URL list is refused like a changed config
    return root


def unit_complete(stage: Stage, unit: Unit, verify: bool = False) -> bool:
    """A unit is done when its completion marker matches its outputs (a unit whose outputs were altered since is
    announced and redone)."""
    problem = markers.marker_problem(stage.root, stage.name, unit.id, verify)
    if problem and markers.marker_path(stage.root, stage.name, unit.id).exists():
        print(f"[{stage.name}] unit {unit.id} is redone: {problem}", flush=True)
    return problem is None


def run_global_step(stage: Stage, step: str, fn: Callable[[], Any], verify: bool = False) -> Any:
    """Run a stage's `plan` or `finalize` (`step`, both idempotent: they skip work whose outputs exist) with a
    marker of what it writes, announced before each output is committed.  When the step was interrupted, or an
    output recorded earlier no longer matches, all of that step's outputs are removed first, so the step computes
    them again."""
    path = markers.marker_path(stage.root, stage.name, step)
    problem = markers.marker_problem(stage.root, stage.name, step, verify) if path.exists() else None
    if problem:
        print(f"[{stage.name}] {step.strip('_')} is redone: {problem}", flush=True)
        for p in markers.marked_outputs(stage.root, stage.name, step):
            p.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    announced: list[Path] = []

    def before_commit(p: Path) -> None:
        announced.append(p)
        markers.write_pending(stage.root, stage.name, step, dict.fromkeys(announced))

    with storage.recording(before_commit) as outputs:
        result = fn()
    if outputs:
        markers.write_marker(stage.root, stage.name, step, dict.fromkeys(outputs))
    return result


def run_stage(stage: Stage, executor, progress: bool = True, verify: bool = False) -> dict[str, Any]:
    t0 = time.time()
    crash_point()
    units = run_global_step(stage, markers.PLAN, stage.plan, verify)
    todo = [u for u in units if not unit_complete(stage, u, verify)]
    skipped = len(units) - len(todo)
    print(f"[{stage.name}] {len(units)} units, {skipped} already complete", flush=True)
    failures: list[tuple[Unit, Exception]] = []
    totals: dict[str, float] = {}
    # a bar on a terminal only: in a file or a Ray job's log every refresh of it would be one more line
    live = progress and bool(todo) and sys.stderr.isatty()
    bar = tqdm(total=len(todo), desc=stage.name, unit="shard", disable=not live, file=sys.stderr, leave=False)
    beat = {"done": 0, "at": time.time()}

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
        beat["done"] += 1
        if progress and not live and time.time() - beat["at"] >= HEARTBEAT_S and beat["done"] < len(todo):
            beat["at"] = time.time()  # without a bar, a long stage still shows it is moving, rarely
            print(f"[{stage.name}] {beat['done']} of {len(todo)} units done", flush=True)

    if todo:
        markers.marker_path(stage.root, stage.name, markers.DONE).unlink(missing_ok=True)  # unfinished again
        executor.map(stage, todo, on_done)
    bar.close()
    if failures:
        names = ", ".join(u.id for u, _ in failures[:20])
        raise StageFailed(
            f"stage {stage.name!r}: {len(failures)} of {len(units)} units failed after retries ({names}); "
            f"first error: {failures[0][1]}. Completed units are kept: rerun the same command to retry the rest."
        )
    run_global_step(stage, markers.FINALIZE, stage.finalize, verify)
    markers.write_marker(stage.root, stage.name, markers.DONE, [])
    totals.pop("seconds", None)
    return {"units": len(units), "skipped": skipped, "ran": len(todo), "seconds": round(time.time() - t0, 2), **totals}


def run_pipeline(cfg: CurateConfig, stages: Sequence[str] | None = None, progress: bool = True,
                 verify: bool = False, retry_failed: bool = False) -> dict[str, Any]:
    """Run `stages` (default: the config's) in pipeline order; return per-stage summaries.  `verify`: check the
    content hash of every finished output against its marker (sizes are always checked).  `retry_failed`: fetch
    the URLs dropped for a transient reason again and redo what depends on them (:mod:`curation.pipeline.retry`)."""
    from curation.data.samples import image_set_problems

    problems = image_set_problems(cfg, list(stages) if stages else list(cfg.stages))
    if problems:  # before anything is written: an unreadable or empty image set would fail late, or select nothing
        raise ConfigError("\n".join(problems))
    root = prepare_run_root(cfg)
    with run_root_lock(root):
        return _run_locked(cfg, root, stages, progress, verify, retry_failed)


def _run_locked(cfg: CurateConfig, root: Path, stages, progress: bool, verify: bool,
                retry_failed: bool) -> dict[str, Any]:
    removed = clean_temporaries(root)  # stage folders, stats/, markers...: one driver per run root (the lock)
    if removed:
        print(f"removed {removed} partial files of an interrupted run", flush=True)
    names = list(stages) if stages else list(cfg.stages)
    try:
        line = retry.prepare(root, names, retry_failed)
    except ValueError as err:
        raise ConfigError(f"config error: {err}") from None
    if line:
        print(line, flush=True)
    executor = None
    summaries = {}
    for name in names:
        stage = stage_class(name)(cfg, root)
        if executor is None:
            executor = make_executor(cfg)
        summaries[name] = run_stage(stage, executor, progress=progress, verify=verify)
        if name == "download":
            retry.finish(root)
        _, drops = accounting.update_stats(root)
        accounting.check_invariants(root, upto=name)
        if name == "download" and name != names[-1]:
            stop_if_nothing_survived(root, drops)
    return summaries


def stop_if_nothing_survived(root: Path, drops) -> None:
    """Stop a run whose download kept no image: later stages would only process the anchor sets."""
    if accounting.kept_keys(root, "download").num_rows:
        return
    counts = drops.filter(pc.equal(drops["stage"], "download")).group_by("reason").aggregate(
        [("key", "count")]).sort_by([("key_count", "descending")]).to_pylist()
    reasons = ", ".join(f"{r['reason']} {r['key_count']}" for r in counts[:5]) or "no URLs in the input"
    raise StageFailed(f"nothing survived download ({reasons}); later stages were not run. See "
                      f"{RunLayout(root).stats('drops')} for every URL's reason and detail.")
