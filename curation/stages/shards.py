"""shards: the curated dataset, as shuffled WebDataset shards ``shards/lvd-NNNNNN.tar``.

Planning (in the driver, once; deterministic): the union of selections (``retrieve/selection.parquet``, one row per
image) is shuffled with ``numpy.random.default_rng(seed)`` and cut into shards of ``shards.samples_per_shard``.
Each image's location is resolved through tar member indexes (:mod:`curation.tarindex`): pool images from the pool
shards (``filter/`` or ``download/``), images of ``as_is`` anchor sets from a staging tar written once per set
(``shards/_staging/<set>.tar``: the set in any format, as WebDataset).  The plan is ``shards/_plan.parquet``.

One unit per output shard: read its images by offset, write ``<sample_key>.jpg`` (JPEG bytes copied as they are;
other formats re-encoded) and ``<sample_key>.json`` (key, url, source, anchor_set, anchor_key, rank, similarity,
cluster) with :class:`curation.storage.TarShardWriter` (atomic, deterministic bytes), after its rows of the shard
index (``shards/_index/``).  The sample key is the pool key, or ``<set>_<key>`` for an as-is anchor image.
``finalize`` writes ``shards/index.parquet`` and ``shards/manifest.json``.  Plain ``key.jpg`` / ``key.json`` pairs:
readable by the ``webdataset`` library and by our trainer.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.images import decode_image, encode_jpeg
from curation.samples import iter_image_set
from curation.stages.base import Stage, Unit
from curation.storage import TarShardWriter, read_table, read_tables, write_json, write_table
from curation.tarindex import MemberReader, image_locations, pool_image_locations


def shard_name(i: int) -> str:
    return f"lvd-{i:06d}"


def sample_key(source: str, key: str) -> str:
    return key if source == "pool" else f"{source.split('/', 1)[1]}_{key}"


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


class ShardsStage(Stage):
    name = "shards"

    @property
    def plan_path(self):
        return self.dir / "_plan.parquet"

    def plan(self) -> list[Unit]:
        if not self.plan_path.exists():
            self._make_plan()
        shards = pq.read_table(self.plan_path, columns=["shard"])["shard"]
        names = sorted(set(shards.to_pylist()))
        return [Unit(n, {"shard": n}) for n in names]

    def _stage_as_is(self, set_name: str, keys: set[str]):
        """Copy an as-is anchor set's selected images into shards/_staging/<set>.tar (once)."""
        acfg = next(a for a in self.cfg.retrieve.anchor_sets if a.name == set_name)
        path = self.dir / "_staging" / f"{set_name}.tar"
        if not path.exists():
            with TarShardWriter(path) as w:
                for s in iter_image_set(acfg.path, acfg.format):
                    if s.key in keys:
                        data = s.data
                        if not _is_jpeg(data):  # PNG/WebP... anchors: re-encoded once, here
                            data = encode_jpeg(decode_image(data)[0], self.cfg.shards.jpeg_quality)
                        w.write(s.key, {"jpg": data})
        return path

    def _make_plan(self) -> None:
        sel = read_table(self.root / "retrieve" / "selection.parquet", "selection")
        sel = sel.sort_by([("source", "ascending"), ("key", "ascending")])
        n = sel.num_rows
        perm = np.random.default_rng(self.cfg.seed).permutation(n)
        sel = sel.take(pa.array(perm, pa.int64()))
        rows = sel.to_pydict()
        pool_keys = {k for k, s in zip(rows["key"], rows["source"]) if s == "pool"}
        loc = pool_image_locations(self.root, pool_keys)
        for source in sorted(set(rows["source"]) - {"pool"}):
            set_name = source.split("/", 1)[1]
            keys = {k for k, s in zip(rows["key"], rows["source"]) if s == source}
            staged = self._stage_as_is(set_name, keys)
            for k, v in image_locations(self.root, [staged], keys).items():
                loc[(source, k)] = v
        tars, offsets, sizes = [], [], []
        for k, s in zip(rows["key"], rows["source"]):
            where = loc.get(k) if s == "pool" else loc.get((s, k))
            if where is None:
                raise RuntimeError(f"shards: selected image {s}:{k} not found in its source shards")
            tars.append(where[0])
            offsets.append(where[1])
            sizes.append(where[2])
        spp = self.cfg.shards.samples_per_shard
        plan = sel.append_column("shard", pa.array([shard_name(i // spp) for i in range(n)], pa.string()))
        plan = plan.append_column("position", pa.array(np.arange(n) % spp if n else [], pa.int64()))
        plan = plan.append_column("sample_key", pa.array([sample_key(s, k) for k, s in zip(rows["key"], rows["source"])],
                                                         pa.string()))
        plan = plan.append_column("tar", pa.array(tars, pa.string()))
        plan = plan.append_column("offset", pa.array(offsets, pa.int64()))
        plan = plan.append_column("size", pa.array(sizes, pa.int64()))
        if len(set(plan["sample_key"].to_pylist())) != n:
            raise RuntimeError("shards: two selected images map to the same sample key")
        write_table(self.plan_path, plan)

    def is_done(self, unit: Unit) -> bool:
        return (self.dir / f"{unit.id}.tar").exists()

    def run_unit(self, unit: Unit) -> dict:
        plan = pq.read_table(self.plan_path, filters=[("shard", "=", unit.id)]).sort_by("position")
        rows = plan.to_pylist()
        write_table(self.dir / "_index" / f"{unit.id}.parquet", pa.table({
            "shard": pa.array([f"{unit.id}.tar"] * len(rows), pa.string()),
            "sample_key": pa.array([r["sample_key"] for r in rows], pa.string()),
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "source": pa.array([r["source"] for r in rows], pa.string()),
            "anchor_set": pa.array([r["anchor_set"] for r in rows], pa.string()),
        }), "shard_index")
        q = self.cfg.shards.jpeg_quality
        transcoded = 0
        with MemberReader() as reader, TarShardWriter(self.dir / f"{unit.id}.tar") as w:
            for r in rows:
                data = reader.read(r["tar"], r["offset"], r["size"])
                if not _is_jpeg(data):
                    im, _ = decode_image(data)
                    data = encode_jpeg(im, q)
                    transcoded += 1
                sim = r["similarity"]
                meta = {"key": r["key"], "url": r["url"], "source": r["source"], "anchor_set": r["anchor_set"],
                        "anchor_key": r["anchor_key"], "rank": r["rank"],
                        "similarity": None if sim is None else round(float(sim), 6), "cluster": r["cluster"]}
                w.write(r["sample_key"], {"jpg": data, "json": json.dumps(meta, sort_keys=True)})
        return {"samples": len(rows), "transcoded": transcoded}

    def finalize(self) -> None:
        index_path = self.dir / "index.parquet"
        if index_path.exists() and (self.dir / "manifest.json").exists():
            return
        parts = sorted((self.dir / "_index").glob("lvd-*.parquet"))
        index = read_tables(parts, "shard_index")
        write_table(index_path, index, "shard_index")
        counts = index.group_by("source").aggregate([("key", "count")]).to_pylist() if index.num_rows else []
        write_json(self.dir / "manifest.json", {
            "shards": len(parts), "samples": index.num_rows,
            "by_source": {c["source"]: c["key_count"] for c in counts},
            "samples_per_shard": self.cfg.shards.samples_per_shard, "seed": self.cfg.seed,
            "pattern": "lvd-{%06d..%06d}.tar" % (0, max(len(parts) - 1, 0)),
        })
