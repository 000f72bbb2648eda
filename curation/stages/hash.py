"""hash: exact duplicates (same decoded pixels) and near-exact duplicates (PCA hash, or pHash) as duplicate links.

The hash stage drops nothing: its groups become edges of the one duplicate graph the dedup stage labels, beside
the SSCD k-NN edges, so a chain original -> hash copy -> SSCD copy stays one component and the copy's verdict
(``exact_duplicate``, ``near_duplicate``, ``copy_duplicate`` or ``eval_contamination``) is decided there.

Per unit (a pool shard the stage receives, same id: :meth:`Stage.input_shards`): decode every image it receives
(:meth:`Stage.input_rows`, from the shard's pool tar), and write ``hash/part-NNNNN.parquet`` (schema
``hashes``): key, ``pixel_sha256`` (:func:`curation.data.images.pixel_sha256`), width, height, a grayscale
``thumb_side`` x ``thumb_side`` thumbnail (area-averaged, uint8), the size before download's resize, and the
measurements of dedup's survivor rule (:func:`curation.rules.survivor.measurements`): ``border_fill`` (uniform edge fill,
any colour), ``jpeg_quality`` (from the quantisation tables), ``bytes_per_pixel``, ``sharpness`` and a grayscale
``canvas`` of at most 64 px per side for the containment test.

``finalize`` (global, idempotent: skipped when ``hash/groups.parquet`` exists):

1. **Hash codes**.  ``method: pca``: each thumbnail is standardised (its own mean removed, scaled to unit norm, so
   a brightness or contrast change does not move it), a PCA is fitted on a deterministic sample of
   ``hash.pca_sample`` thumbnails (SVD of the mean-centred sample; ``hash/pca.npz`` holds mean and components), and
   each image's hash is the sign of its projection on the top ``hash.bits`` components, packed to bytes.
   ``method: phash``: imagehash's 64-bit pHash of the thumbnail.
2. **Groups**: images with the same ``pixel_sha256`` (exact), and images whose hashes are within
   ``hash.hamming_threshold`` bits (a FAISS binary range search over the distinct hashes: ``IndexBinaryFlat``, or
   ``IndexBinaryMultiHash`` with threshold + 1 tables for large sets, which is exact by the pigeonhole principle),
   are joined in a graph whose connected components are the hash groups (:mod:`curation.engine.components`).
   ``hash/groups.parquet`` (schema ``hash_groups``) records every image's code and group.

The hash codes and the grouping are pure functions (:mod:`curation.rules.hashing`, :func:`group_images`); the stage
reads, calls them, and writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from curation.config import HashConfig
from curation.rules.hashing import HASH_METHOD_KEY, fit_pca, hash_groups, pca_hashes, phash_codes, thumbnail
from curation.data.images import decode_image, pixel_sha256
from curation.data.samples import Sample, iter_shard_samples
from curation.stages.base import Stage, Unit
from curation.pipeline.storage import atomic_path, read_tables, write_table
from curation.rules.survivor import edge_fill, measurements
from schemas.tables import HASHES

def border_fill(im: Image.Image, side: int = 128) -> float:
    """Fraction of the image that is uniform fill reached straight from its edges, any colour (a border, letterbox
    padding, the corners of a rotated copy on a larger canvas): :func:`curation.rules.survivor.edge_fill`."""
    return edge_fill(im, side)


@dataclass
class Grouping:
    """The hash stage's grouping of n images."""

    codes: np.ndarray  # (n, code bytes) uint8: each image's packed hash code
    labels: np.ndarray  # (n,) int64: each image's group, the smallest index of its members
    sizes: np.ndarray  # (n,) int64: the size of each image's group
    pca: dict[str, np.ndarray] | None  # the fitted PCA (method pca, at least one image), else None


