"""Completion markers: what a finished unit wrote, with a checksum per output, verified when a run resumes.

After a unit's ``run_unit`` returns, the runner writes ``RUN/_markers/<stage>/<unit>.json`` listing every file the
unit committed (path relative to the run root, size, sha256).  A unit counts as complete only when its stage says
so (its ledger / output exists) *and* its marker exists and still matches: the size of every output is checked on
each resume (cheap), the content hash too with ``--verify``.  A truncated, altered or deleted output therefore
makes the unit run again instead of passing silently.  A run killed between a unit's last output and its marker
simply redoes that unit (outputs are deterministic and written atomically).

The same holds for a stage's ``plan`` and ``finalize`` (``_plan.json``, ``_finalize.json``: the download's input
shards and precheck ledger, a global grouping, the shards plan...): when one of their outputs no longer matches,
the listed outputs are removed so that the idempotent step computes them again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from curation.pipeline.layout import RunLayout
from curation.pipeline.storage import file_sha256, write_json

PLAN, FINALIZE = "_plan", "_finalize"
#: written by the runner when a whole stage has finished (units and finalize): what "N of M stages" counts
DONE = "_done"


def marker_dir(root: Path, stage: str) -> Path:
    return RunLayout(root).markers_dir(stage)


def marker_path(root: Path, stage: str, unit_id: str) -> Path:
    return marker_dir(root, stage) / f"{unit_id}.json"


#: caches a step may fill on the way, reused by whichever step comes next, so not one step's outputs: tar member
#: indexes (checked against their tar's mtime) and retrieve's k-means fits (named by their parameters); and the
#: scratch of a download retry (the request and the refetched rows, removed when the retry is done)
CACHE_DIRS = ("_tarindex/", "retrieve/_kmeans/", "download/_retry/")


def _rel(root: Path, p: Path) -> str:
    return Path(p).resolve().relative_to(Path(root).resolve()).as_posix()


def _outputs(root: Path, paths: Iterable[Path]) -> dict[str, Path]:
    rels = {_rel(root, p): Path(p) for p in paths}
    return {r: p for r, p in rels.items() if not r.startswith(CACHE_DIRS)}


def write_marker(root: Path, stage: str, unit_id: str, outputs: Iterable[Path]) -> None:
    files = {rel: {"size": p.stat().st_size, "sha256": file_sha256(p)} for rel, p in _outputs(root, outputs).items()}
    write_json(marker_path(root, stage, unit_id), {"stage": stage, "unit": unit_id, "outputs": files,
                                                   "complete": True})


def write_pending(root: Path, stage: str, step: str, outputs: Iterable[Path]) -> None:
    """Before a global step commits an output: list every output it may have written so far, marked incomplete,
    so that a step killed at any point is undone (its listed outputs removed) and run again."""
    files = dict.fromkeys(_outputs(root, outputs))
    write_json(marker_path(root, stage, step), {"stage": stage, "unit": step, "outputs": files, "complete": False})


def marker_problem(root: Path, stage: str, unit_id: str, verify: bool = False) -> str | None:
    """None when the unit's marker exists and its outputs match it; else what is wrong, in a few words."""
    path = marker_path(root, stage, unit_id)
    if not path.exists():
        return "no completion marker"
    try:
        marker = json.loads(path.read_text())
        files = marker["outputs"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable completion marker {path}"
    if not marker.get("complete", True):
        return "it was interrupted"
    for rel, want in files.items():
        p = Path(root) / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != want["size"]:
            return f"{rel} has {p.stat().st_size} bytes, {want['size']} when written"
        if verify and file_sha256(p) != want["sha256"]:
            return f"{rel} changed since it was written (sha256)"
    return None


def marked_outputs(root: Path, stage: str, unit_id: str) -> list[Path]:
    path = marker_path(root, stage, unit_id)
    try:
        return [Path(root) / rel for rel in json.loads(path.read_text())["outputs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def finished_stages(root: Path, stages: Iterable[str]) -> list[str]:
    """The stages of `stages` that finished (their stage marker exists and matches)."""
    return [s for s in stages if marker_problem(root, s, DONE) is None]
