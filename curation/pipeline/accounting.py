"""Accounting: every input row ends in exactly one place, a kept sample or a drop row naming stage and reason.

Each stage that can drop rows writes, per unit of work, a *ledger* part (``RUN/<stage>/_ledger/<unit>.parquet``)
with one row per key it received: kept, or dropped with one of the stage's ``drop_reasons`` (paths:
:class:`curation.pipeline.layout.RunLayout`).  From the ledgers we derive

* the keys a stage passes on (:func:`kept_keys`),
* ``stats/drops.parquet`` (every dropped row of every stage) and ``stats/funnel.parquet`` (rows in / kept /
  dropped per stage), rebuilt after each stage by :func:`update_stats`,
* the invariant checks of :func:`check_invariants` (Arrow anti-joins, never a Python set of every key): each
  key appears once per stage, and a stage received exactly the keys the previous stage kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.pipeline.layout import RunLayout
from curation.stages import drop_reasons, ledger_stages, stage_order
from curation.pipeline.storage import read_tables, write_table
from schemas.tables import DROPS, LEDGER


class AccountingError(RuntimeError):
    pass


def ledger_dir(root: Path, stage: str) -> Path:
    return RunLayout(root).ledger_dir(stage)


def ledger_path(root: Path, stage: str, unit_id: str) -> Path:
    return RunLayout(root).ledger_part(stage, unit_id)


def make_ledger(
    stage: str,
    keys: Sequence[str],
    urls: Sequence[str | None],
    reasons: Sequence[str | None],
    details: Sequence[str | None] | None = None,
) -> pa.Table:
    """Build a ledger table; a row whose reason is None is kept."""
    allowed = set(drop_reasons(stage))
    bad = {r for r in reasons if r is not None and r not in allowed}
    if bad:
        raise AccountingError(f"stage {stage!r} used reasons outside its vocabulary: {sorted(bad)}")
    n = len(keys)
    if details is None:
        details = [None] * n
    return pa.table(
        {
            "stage": pa.array([stage] * n, pa.string()),
            "key": pa.array(list(keys), pa.string()),
            "url": pa.array(list(urls), pa.string()),
            "kept": pa.array([r is None for r in reasons], pa.bool_()),
            "reason": pa.array(list(reasons), pa.string()),
            "detail": pa.array(list(details), pa.string()),
        },
        schema=LEDGER,
    )


def write_ledger(root: Path, stage: str, unit_id: str, table: pa.Table) -> None:
    write_table(ledger_path(root, stage, unit_id), table, "ledger")


def write_ledger_by_shard(root: Path, stage: str, table: pa.Table, input_stage: str) -> None:
    """Write a global step's ledger partitioned like its input: one part per ledger part of `input_stage` (one per
    pool shard), holding the verdicts on the keys that part kept, sorted by key; so a reader of one shard's keys
    reads one small file (and Parquet statistics let a key-range read skip the others)."""
    placed = 0
    for part in RunLayout(root).ledger_parts(input_stage):
        kept = pq.read_table(part, columns=["key"], filters=[("kept", "=", True)])["key"]
        rows = table.filter(pc.is_in(table["key"], value_set=kept)).sort_by("key")
        write_ledger(root, stage, part.stem, rows)
        placed += rows.num_rows
    if placed != table.num_rows:
        raise AccountingError(f"stage {stage!r}: {table.num_rows - placed} of its {table.num_rows} verdicts are on "
                              f"keys no {input_stage!r} ledger part kept")


def read_ledger(root: Path, stage: str) -> pa.Table:
    return read_tables(RunLayout(root).ledger_parts(stage), "ledger")


def kept_keys(root: Path, stage: str) -> pa.Table:
    """Keys (and urls) the stage passed on, sorted by key."""
    t = read_ledger(root, stage)
    t = t.filter(t["kept"]).select(["key", "url"])
    return t.sort_by("key")


def completed_ledger_stages(root: Path) -> list[str]:
    layout = RunLayout(root)
    return [s for s in ledger_stages() if layout.ledger_parts(s)]


def planned_rows(root: Path) -> int | None:
    """The number of input rows (URLs) the download plan numbered, or None before planning."""
    plan = RunLayout(root).download_plan
    return json.loads(plan.read_text())["rows"] if plan.exists() else None


def unfinished_line(root: Path, ignore: Sequence[str] = ()) -> str | None:
    """One line when the run's configured stages have not all finished (a run still going, stopped, or run with a
    subset of --stages), e.g. ``unfinished: 1 of 9 stages finished (download); next: filter``; None when finished."""
    import yaml

    from curation.pipeline import markers

    layout = RunLayout(root)
    try:
        stages = list(yaml.safe_load(layout.config_file.read_text()).get("stages") or stage_order())
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        stages = list(stage_order())
    stages = [s for s in stages if s not in ignore]
    done = markers.finished_stages(root, stages)
    if len(done) == len(stages):
        return None
    todo = [s for s in stages if s not in done]
    return (f"unfinished: {len(done)} of {len(stages)} stages finished ({', '.join(done) or 'none'}); next: "
            f"{todo[0]} (rerun the curate command to finish the run)")


def check_invariants(root: Path, stages: Iterable[str] | None = None, upto: str | None = None) -> None:
    """Raise AccountingError if the download ledger does not hold one row per planned URL, a key is judged twice by
    one stage, or a stage's input differs from the previous stage's kept keys.  With `upto`, only the stages up to
    that one are checked (later ones may hold a deleted part that their own rerun will redo)."""
    stages = list(stages) if stages is not None else completed_ledger_stages(root)
    if upto is not None:
        order = stage_order()
        stages = [s for s in stages if order.index(s) <= order.index(upto)]
    prev_kept = None
    for stage in stages:
        t = read_ledger(root, stage).select(["key", "kept"])
        if pc.count_distinct(t["key"]).as_py() != t.num_rows:
            raise AccountingError(f"stage {stage!r}: some keys have more than one ledger row")
        if stage == "download" and (n := planned_rows(root)) is not None and t.num_rows != n:
            raise AccountingError(f"stage 'download': {t.num_rows} ledger rows for {n} input URLs "
                                  f"(a ledger part under {ledger_dir(root, stage)} is missing or extra)")
        got = t.select(["key"])
        if prev_kept is not None:
            missing = prev_kept.join(got, "key", join_type="left anti")  # hash joins: no Python object per key
            extra = got.join(prev_kept, "key", join_type="left anti")
            if missing.num_rows or extra.num_rows:
                raise AccountingError(
                    f"stage {stage!r}: input differs from the previous stage's kept keys "
                    f"({missing.num_rows} never judged, e.g. {_first_keys(missing)}; {extra.num_rows} unexpected, "
                    f"e.g. {_first_keys(extra)})"
                )
        prev_kept = got.filter(t["kept"])


def _first_keys(t: pa.Table, n: int = 3) -> list[str]:
    return t.sort_by("key").slice(0, n)["key"].to_pylist()


def update_stats(root: Path) -> tuple[pa.Table, pa.Table]:
    """Rebuild stats/funnel.parquet and stats/drops.parquet from the ledgers present; return (funnel, drops)."""
    root = Path(root)
    funnel_rows = {"order": [], "stage": [], "rows_in": [], "kept": [], "dropped": []}
    drops = []
    order = stage_order()
    for stage in completed_ledger_stages(root):
        t = read_ledger(root, stage)
        n_kept = pc.sum(t["kept"]).as_py() or 0
        funnel_rows["order"].append(order.index(stage))
        funnel_rows["stage"].append(stage)
        funnel_rows["rows_in"].append(t.num_rows)
        funnel_rows["kept"].append(n_kept)
        funnel_rows["dropped"].append(t.num_rows - n_kept)
        drops.append(t.filter(pc.invert(t["kept"])).select(["stage", "key", "url", "reason", "detail"]))
    layout = RunLayout(root)
    funnel = write_table(layout.stats("funnel"), pa.table(funnel_rows), "funnel")
    drops_t = pa.concat_tables(drops) if drops else None
    if drops_t is None:
        from schemas import empty

        drops_t = empty("drops")
    else:  # a key is dropped by one stage at most: its survivor (dedup's drops only) joins by key
        found = survivors(root).select(["key", "survivor_url"])
        drops_t = drops_t.join(found, "key", join_type="left outer").select(DROPS.names)
    drops_t = write_table(layout.stats("drops"), drops_t.sort_by([("stage", "ascending"), ("key", "ascending")]),
                          "drops")
    return funnel, drops_t


def survivors(root: Path) -> pa.Table:
    """(key, survivor_key, survivor_url) of every pool image dedup dropped as a duplicate of an image it kept: the
    kept member of its component (components.parquet), with that image's URL from the dedup ledger.  Empty before
    dedup ran; an evaluation-contaminated component has no survivor."""
    layout = RunLayout(root)
    out = pa.schema([("key", pa.string()), ("survivor_key", pa.string()), ("survivor_url", pa.string())])
    if not layout.dedup_components.exists() or not layout.ledger_parts("dedup"):
        return out.empty_table()
    comp = pq.read_table(layout.dedup_components, columns=["key", "source", "component", "kept"])
    pool = comp.filter(pc.equal(comp["source"], "pool"))
    kept = pool.filter(pool["kept"]).select(["component", "key"]).rename_columns(["component", "survivor_key"])
    dropped = pool.filter(pc.invert(pool["kept"])).select(["key", "component"])
    pairs = dropped.join(kept, "component", join_type="inner").select(["key", "survivor_key"])
    urls = read_ledger(root, "dedup").select(["key", "url"]).rename_columns(["survivor_key", "survivor_url"])
    return pairs.join(urls, "survivor_key", join_type="left outer").select(out.names).cast(out)


def format_funnel(funnel: pa.Table, drops: pa.Table | None = None) -> str:
    """A plain-text funnel: one line per stage, with the top drop reasons."""
    lines = [f"{'stage':<10} {'in':>9} {'kept':>9} {'dropped':>9}  top drop reasons"]
    by_stage = {}
    if drops is not None and drops.num_rows:
        counts = drops.group_by(["stage", "reason"]).aggregate([("key", "count")]).to_pylist()
        for row in counts:
            by_stage.setdefault(row["stage"], []).append((row["key_count"], row["reason"]))
    for row in funnel.sort_by("order").to_pylist():
        reasons = sorted(by_stage.get(row["stage"], []), reverse=True)
        text = ", ".join(f"{r} {n}" for n, r in reasons[:6])
        lines.append(f"{row['stage']:<10} {row['rows_in']:>9} {row['kept']:>9} {row['dropped']:>9}  {text}")
    return "\n".join(lines)
