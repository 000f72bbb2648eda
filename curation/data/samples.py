"""Where images come from, for every stage after download.

* The **pool**: the run's WebDataset shards - ``filter/NNNNN.tar`` when the run filters (face-blurred, only kept
  images), else ``download/NNNNN.tar`` (:meth:`curation.pipeline.layout.RunLayout.pool_tars`) - restricted to the keys a
  given stage receives (:func:`shard_input_keys`).
* **Image sets** (anchor sets, evaluation sets): an image folder (class subfolders optional), WebDataset tar
  shards, or a Parquet file with a ``path`` column (and optional ``key``/``class`` columns).  Keys are made from
  the relative path (``/`` and ``.`` replaced), so they are stable and unique within the set.  Images of a folder
  or a Parquet list are read when a sample's ``data`` is asked for, so listing a set reads no image, and each
  DataLoader worker reads only the files of its own samples.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curation.pipeline.layout import RunLayout
from curation.pipeline.storage import iter_tar_samples

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Sample:
    key: str
    content: bytes | Path  # the encoded image, or the file that holds it (read by `data`)
    meta: dict  # url/caption for pool samples, class/path for image sets

    @property
    def data(self) -> bytes:
        """The encoded image (read from its file on every call when the sample refers to one)."""
        return self.content if isinstance(self.content, bytes) else Path(self.content).read_bytes()


#: the members a pool sample's image may be stored under, in order of preference
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


def image_member(members: dict[str, bytes]) -> str | None:
    """The member (extension) holding a pool sample's image: the first non-empty one of :data:`IMAGE_MEMBERS`."""
    return next((ext for ext in IMAGE_MEMBERS if members.get(ext)), None)


def iter_shard_samples(tar_path: Path, keys: set[str] | None = None) -> Iterator[Sample]:
    for key, members in iter_tar_samples(tar_path):
        if keys is not None and key not in keys:
            continue
        ext = image_member(members)
        if ext is None:
            continue
        data = members[ext]
        meta = json.loads(members["json"]) if "json" in members else {}
        yield Sample(key, data, meta)


def shard_input_keys(layout: RunLayout, stage: str, shard: str) -> set[str]:
    """The keys of pool shard `shard` that `stage` receives (:func:`shard_input_rows`)."""
    return set(shard_input_rows(layout, stage, shard)["key"].to_pylist())


def shard_input_rows(layout: RunLayout, stage: str, shard: str) -> pa.Table:
    """(key, url) of the pool images of shard `shard` that `stage` receives, sorted by key: the keys its input
    ledger stage kept, read only within the key range of the shard (the keys the shard's own ledger part kept), so
    Parquet row-group pruning keeps this cheap however large the input ledger is."""
    own = _kept(layout.ledger_part(layout.pool_tar_stage(stage), shard))
    window = [("key", ">=", min(own)), ("key", "<=", max(own)), ("kept", "=", True)] if own else None
    parts = [pq.read_table(p, columns=["key", "url"], filters=window)
             for p in (layout.ledger_parts(layout.input_ledger_stage(stage)) if own else [])]
    if not parts:
        return pa.table({"key": pa.array([], pa.string()), "url": pa.array([], pa.string())})
    return pa.concat_tables(parts).sort_by("key")


def _kept(ledger_part: Path) -> set[str]:
    """The kept keys of one ledger part."""
    return set(pq.read_table(ledger_part, columns=["key"], filters=[("kept", "=", True)])["key"].to_pylist())


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


