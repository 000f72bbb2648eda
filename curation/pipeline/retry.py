"""Retrying transient download failures (``--retry-failed``): fetch again only the URLs an outage dropped, then
redo everything downstream that depends on them.

A download drop is *transient* when the same request may well succeed later: ``network_error``, ``timeout``, and
an ``http_error`` whose status is 429 (too many requests) or 5xx (server error); see
:func:`curation.stages.download.is_transient`.  Every other reason (a 404, an undecodable file, a refused address)
would give the same answer again and is kept.

How a retry runs, so that a kill at any point is resumed by the next run (with or without the flag):

1. The request: ``download/_retry/request.json`` lists, per download shard, the keys to fetch again (only shards
   whose completion marker is intact: a damaged shard is fetched whole by the ordinary resume anyway).  It is
   written before anything is invalidated and removed only after the download stage has finished.
2. Invalidation, idempotent, repeated at every start while the request exists: the download markers of those
   shards; in the per-shard stages (filter, hash, sscd, embed) the units of those shards and the stage's global
   steps (plan, finalize), with the outputs their markers list; the whole-pool stages (dedup, retrieve, shards,
   report) entirely, since one more image can change every verdict there (duplicate components, retrieval
   neighbours, shard contents); and the caches derived from pool tars.
3. The download stage reruns those shards: the unit sees the request and fetches only the listed rows, keeping the
   other rows' images and verdicts as they were (:meth:`DownloadStage.run_unit`).  Each shard keeps one ledger row
   per URL, so the accounting invariant holds throughout.  The later stages then run as on a resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

from curation.pipeline import markers
from curation.pipeline.layout import SHARDS_META, RunLayout
from curation.stages import per_shard_stages, stage_order
from curation.pipeline.storage import write_json
#: caches computed from pool tars (tar member indexes are also checked against their tar's mtime)
POOL_CACHES = ("_tarindex",)


def request_path(root: Path) -> Path:
    return RunLayout(root).stage_dir("download") / "_retry" / "request.json"


def read_request(root: Path) -> dict[str, list[str]]:
    path = request_path(root)
    return json.loads(path.read_text())["shards"] if path.exists() else {}


def keys_to_retry(root: Path, shard: str) -> set[str] | None:
    """The keys of download shard `shard` a pending retry fetches again (None: the shard is fetched whole)."""
    keys = read_request(root).get(shard)
    return set(keys) if keys else None


def transient_drops(root: Path) -> dict[str, list[str]]:
    """{shard: keys} of the transient download drops in shards whose completion marker is intact."""
    from curation.stages.download import is_transient

    layout = RunLayout(root)
    found = {}
    for part in layout.shard_ledger_parts("download"):
        shard = part.stem
        if markers.marker_problem(root, "download", shard) is not None:
            continue  # redone whole by the ordinary resume
        t = pq.read_table(part, columns=["key", "kept", "reason", "detail"]).to_pylist()
        keys = [r["key"] for r in t if not r["kept"] and is_transient(r["reason"], r["detail"])]
        if keys:
            found[shard] = sorted(keys)
    return found


def prepare(root: Path, stages: Sequence[str], retry_failed: bool) -> str | None:
    """Before the stages run: with `retry_failed`, record the transient drops as a retry request; while a request
    exists (this run's, or an interrupted earlier one's), invalidate what depends on its shards.  Returns a line
    for the log, or None when there is nothing to retry."""
    root = Path(root)
    request = read_request(root)
    if retry_failed:
        if "download" not in stages:
            raise ValueError("--retry-failed fetches in the download stage: include it in --stages")
        for shard, keys in transient_drops(root).items():
            request[shard] = sorted(set(request.get(shard, [])) | set(keys))
        if request:
            write_json(request_path(root), {"shards": dict(sorted(request.items()))})
    if not request:
        return "retry: no transient download failures (network_error, timeout, HTTP 429/5xx) to retry" \
            if retry_failed else None
    invalidate(root, sorted(request))
    n = sum(len(k) for k in request.values())
    return (f"retry: fetching {n} URLs again (transient failures in {len(request)} download shards); "
            "the stages after download are redone where they depend on them")


def invalidate(root: Path, shards: Sequence[str]) -> None:
    """Remove the completion markers (and the outputs they list) of everything that depends on `shards`."""
    layout = RunLayout(root)
    for shard in shards:
        markers.marker_path(root, "download", shard).unlink(missing_ok=True)
    order = stage_order()
    for stage in order[order.index("download") + 1:]:
        per_shard = stage in per_shard_stages()  # the others look at the whole pool at once: redone entirely
        if per_shard:
            units = [s for shard in shards for s in (shard, f"pool-{shard}")] + [markers.PLAN, markers.FINALIZE]
        else:
            units = [p.stem for p in layout.markers_dir(stage).glob("*.json")]
        units.append(markers.DONE)
        for unit in units:
            for out in markers.marked_outputs(root, stage, unit):
                out.unlink(missing_ok=True)
            markers.marker_path(root, stage, unit).unlink(missing_ok=True)
        if not per_shard and stage != "report":  # scratch and caches of the global steps too
            shutil.rmtree(layout.stage_dir(stage), ignore_errors=True)
            if stage == "shards":
                shutil.rmtree(root / SHARDS_META, ignore_errors=True)
    for cache in POOL_CACHES:
        shutil.rmtree(root / cache, ignore_errors=True)


def finish(root: Path) -> None:
    """After the download stage finished: the retried shards are fetched, the request is done."""
    shutil.rmtree(request_path(root).parent, ignore_errors=True)
