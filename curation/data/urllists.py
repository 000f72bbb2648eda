"""Reading the input URL lists (Parquet, CSV, TSV; files or folders of them) as numbered batches of rows.

* Lists are read **streaming** (:func:`iter_url_batches`): a batch of rows at a time, never the whole list, so
  planning a download of any size holds one batch (and one input shard) in memory.
* Every line of a CSV/TSV ends in a row, or the file is refused: the file is parsed by RFC 4180 rules (a quoted
  field may hold the delimiter, quotes doubled, line breaks); a quote that is never closed (it would swallow the
  following lines, URLs included, into one caption), text after a closing quote, a row with more or fewer fields
  than the header, or one field longer than :data:`MAX_FIELD_CHARS` characters raises
  :class:`~curation.config.ConfigError` with one line naming the file and the line.  There is no block size to
  tune: a valid CSV reads whatever the length of its lines.
* Values are decoded **per row**: a URL that is not valid UTF-8 (one bad byte in a CSV, a binary ``url`` column
  in Parquet) becomes that row's ``url_error`` and the download stage drops that row alone as ``bad_url``;
  captions are decoded with replacement characters.  An empty CSV field is a missing value.
* An empty list (a header-only CSV, a 0-row Parquet file) is fine: it contributes no rows.
* A file that cannot be read (empty or corrupt Parquet/CSV, no ``url`` column: with a hint when the header looks
  separated by another delimiter, e.g. ``url;caption``) raises :class:`~curation.config.ConfigError` with one line
  naming the file and the problem; :func:`check_url_lists` (``lvd curate --check``) finds the same problems in
  each file's schema, or a CSV's first :data:`CHECK_ROWS` rows.
* :func:`fingerprint_url_lists` identifies the inputs (path, size, content hash) so a run root refuses to resume
  with a changed list.
"""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import ConfigError
from curation.pipeline.layout import RunLayout
from curation.pipeline.storage import file_sha256, write_json

SUFFIXES = (".parquet", ".csv", ".tsv")
#: the longest CSV/TSV field accepted, in characters (a caption of 64 MiB is far beyond any real one; the bound
#: keeps a file with a lost quote from being read into memory whole as one field)
MAX_FIELD_CHARS = 64 << 20
#: CSV/TSV rows :func:`check_url_lists` parses (a check, not a scan of a billion-row list)
CHECK_ROWS = 100_000
#: rows per batch of :func:`iter_url_batches`
BATCH_ROWS = 8_192
URL_BATCH = pa.schema([("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
                       ("url_error", pa.string())])


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


def _kind(f: Path) -> str:
    return {".parquet": "Parquet", ".csv": "CSV", ".tsv": "TSV"}[f.suffix.lower()]


def _check_suffix(f: Path) -> None:
    if f.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"input error: {f}: URL lists must be .parquet, .csv or .tsv")


