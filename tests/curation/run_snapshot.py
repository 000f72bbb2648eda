"""A machine-independent snapshot of every output table of a curation run, to compare two runs (or a run against a
checked-in snapshot) table by table.

* Tables are grouped by *logical name*: a stage's part files (``download/00000.parquet``, ``embed/pool/part-00003``)
  are one table, and a stage's ledger parts (``_ledger/00000``, ``precheck``, ``final``) are one ledger, so how a
  stage splits its output into files does not matter, only what the rows say.
* Rows are sorted; run-specific strings are replaced (the run root by ``RUN``, the corpus by ``CORPUS``, the demo
  server's address by ``URL``); timings are left out; binary cells become their sha256; each vector becomes its sum
  and L2 norm.
* Floats are kept apart from the exact part and compared with a rounding tolerance (``tests/tolerance.py``).
* Tar files are snapshotted as their sorted (member name, sha256) lists (JSON members normalised first); JSON
  outputs as their normalised content.
* Internal bookkeeping (``_markers``, ``_tarindex``, ``shards_meta/_index``, the global steps' scratch ``_partitioned``, ``shards_meta/_plan``, ``_inputs``,
  per-unit ``*_stats.json``, ``inputs.json``, ``config.yaml``) is not an output and is not compared.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

INTERNAL = re.compile(r"(^|/)(_markers|_tarindex|_index|_inputs|_staging|_partitioned)(/|$)|(^|/)_plan\.parquet$|_stats\.json$"
                      r"|^inputs\.json$|^config\.yaml$|^train/|\.tmp")
TIMING_KEYS = {"seconds", "elapsed_s", "wall_s", "started", "finished", "created", "mtime_ns"}


def logical_name(rel: str) -> str:
    rel = re.sub(r"/_ledger/[^/]+\.parquet$", "/_ledger", rel)
    rel = re.sub(r"/([a-z]+-)?\d{5,}\.(parquet|tar)$", r"/*.\2", rel)
    return rel


def _normalise_text(s: str, replace: dict[str, str]) -> str:
    for old, new in replace.items():
        s = s.replace(old, new)
    return s


def _cell(value: Any, replace: dict[str, str]):
    if isinstance(value, bytes):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    if isinstance(value, str):
        return _normalise_text(value, replace)
    return value


def _table_snapshot(table: pa.Table, replace: dict[str, str]) -> dict:
    exact_cols, float_cols, vector_cols = [], [], []
    for f in table.schema:
        if pa.types.is_floating(f.type):
            float_cols.append(f.name)
        elif pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type):
            vector_cols.append(f.name)
        elif f.name not in TIMING_KEYS:
            exact_cols.append(f.name)
    rows = []
    for r in table.to_pylist():
        exact = [_cell(r[c], replace) for c in exact_cols]
        floats = [None if r[c] is None else float(r[c]) for c in float_cols]
        for c in vector_cols:
            v = r[c]
            if v is None:
                floats += [None, None]
            else:
                floats += [math.fsum(v), math.sqrt(math.fsum(x * x for x in v))]
        rows.append((exact, floats))
    rows.sort(key=lambda row: (json.dumps(row[0], default=str), [(-1 if x is None else x) for x in row[1]]))
    return {
        "schema": [f"{f.name}: {f.type}" for f in table.schema if f.name not in TIMING_KEYS],
        "exact_columns": exact_cols,
        "float_columns": float_cols + [f"{c}.{m}" for c in vector_cols for m in ("sum", "norm")],
        "rows": [row[0] for row in rows],
        "floats": [row[1] for row in rows],
    }


def _json_snapshot(value: Any, replace: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {_normalise_text(k, replace): _json_snapshot(v, replace) for k, v in sorted(value.items())
                if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_json_snapshot(v, replace) for v in value]
    if isinstance(value, str):
        return _normalise_text(value, replace)
    return value


def _tar_members(path: Path, replace: dict[str, str]) -> list[list[str]]:
    out = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.isfile():
                data = tf.extractfile(m).read()
                if m.name.endswith(".json"):  # sample metadata: the URL names the server's port
                    data = json.dumps(_json_snapshot(json.loads(data), replace), sort_keys=True).encode()
                out.append([m.name, hashlib.sha256(data).hexdigest()])
    return out


def snapshot(root: Path, replace: dict[str, str]) -> dict[str, Any]:
    """Every output of the run under ``root`` by logical name (see the module docstring)."""
    root = Path(root)
    replace = {str(root): "RUN", **replace}
    groups: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or INTERNAL.search(rel) or p.suffix not in (".parquet", ".tar", ".json"):
            continue
        groups.setdefault(logical_name(rel), []).append(p)
    out: dict[str, Any] = {}
    for name, paths in sorted(groups.items()):
        if name.endswith(".parquet") or name.endswith("/_ledger"):
            tables = [pq.read_table(p) for p in paths]
            out[name] = _table_snapshot(pa.concat_tables(tables, promote_options="default"), replace)
        elif name.endswith(".tar"):
            members = sorted(m for p in paths for m in _tar_members(p, replace))
            out[name] = {"members": members}
        else:
            assert len(paths) == 1, (name, paths)
            out[name] = {"json": _json_snapshot(json.loads(paths[0].read_text()), replace)}
    return out


def differences(actual: dict, expected: dict, tol_for) -> list[str]:
    """Human-readable differences; ``tol_for(column_values)`` gives the absolute tolerance of one float column."""
    problems = []
    for name in sorted(set(actual) | set(expected)):
        if name not in actual:
            problems.append(f"{name}: missing from the run")
            continue
        if name not in expected:
            problems.append(f"{name}: new output, not in the snapshot")
            continue
        a, e = actual[name], expected[name]
        if "rows" not in e:
            if a != e:
                problems.append(f"{name}: differs\n  run:      {json.dumps(a)[:400]}\n  snapshot: {json.dumps(e)[:400]}")
            continue
        if a["schema"] != e["schema"]:
            problems.append(f"{name}: schema {a['schema']} != {e['schema']}")
            continue
        if a["rows"] != e["rows"]:
            extra = [r for r in a["rows"] if r not in e["rows"]][:3]
            missing = [r for r in e["rows"] if r not in a["rows"]][:3]
            problems.append(f"{name}: {len(a['rows'])} rows vs {len(e['rows'])}; e.g. only in the run {extra}, "
                            f"only in the snapshot {missing}")
            continue
        for j, col in enumerate(e["float_columns"]):
            ev = [row[j] for row in e["floats"]]
            av = [row[j] for row in a["floats"]]
            tol = tol_for([x for x in ev if x is not None])
            for i, (x, y) in enumerate(zip(av, ev)):
                if (x is None) != (y is None) or (x is not None and abs(x - y) > tol):
                    problems.append(f"{name}: {col} of row {e['rows'][i]}: {x} vs {y} (tolerance {tol:.3g})")
                    break
    return problems
