"""Atomic file output: every file a stage writes appears under its final name only when complete.

A writer writes `NAME.tmp-<pid>-<rand>` beside the target and renames it with `os.replace`, which is atomic on
POSIX filesystems (the run root of a cluster run is a shared POSIX mount).  A run killed mid-write leaves only
temporary files, which :func:`clean_temporaries` removes when the stage starts again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import tarfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import conform

TMP_MARK = ".tmp-"
#: set to N, the process SIGKILLs itself at its N-th crash point (every atomic commit and stage boundary): the
#: kill -9 resume test uses it to stop a run at a chosen point deterministically
CRASH_ENV = "LVD_CRASH_AT"
_crash_count = 0
_recorders: list[tuple[list[Path], object]] = []  # (committed paths, callback before each commit or None)
_announcing = False


def crash_point() -> int:
    """Count one crash point; at the one named by $LVD_CRASH_AT, die like `kill -9`.  Returns the count so far."""
    global _crash_count
    _crash_count += 1
    if os.environ.get(CRASH_ENV) == str(_crash_count):
        os.kill(os.getpid(), signal.SIGKILL)
    return _crash_count


def commit(tmp: Path, path: Path, record: bool = True) -> None:
    """Rename a finished temporary file to its final name (atomic) and record it for :func:`recording` (unless
    `record` is false: working state that is not an output, such as a search's resumable block results)."""
    global _announcing
    recorders = [] if _announcing or not record else list(_recorders)  # a callback's own writes are not recorded
    for _, before in recorders:
        if before is not None:
            _announcing = True
            try:
                before(Path(path))
            finally:
                _announcing = False
    crash_point()  # every commit is a crash point of the kill -9 tests: outputs, and a search's resumable blocks
    durable_replace(tmp, path)
    for paths, _ in recorders:
        paths.append(Path(path))


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """``os.replace(tmp, path)`` that survives a power loss: the file's data (for a directory: its entries; the
    caller flushes the files inside) is flushed before the rename and the parent directory's new entry after it
    (without the second, a marker or a checkpoint can vanish or point at a file that never reached the disk,
    although the rename itself is atomic)."""
    tmp = Path(tmp)
    fsync_path(tmp, directory=tmp.is_dir())
    os.replace(tmp, path)
    fsync_path(Path(path).parent, directory=True)


def remove_own_temporaries(directory: str | os.PathLike) -> int:
    """Remove the temporaries this process left below `directory` (a failed unit's partial files, e.g. after
    ENOSPC); another process's are left alone (it may still be writing them).  Returns how many were removed."""
    return clean_temporaries(directory, f"{TMP_MARK}{os.getpid()}-")


@contextlib.contextmanager
def recording(before_commit=None) -> Iterator[list[Path]]:
    """Collect the paths committed by this process while the block runs (a unit's outputs, for its marker).
    `before_commit(path)` is called before each rename (a write-ahead list of what the block may have written)."""
    paths: list[Path] = []
    entry = (paths, before_commit)
    _recorders.append(entry)
    try:
        yield paths
    finally:
        _recorders.remove(entry)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, record: bool = True) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to `path` (recorded as an output unless `record` is false),
    on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        commit(tmp, path, record)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def temporary_link(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary hard link (or copy) of `path` for a consumer that deletes its input; `path` stays.  The
    link carries the temporary mark, so a leftover of a killed run is removed by :func:`clean_temporaries`."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_table(path: str | os.PathLike, table: pa.Table, schema: pa.Schema | str | None = None,
                metadata: dict[str, str] | None = None) -> pa.Table:
    """Validate `table` against `schema` (a name from schemas.SCHEMAS or a pa.Schema) and write it atomically;
    `metadata`: key-value pairs stored in the file's schema (facts about the whole table)."""
    if schema is not None:
        table = conform(table, schema)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return table


def read_table(path: str | os.PathLike, schema: pa.Schema | str | None = None) -> pa.Table:
    table = pq.read_table(path)
    return conform(table, schema) if schema is not None else table


def read_tables(paths, schema: pa.Schema | str) -> pa.Table:
    """Concatenate many parquet files of one schema (an empty table of that schema when there are none)."""
    from schemas import empty

    tables = [read_table(p, schema) for p in paths]
    return pa.concat_tables(tables) if tables else empty(schema)


def clean_temporaries(directory: str | os.PathLike, mark: str = TMP_MARK) -> int:
    """Remove leftovers of interrupted atomic writes below `directory` (files whose name holds `mark`: any
    process's temporaries by default); return how many were removed."""
    directory = Path(directory)
    if not directory.exists():
        return 0
    removed = 0
    for p in directory.rglob(f"*{mark}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


class TarShardWriter:
    """Write a WebDataset tar shard atomically: samples are `key.ext` members, grouped by key."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = tmp_path(self.path)
        self._tar = tarfile.open(self._tmp, "w")
        self.count = 0

    def write(self, key: str, members: dict[str, bytes | str | dict]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        for ext, value in members.items():
            if isinstance(value, dict):
                value = json.dumps(value, sort_keys=True).encode()
            elif isinstance(value, str):
                value = value.encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(value)
            info.mtime = 0  # deterministic bytes: reruns give identical shards
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(value))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        commit(self._tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_tar_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """Yield (key, ext, member) for each regular file of an open WebDataset tar (``dir/key.ext.more`` ->
    key ``key``, ext ``ext.more``), in archive order."""
    for info in tar:
        if info.isfile():
            key, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
            yield key, ext, info


def iter_tar_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for each sample of a WebDataset tar, members of one key being adjacent."""
    current_key, current = None, {}
    with tarfile.open(path, "r") as tar:
        for key, ext, info in iter_tar_members(tar):
            data = tar.extractfile(info).read()
            if key != current_key and current_key is not None:
                yield current_key, current
                current = {}
            current_key = key
            current[ext] = data
    if current_key is not None:
        yield current_key, current
