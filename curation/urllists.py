"""Reading the input URL lists (Parquet, CSV, TSV; files or folders of them) into one numbered table.

* Values are decoded **per row**: a URL that is not valid UTF-8 (one bad byte in a CSV, a binary ``url`` column
  in Parquet) becomes that row's ``url_error`` and the download stage drops that row alone as ``bad_url``;
  captions are decoded with replacement characters.
* An empty list (a header-only CSV, a 0-row Parquet file) is fine: it contributes no rows.
* A file that cannot be read (empty or corrupt Parquet/CSV, a ragged CSV, no ``url`` column) raises
  :class:`~curation.config.ConfigError` with one line naming the file and the problem; :func:`check_url_lists`
  (``lvd curate --check``) finds the same problems, reading only each file's header / schema.
* :func:`fingerprint_url_lists` identifies the inputs (path, size, content hash) so a run root refuses to resume
  with a changed list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from curation.config import ConfigError
from curation.layout import RunLayout
from curation.storage import file_sha256, write_json

SUFFIXES = (".parquet", ".csv", ".tsv")


def url_files(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(x for x in p.rglob("*") if x.is_file() and x.suffix.lower() in SUFFIXES)
        else:
            files.append(p)
    return files


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _read(f: Path, text_cols: list[str], schema_only: bool = False) -> pa.Table:
    """The file as a table (only its first block when `schema_only`), `text_cols` of CSVs read as raw bytes."""
    suffix = f.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"input error: {f}: URL lists must be .parquet, .csv or .tsv")
    try:
        if suffix == ".parquet":
            return pq.read_schema(f).empty_table() if schema_only else pq.read_table(f)
        if f.stat().st_size == 0:
            raise ConfigError(f"input error: {f}: empty file (a CSV needs at least a header row)")
        parse = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        convert = pacsv.ConvertOptions(strings_can_be_null=True, column_types={c: pa.binary() for c in text_cols})
        if schema_only:
            with pacsv.open_csv(f, parse_options=parse, convert_options=convert) as reader:
                return reader.schema.empty_table()
        return pacsv.read_csv(f, parse_options=parse, convert_options=convert)
    except ConfigError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        kind = "Parquet" if suffix == ".parquet" else "CSV" if suffix == ".csv" else "TSV"
        raise ConfigError(f"input error: {f}: not a readable {kind} file: {_one_line(err)}") from None


def _require(f: Path, t: pa.Table, url_col: str) -> None:
    if url_col not in t.column_names:
        raise ConfigError(f"input error: {f}: no column {url_col!r} (columns: {t.column_names}); set input.url_col")


def _text(value, strict: bool) -> tuple[str | None, str | None]:
    """(text, error) for one cell: bytes decoded as UTF-8 (strictly for URLs), other values as str."""
    if value is None or isinstance(value, str):
        return value, None
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace"), None
        except UnicodeDecodeError as err:
            return None, f"URL is not valid UTF-8 ({err.reason} at byte {err.start}): {raw[:200]!r}"
    return str(value), None


def read_url_lists(paths, url_col: str = "url", caption_col: str | None = "caption") -> pa.Table:
    """Concatenate URL lists in sorted order into (row_id, url, caption, url_error)."""
    urls, captions, errors = [], [], []
    text_cols = [url_col] + ([caption_col] if caption_col else [])
    for f in url_files(paths):
        t = _read(f, text_cols)
        _require(f, t, url_col)
        for value in t.column(url_col).to_pylist():
            url, error = _text(value, strict=True)
            urls.append(url)
            errors.append(error)
        if caption_col and caption_col in t.column_names:
            captions += [_text(c, strict=False)[0] for c in t.column(caption_col).to_pylist()]
        else:
            captions += [None] * t.num_rows
    return pa.table(
        {"row_id": pa.array(range(len(urls)), pa.int64()), "url": pa.array(urls, pa.string()),
         "caption": pa.array(captions, pa.string()), "url_error": pa.array(errors, pa.string())}
    )


def check_url_lists(input_cfg) -> list[str]:
    """One line per URL file that cannot be read or lacks the URL column (nothing beyond the header is read)."""
    problems = []
    files = url_files(input_cfg.url_list)
    if not files:
        problems.append(f"input error: no .parquet/.csv/.tsv files in {[str(p) for p in input_cfg.url_list]}")
    for f in files:
        try:
            _require(f, _read(f, [input_cfg.url_col], schema_only=True), input_cfg.url_col)
        except ConfigError as err:
            problems.append(str(err))
    return problems


def fingerprint_url_lists(paths, previous: dict | None = None) -> dict[str, dict]:
    """{path: {size, mtime_ns, sha256}} of every URL file.  A file whose size and mtime match `previous` keeps its
    recorded hash (resuming costs a stat per file); any other file is hashed, so a rewrite at the same path, or a
    copy with the old size, is seen."""
    out = {}
    for f in url_files(paths):
        try:
            st = f.stat()
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            old = (previous or {}).get(str(f.resolve()))
            same_stat = old and {k: old.get(k) for k in entry} == entry
            out[str(f.resolve())] = {**entry, "sha256": old["sha256"] if same_stat else file_sha256(f)}
        except OSError as err:
            raise ConfigError(f"input error: {f}: cannot read: {_one_line(err)}") from None
    return out


def check_inputs(root: Path, input_cfg) -> None:
    """Record the URL lists' fingerprint in RUN/inputs.json at the first start; on a rerun refuse changed inputs
    (a changed list would silently reuse the old plan)."""
    path = RunLayout(root).inputs_file
    if not path.exists():
        write_json(path, fingerprint_url_lists(input_cfg.url_list))
        return
    saved = json.loads(path.read_text())
    now = fingerprint_url_lists(input_cfg.url_list, saved)
    changed = sorted(f for f in saved.keys() & now.keys() if (saved[f]["size"], saved[f]["sha256"]) !=
                     (now[f]["size"], now[f]["sha256"]))
    added, removed = sorted(now.keys() - saved.keys()), sorted(saved.keys() - now.keys())
    if changed or added or removed:
        what = "; ".join(f"{label}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
                         for label, files in (("changed", changed), ("added", added), ("removed", removed)) if files)
        raise ConfigError(f"input error: the URL lists differ from those this run root was started with ({what}); "
                          f"use a new run_root, or restore the original lists (fingerprints in {path})")
    if now != saved:
        write_json(path, now)  # same content, new mtimes: remember them so the next start stats only