def path_key(rel: str) -> str:
    """A WebDataset-safe key from a relative path: 'cls/img.01.jpg' -> 'cls_img_01'."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return _KEY_BAD.sub("_", stem)


def detect_format(path: Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return "parquet"
    if path.is_file() and path.suffix == ".tar":
        return "webdataset"
    if path.is_dir() and any(path.glob("*.tar")):
        return "webdataset"
    if path.is_dir():
        return "folder"
    raise ValueError(f"{path}: not an image folder, .tar shard(s) or .parquet list")


def is_image_file(p: Path) -> bool:
    """A file an image folder contributes (by its extension; decoding decides later whether it is one)."""
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


def iter_image_set(path: Path, fmt: str = "auto") -> Iterator[Sample]:
    """Iterate an anchor or evaluation set in a deterministic order."""
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "folder":
        files = sorted(p for p in path.rglob("*") if is_image_file(p))
        for p in files:
            rel = p.relative_to(path).as_posix()
            cls = rel.split("/")[0] if "/" in rel else None
            yield Sample(path_key(rel), p, {"path": str(p), "class": cls})
    elif fmt == "webdataset":
        tars = [path] if path.is_file() else sorted(path.glob("*.tar"))
        for tar in tars:
            for s in iter_shard_samples(tar):
                s.meta.setdefault("class", s.meta.get("cls"))
                yield s
    elif fmt == "parquet":
        t = pq.read_table(path).to_pylist()
        base = path.parent
        for i, row in enumerate(t):
            p = Path(row["path"])
            p = p if p.is_absolute() else base / p
            key = row.get("key") or path_key(Path(row["path"]).as_posix())
            yield Sample(str(key), p, {"path": str(p), "class": row.get("class")})
    else:
        raise ValueError(f"unknown image set format {fmt!r}")


def image_set_problem(path: Path, fmt: str = "auto") -> str | None:
    """Why the anchor or evaluation set at `path` cannot be read, or None: a path that is no image folder, .tar
    shard(s) or .parquet list; a Parquet list without a text column ``path`` (any other type fails late, in a decode
    worker); a set that holds no image (an empty folder, tars without an image member, a Parquet list without
    rows). A set with nothing in it is a mistake (a wrong folder, a copy not finished), never a set to run on:
    every selection from it would be empty without a word. Reads no more than the first image."""
    import pyarrow as pa

    path = Path(path)
    try:
        fmt = detect_format(path) if fmt == "auto" else fmt
    except ValueError as err:
        return str(err)
    if fmt == "parquet":
        try:
            schema = pq.read_schema(path)
            rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as err:
            return f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})"
        if "path" not in schema.names:
            return f"{path}: no column 'path' (columns: {schema.names}); an image list names each image's file"
        if not (pa.types.is_string(schema.field("path").type) or pa.types.is_large_string(schema.field("path").type)):
            return f"{path}: column 'path' is {schema.field('path').type}, not text (the image files' paths)"
        return None if rows else f"{path}: holds no image (a Parquet list without rows)"
    if fmt == "folder" and not path.is_dir():
        return f"{path}: not a folder"
    if fmt == "webdataset" and not (path.is_file() or any(path.glob("*.tar"))):
        return f"{path}: no .tar shard"
    if fmt == "folder":  # the first image file found, not a sorted listing of a set of millions
        found = any(is_image_file(p) for p in path.rglob("*"))
        return None if found else f"{path}: holds no image (a folder without image files ({', '.join(IMAGE_EXTS)}))"
    try:
        first = next(iter_image_set(path, fmt), None)
    except Exception as err:  # noqa: BLE001 - an unreadable tar: said in one line, with the reader's reason
        return f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if first is None:
        what = "tar shards without an image member" if fmt == "webdataset" else "no image"
        return f"{path}: holds no image ({what})"
    return None


#: the stages that decode every image of the anchor and evaluation sets (the others read their vectors or names)
IMAGE_SET_READERS = ("sscd", "embed")


def image_set_problems(cfg, stages) -> list[str]:
    """One config-error line per anchor or evaluation set that cannot be read (:func:`image_set_problem`), when one
    of `stages` decodes the sets' images (:data:`IMAGE_SET_READERS`; a later run of dedup or retrieve alone reads
    the vectors those wrote); checked at ``--check`` and before a run starts."""
    if not any(name in IMAGE_SET_READERS for name in stages):
        return []
    sets = [(f"dedup.eval_sets[{i}]", s, "auto") for i, s in enumerate(cfg.dedup.eval_sets)]
    sets += [(f"retrieve.anchor_sets[{i}]", s, s.format) for i, s in enumerate(cfg.retrieve.anchor_sets)]
    out = []
    for where, s, fmt in sets:
        problem = image_set_problem(s.path, fmt)
        if problem:
            out.append(f"config error: {where} ({s.name!r}): {problem}")
    return out