@contextlib.contextmanager
def _csv_field_limit(chars: int):
    """Python's csv module keeps its field limit process-wide: set ours for the read, then restore it."""
    previous = csv.field_size_limit(chars)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _csv_records(f: Path, max_field_chars: int) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each record of a CSV/TSV file, the header first; blank lines are skipped.
    Bytes that are not UTF-8 are kept as surrogate escapes (decoded per value by :func:`_text`)."""
    delimiter = "\t" if f.suffix.lower() == ".tsv" else ","
    if f.stat().st_size == 0:
        raise ConfigError(f"input error: {f}: empty file (a CSV needs at least a header row)")
    with open(f, encoding="utf-8-sig", errors="surrogateescape", newline="") as text, \
            _csv_field_limit(max_field_chars):
        reader = csv.reader(text, delimiter=delimiter, quotechar='"', doublequote=True, strict=True)
        line = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise ConfigError(_csv_problem(f, line, reader.line_num, str(err), max_field_chars)) from None
            if fields:
                yield line, fields
            line = reader.line_num + 1


def _csv_problem(f: Path, start: int, now: int, error: str, max_field_chars: int) -> str:
    kind = _kind(f)
    if "field larger than field limit" in error:
        why = (f"a field is longer than {max_field_chars} characters, the limit of one {kind} field (a quote that "
               "is never closed reads the rest of the file as one field)")
    elif "unexpected end of data" in error or "EOF" in error:
        why = (f"a quote opened in the record starting here is never closed (it runs to the end of the file, line "
               f"{now}, and would swallow the lines after it): close or remove the quote")
    else:
        why = f"malformed {kind}: {error} (a quoted field must be followed by the delimiter or the end of line)"
    return f"input error: {f}: line {start}: {why}"


def _header_hint(columns: list[str]) -> str:
    if len(columns) != 1:
        return ""
    for delimiter, name in ((";", "';'"), ("\t", "tab"), ("|", "'|'")):
        if delimiter in columns[0]:
            advice = "name the file .tsv" if delimiter == "\t" else "rewrite it with ',' (or as .tsv / Parquet)"
            return (f"; the header looks {name}-separated, but a .csv is read with the delimiter ',' and a .tsv "
                    f"with tab: {advice}")
    return ""


def _require(f: Path, columns: list[str], url_col: str) -> None:
    if url_col not in columns:
        raise ConfigError(f"input error: {f}: no column {url_col!r} (columns: {columns}); set input.url_col"
                          + _header_hint(columns))


def _text(value, strict: bool) -> tuple[str | None, str | None]:
    """(text, error) for one cell: bytes (or a CSV string holding surrogate escapes of undecodable bytes) decoded
    as UTF-8 (strictly for URLs, with replacement characters otherwise), other values as str."""
    if value is None:
        return None, None
    if isinstance(value, str):
        if value.isascii():
            return value, None
        try:
            value.encode("utf-8")
            return value, None
        except UnicodeEncodeError:
            value = value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace"), None
        except UnicodeDecodeError as err:
            return None, f"URL is not valid UTF-8 ({err.reason} at byte {err.start}): {raw[:200]!r}"
    return str(value), None


def _csv_rows(f: Path, max_field_chars: int) -> Iterator[tuple[list[str], int, list[str]]]:
    """(header, line number, fields) of each data row of a CSV/TSV, refusing a row of another width."""
    records = _csv_records(f, max_field_chars)
    header = next(records, (1, None))[1]
    if header is None:
        raise ConfigError(f"input error: {f}: no header row (only blank lines)")
    yield header, 1, header
    for line, fields in records:
        if len(fields) != len(header):
            raise ConfigError(f"input error: {f}: line {line}: Expected {len(header)} columns, got {len(fields)} "
                              "(every row needs the header's fields; quote a field that holds the delimiter)")
        yield header, line, fields


def _columns(f: Path, scan_rows: int) -> list[str]:
    """The column names of one URL file (its schema, or the header of a CSV/TSV whose first `scan_rows` rows
    are also parsed)."""
    _check_suffix(f)
    try:
        if f.suffix.lower() == ".parquet":
            return pq.read_schema(f).names
        for i, (header, _, _) in enumerate(_csv_rows(f, MAX_FIELD_CHARS)):
            if i >= scan_rows:
                break
        return header
    except ConfigError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ConfigError(f"input error: {f}: not a readable {_kind(f)} file: {_one_line(err)}") from None


def _file_rows(f: Path, url_col: str, caption_col: str | None, batch_rows: int,
               max_field_chars: int) -> Iterator[tuple[list, list]]:
    """(url values, caption values) of one file, `batch_rows` at a time."""
    _check_suffix(f)
    try:
        if f.suffix.lower() == ".parquet":
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            _require(f, names, url_col)
            has_caption = bool(caption_col) and caption_col in names and caption_col != url_col
            cols = [url_col] + ([caption_col] if has_caption else [])
            for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                urls = batch.column(0).to_pylist()
                yield urls, batch.column(1).to_pylist() if has_caption else [None] * len(urls)
            return
        rows = _csv_rows(f, max_field_chars)
        header = next(rows)[0]
        _require(f, header, url_col)
        iu = header.index(url_col)
        ic = header.index(caption_col) if caption_col and caption_col in header else None
        urls, captions = [], []
        for _, _, fields in rows:
            urls.append(fields[iu] or None)
            captions.append(fields[ic] or None if ic is not None else None)
            if len(urls) >= batch_rows:
                yield urls, captions
                urls, captions = [], []
        if urls:
            yield urls, captions
    except ConfigError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ConfigError(f"input error: {f}: not a readable {_kind(f)} file: {_one_line(err)}") from None


def iter_url_batches(paths, url_col: str = "url", caption_col: str | None = "caption",
                     batch_rows: int = BATCH_ROWS, max_field_chars: int = MAX_FIELD_CHARS) -> Iterator[pa.Table]:
    """The URL lists in sorted order as tables (row_id, url, caption, url_error) of at most `batch_rows` rows;
    row ids number the rows of all files consecutively from 0."""
    row_id = 0
    for f in url_files(paths):
        for values, caption_values in _file_rows(f, url_col, caption_col, batch_rows, max_field_chars):
            urls, errors = zip(*(_text(v, strict=True) for v in values))
            captions = [_text(c, strict=False)[0] for c in caption_values]
            yield pa.table({"row_id": pa.array(range(row_id, row_id + len(urls)), pa.int64()),
                            "url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string()),
                            "url_error": pa.array(errors, pa.string())}, schema=URL_BATCH)
            row_id += len(urls)


def read_url_lists(paths, url_col: str = "url", caption_col: str | None = "caption",
                   max_field_chars: int = MAX_FIELD_CHARS) -> pa.Table:
    """The whole of :func:`iter_url_batches` as one table (small lists and tests; planning streams)."""
    return pa.Table.from_batches(
        [b for t in iter_url_batches(paths, url_col, caption_col, max_field_chars=max_field_chars)
         for b in t.to_batches()], schema=URL_BATCH)


def check_url_lists(input_cfg, scan_rows: int = CHECK_ROWS) -> list[str]:
    """One line per URL file that cannot be read or lacks the URL column (Parquet: its schema; CSV/TSV: its
    header and first `scan_rows` rows)."""
    problems = []
    files = url_files(input_cfg.url_list)
    if not files:
        problems.append(f"input error: no .parquet/.csv/.tsv files in {[str(p) for p in input_cfg.url_list]}")
    for f in files:
        try:
            _require(f, _columns(f, scan_rows), input_cfg.url_col)
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