def group_images(pixel_sha256: list[str], thumbs: np.ndarray, settings: HashConfig, seed: int) -> Grouping:
    """Hash codes of the images' thumbnails (n, thumb_side**2, uint8) by ``settings.method``, and their groups:
    the same pixels, or codes within ``settings.hamming_threshold`` bits."""
    n = len(pixel_sha256)
    pca = None
    if n == 0:
        codes = np.zeros((0, max(1, settings.bits // 8) if settings.method == "pca" else 8), np.uint8)
    elif settings.method == "pca":
        pca = fit_pca(thumbs, settings.bits, settings.pca_sample, seed)
        codes = pca_hashes(thumbs, pca)
    else:
        codes = phash_codes(thumbs, settings.thumb_side)
    labels = hash_groups(pixel_sha256, codes, settings.hamming_threshold)
    sizes = np.bincount(labels, minlength=n)[labels] if n else np.zeros(0, np.int64)
    return Grouping(codes, labels, sizes, pca)


class HashStage(Stage):
    name = "hash"
    section = "hash"
    order = 30
    per_shard = True

    def plan(self) -> list[Unit]:
        return [Unit(shard) for shard in self.input_shards()]

    def run_unit(self, unit: Unit) -> dict:
        keys = set(self.input_rows(unit.id)["key"].to_pylist())
        tar = self.input_tar(unit.id)
        rows = [self._hash_row(s) for s in iter_shard_samples(tar, keys)]
        if len(rows) != len(keys):
            missing = sorted(keys - {r["key"] for r in rows})[:5]
            raise RuntimeError(f"hash unit {unit.id}: {len(keys) - len(rows)} input keys missing from {tar}, "
                               f"e.g. {missing}")
        table = pa.Table.from_pylist(rows, schema=pa.schema([(f.name, f.type) for f in HASHES])).sort_by("key")
        write_table(self.layout.hash_part(unit.id), table, "hashes")
        return {"hashed": table.num_rows}

    def _hash_row(self, sample: Sample) -> dict:
        """One image's row of ``hash/part-<shard>.parquet``."""
        im, _ = decode_image(sample.data, self.images.max_image_pixels, drop_animated=False)
        return {"key": sample.key, "pixel_sha256": pixel_sha256(im), "width": im.width, "height": im.height,
                "thumb": thumbnail(im, self.settings.thumb_side).tobytes(), **measurements(im, sample.data),
                "original_width": sample.meta.get("original_width"),
                "original_height": sample.meta.get("original_height")}

    # -- global grouping -----------------------------------------------------------------------------------------
    def finalize(self) -> None:
        if self.layout.hash_groups.exists():
            return
        t = read_tables(self.layout.hash_parts(), "hashes").sort_by("key")
        if t["key"].to_pylist() != self.input_keys()["key"].to_pylist():
            raise RuntimeError("hash: the hashed keys differ from the keys the stage received (incomplete units?)")
        side = self.settings.thumb_side
        thumbs = np.frombuffer(b"".join(t["thumb"].to_pylist()), np.uint8).reshape(t.num_rows, side * side)
        sha = t["pixel_sha256"].to_pylist()
        g = group_images(sha, thumbs, self.settings, self.seed)
        if g.pca is not None:
            with atomic_path(self.layout.hash_pca) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, mean=g.pca["mean"], components=g.pca["components"], thumb_side=side)
        groups = pa.table({
            "key": t["key"],
            "pixel_sha256": t["pixel_sha256"],
            "hash": pa.array([c.tobytes() for c in g.codes], pa.binary()),
            "group": pa.array(g.labels.astype(np.int64)),
            "group_size": pa.array(g.sizes.astype(np.int64)),
        })
        write_table(self.layout.hash_groups, groups, "hash_groups", metadata={HASH_METHOD_KEY: self.settings.method})
        print(f"[hash] {t.num_rows} images in {len(np.unique(g.labels))} hash groups ({t.num_rows - len(set(sha))} "
              "same-pixel copies); the dedup stage judges them with the SSCD neighbours", flush=True)
