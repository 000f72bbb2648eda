"""shards: the curated dataset, as shuffled WebDataset shards ``shards/lvd-NNNNNN.tar``.

``shards/`` holds the tars and nothing else, so ``ray.data.read_webdataset(RUN/shards)``, ``wds.WebDataset`` and
the trainer read it as it is.  Everything else of the stage lives beside it, in ``shards_meta/``
(:data:`curation.pipeline.layout.SHARDS_META`, paths from :class:`curation.pipeline.layout.RunLayout`): the plan ``_plan.parquet``,
the index parts ``_index/``, the staging tars of ``as_is`` anchor sets ``_staging/``, and the outputs
``index.parquet`` (schema ``shard_index``) and ``manifest.json`` (shard file names, counts).

Planning (in the driver, once; deterministic): the union of selections (``retrieve/selection.parquet``, one row per
image) is shuffled with ``numpy.random.default_rng(seed)`` and cut into shards of ``shards.samples_per_shard``.
Each image's location is resolved through tar member indexes (:mod:`curation.data.tarindex`): pool images from the pool
shards (``filter/`` when the run filters, else ``download/``), images of ``as_is`` anchor sets from a staging tar
written once per set (``shards_meta/_staging/<set>.tar``: the set in any format, resized to ``images.max_side``
as pool images are, as WebDataset with the same json fields as a downloaded sample).

One unit per output shard: read its images (and their source json) by offset, write one sample per image:
``<sample_key>.jpg`` (JPEG bytes copied as they are; other formats re-encoded), ``<sample_key>.txt`` (the caption,
empty when there is none) and ``<sample_key>.json``: the img2dataset fields (key, url, caption, width, height,
original_width, original_height, sha256) and ours (source, anchor_set, anchor_key, rank, similarity, cluster).
The sample key is the pool key, or ``<set>_<key>`` for an as-is anchor image; it is the json ``key`` too.
Shards are written with :class:`curation.pipeline.storage.TarShardWriter` (atomic, deterministic bytes), after their rows
of the shard index.  ``wds.WebDataset(...).to_tuple("jpg", "txt")`` works on them, and so does our trainer.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.data.images import decode_image, encode_jpeg, resize_max_side
from curation.data.samples import iter_image_set
from curation.stages.base import Stage, Unit
from curation.pipeline.storage import TarShardWriter, clean_temporaries, read_table, read_tables, write_json, write_table
from curation.data.tarindex import MemberReader, member_locations

#: the img2dataset fields of a sample's json, taken from its source json (download's, or the staging tar's)
SOURCE_FIELDS = ("url", "caption", "width", "height", "original_width", "original_height", "sha256")


def shard_name(i: int) -> str:
    return f"lvd-{i:06d}"


def sample_key(source: str, key: str) -> str:
    return key if source == "pool" else f"{source.split('/', 1)[1]}_{key}"


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def staged_sample(data: bytes, max_side: int, quality: int) -> tuple[bytes, dict]:
    """An as-is anchor image as download would store it: at most `max_side`, JPEG; with its img2dataset fields."""
    im, (ow, oh) = decode_image(data)
    small = resize_max_side(im, max_side)
    out = data if small is im and _is_jpeg(data) else encode_jpeg(small, quality)
    return out, {"url": None, "caption": None, "width": small.width, "height": small.height,
                 "original_width": ow, "original_height": oh, "sha256": hashlib.sha256(data).hexdigest()}


def shuffle_into_shards(sel: pa.Table, seed: int, samples_per_shard: int) -> pa.Table:
    """The selection (one row per image) shuffled with ``default_rng(seed)`` from (source, key) order and cut into
    shards of `samples_per_shard`: with columns ``shard``, ``position`` (in the shard) and ``sample_key``."""
    sel = sel.sort_by([("source", "ascending"), ("key", "ascending")])
    n = sel.num_rows
    sel = sel.take(pa.array(np.random.default_rng(seed).permutation(n), pa.int64()))
    rows = sel.select(["key", "source"]).to_pydict()
    spp = samples_per_shard
    plan = sel.append_column("shard", pa.array([shard_name(i // spp) for i in range(n)], pa.string()))
    plan = plan.append_column("position", pa.array(np.arange(n) % spp if n else [], pa.int64()))
    keys = [sample_key(s, k) for k, s in zip(rows["key"], rows["source"])]
    if len(set(keys)) != n:
        raise RuntimeError("shards: two selected images map to the same sample key")
    return plan.append_column("sample_key", pa.array(keys, pa.string()))


class ShardsStage(Stage):
    name = "shards"
    section = "shards"
    order = 80

    def plan(self) -> list[Unit]:
        clean_temporaries(self.layout.shards_meta)
        if not self.layout.shards_plan.exists():
            self._make_plan()
        shards = pq.read_table(self.layout.shards_plan, columns=["shard"])["shard"]
        names = sorted(set(shards.to_pylist()))
        return [Unit(n, {"shard": n}) for n in names]

    def _stage_as_is(self, set_name: str, keys: set[str]):
        """Copy an as-is anchor set's selected images into shards_meta/_staging/<set>.tar (once)."""
        acfg = next(a for a in self.image_sets["anchors"] if a.name == set_name)
        path = self.layout.shards_staging(set_name)
        if not path.exists():
            with TarShardWriter(path) as w:
                for s in iter_image_set(acfg.path, acfg.format):
                    if s.key in keys:
                        data, info = staged_sample(s.data, self.images.max_side, self.images.jpeg_quality)
                        w.write(s.key, {"jpg": data, "json": {"key": sample_key(f"anchors/{set_name}", s.key), **info}})
        return path

    def _make_plan(self) -> None:
        plan = shuffle_into_shards(read_table(self.layout.retrieve_selection, "selection"), self.seed,
                                   self.settings.samples_per_shard)
        rows = plan.select(["key", "source"]).to_pydict()
        loc = self._locations(rows["key"], rows["source"])
        cols: dict[str, list] = {c: [] for c in ("tar", "offset", "size", "json_offset", "json_size")}
        for k, s in zip(rows["key"], rows["source"]):
            where = loc.get(k) if s == "pool" else loc.get((s, k))
            if where is None:
                raise RuntimeError(f"shards: selected image {s}:{k} not found in its source shards")
            for c, v in zip(cols, where):
                cols[c].append(v)
        for c, v in cols.items():
            plan = plan.append_column(c, pa.array(v, pa.string() if c == "tar" else pa.int64()))
        write_table(self.layout.shards_plan, plan)

    def _locations(self, keys: list[str], sources: list[str]) -> dict:
        """Where each selected image is (:func:`curation.data.tarindex.member_locations`): pool images by key in the
        pool tars, images of an as-is anchor set by (source, key) in its staging tar (written here, once)."""
        loc: dict = member_locations(self.root, self.layout.pool_tars(self.name),
                                     {k for k, s in zip(keys, sources) if s == "pool"})
        for source in sorted(set(sources) - {"pool"}):
            mine = {k for k, s in zip(keys, sources) if s == source}
            staged = self._stage_as_is(source.split("/", 1)[1], mine)
            for k, v in member_locations(self.root, [staged], mine).items():
                loc[(source, k)] = v
        return loc

    def run_unit(self, unit: Unit) -> dict:
        plan = pq.read_table(self.layout.shards_plan, filters=[("shard", "=", unit.id)]).sort_by("position")
        rows = plan.to_pylist()
        write_table(self.layout.shards_index_part(unit.id), pa.table({
            "shard": pa.array([f"{unit.id}.tar"] * len(rows), pa.string()),
            "sample_key": pa.array([r["sample_key"] for r in rows], pa.string()),
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "source": pa.array([r["source"] for r in rows], pa.string()),
            "anchor_set": pa.array([r["anchor_set"] for r in rows], pa.string()),
        }), "shard_index")
        q = self.images.jpeg_quality
        transcoded = 0
        with MemberReader() as reader, TarShardWriter(self.layout.shard_tar(unit.id)) as w:
            for r in rows:
                data = reader.read(r["tar"], r["offset"], r["size"])
                if not _is_jpeg(data):
                    im, _ = decode_image(data)
                    data = encode_jpeg(im, q)
                    transcoded += 1
                source = json.loads(reader.read(r["tar"], r["json_offset"], r["json_size"])) \
                    if r["json_size"] >= 0 else {}
                meta = {f: source.get(f) for f in SOURCE_FIELDS}
                sim = r["similarity"]
                meta.update({"key": r["sample_key"], "url": r["url"] or meta["url"], "source": r["source"],
                             "anchor_set": r["anchor_set"], "anchor_key": r["anchor_key"], "rank": r["rank"],
                             "similarity": None if sim is None else round(float(sim), 6), "cluster": r["cluster"]})
                w.write(r["sample_key"], {"jpg": data, "txt": meta["caption"] or "",
                                          "json": json.dumps(meta, sort_keys=True)})
        return {"samples": len(rows), "transcoded": transcoded}

    def finalize(self) -> None:
        if self.layout.shards_index.exists() and self.layout.shards_manifest.exists():
            return
        parts = self.layout.shards_index_parts()
        index = read_tables(parts, "shard_index")
        write_table(self.layout.shards_index, index, "shard_index")
        counts = index.group_by("source").aggregate([("key", "count")]).to_pylist() if index.num_rows else []
        write_json(self.layout.shards_manifest, {
            "shards": len(parts), "samples": index.num_rows,
            "files": [f"{p.stem}.tar" for p in parts],
            "by_source": {c["source"]: c["key_count"] for c in counts},
            "samples_per_shard": self.settings.samples_per_shard, "seed": self.seed,
            "pattern": "lvd-{%06d..%06d}.tar" % (0, max(len(parts) - 1, 0)),
        })
