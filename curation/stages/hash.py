"""hash: exact duplicates (same decoded pixels) and near-exact duplicates (PCA hash, or pHash) as duplicate links.

The hash stage drops nothing: its groups become edges of the one duplicate graph the dedup stage labels, beside
the SSCD k-NN edges, so a chain original -> hash copy -> SSCD copy stays one component and the copy's verdict
(``exact_duplicate``, ``near_duplicate``, ``copy_duplicate`` or ``eval_contamination``) is decided there.

Per unit (a filter shard, same id): decode every kept image, and write ``hash/part-NNNNN.parquet`` (schema
``hashes``): key, ``pixel_sha256`` (:func:`curation.images.pixel_sha256`), width, height, a grayscale
``thumb_side`` x ``thumb_side`` thumbnail (area-averaged, uint8), ``border_fill`` (:func:`border_fill`, used by
dedup's survivor rule) and the size before download's resize.

``finalize`` (global, idempotent: skipped when ``hash/groups.parquet`` exists):

1. **Hash codes**.  ``method: pca``: each thumbnail is standardised (its own mean removed, scaled to unit norm, so
   a brightness or contrast change does not move it), a PCA is fitted on a deterministic sample of
   ``hash.pca_sample`` thumbnails (SVD of the mean-centred sample; ``hash/pca.npz`` holds mean and components), and
   each image's hash is the sign of its projection on the top ``hash.bits`` components, packed to bytes.
   ``method: phash``: imagehash's 64-bit pHash of the thumbnail.
2. **Groups**: images with the same ``pixel_sha256`` (exact), and images whose hashes are within
   ``hash.hamming_threshold`` bits (a FAISS binary range search over the distinct hashes: ``IndexBinaryFlat``, or
   ``IndexBinaryMultiHash`` with threshold + 1 tables for large sets, which is exact by the pigeonhole principle),
   are joined in a graph whose connected components are the hash groups (:mod:`curation.components`).
   ``hash/groups.parquet`` (schema ``hash_groups``) records every image's code and group.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation import accounting
from curation.components import connected_components, first_of_equal
from curation.images import decode_image, pixel_sha256
from curation.samples import iter_shard_samples
from curation.stages.base import Stage, Unit
from curation.storage import atomic_path, read_tables, write_table
from schemas.tables import HASHES

MULTIHASH_ABOVE = 200_000  # distinct hashes; above this the range search uses multi-index hashing


def thumbnail(im: Image.Image, side: int) -> np.ndarray:
    """Grayscale side x side thumbnail (area average), uint8."""
    return np.asarray(im.convert("L").resize((side, side), Image.Resampling.BOX), dtype=np.uint8)


FILL_TOLERANCE = 10  # max per-channel difference from the fill colour (JPEG noise on a flat band is a few levels)
FILL_LEVELS = 24  # black fill: every channel <= this; white fill: every channel >= 255 - this


def border_fill(im: Image.Image, side: int = 128, tol: int = FILL_TOLERANCE) -> float:
    """Fraction of the image that is black or white fill reached straight from its edges: a border, letterbox
    padding, or the corners of a rotated copy on a larger canvas.

    The fill colour is the median colour of the outermost pixel ring; it counts only when black or white (within
    :data:`FILL_LEVELS`), what padding, letterboxing and rotation leave and what transparency becomes: a coloured
    flat background is content, and a crop that trims some of it must not look like its source.  A pixel is fill
    when every channel is within `tol` of that colour and an unbroken run of fill pixels joins it to the edge along
    its row or column.  Measured on a copy of at most `side` px per side (area average)."""
    w, h = im.size
    scale = min(1.0, side / max(w, h))
    if scale < 1.0:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    a = np.asarray(im.convert("RGB"), dtype=np.int16)
    h, w = a.shape[:2]
    ring = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    fill = np.median(ring, axis=0)
    if not ((fill <= FILL_LEVELS).all() or (fill >= 255 - FILL_LEVELS).all()):
        return 0.0
    is_fill = (np.abs(a - fill).max(axis=2) <= tol)
    if not is_fill.any():
        return 0.0

    def run(m: np.ndarray) -> np.ndarray:  # per row: length of the leading run of True
        return np.where(m.all(1), m.shape[1], np.argmin(m, axis=1))

    left, right = run(is_fill), run(is_fill[:, ::-1])
    top, bottom = run(is_fill.T), run(is_fill[::-1].T)
    cols, rows = np.arange(w)[None, :], np.arange(h)[:, None]
    mask = ((cols < left[:, None]) | (cols >= w - right[:, None]) | (rows < top[None, :])
            | (rows >= h - bottom[None, :]))
    return float(mask.mean())


def standardise(thumbs: np.ndarray) -> np.ndarray:
    """Rows as float32, each with its own mean removed and scaled to unit norm (flat images stay zero)."""
    x = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    x -= x.mean(1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-6)


def fit_pca(thumbs: np.ndarray, bits: int, sample: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Mean and top-`bits` principal directions of a deterministic sample of standardised thumbnails.

    When fewer than `bits` directions exist (tiny sets), the missing rows are zero: their bit is always 0."""
    n = len(thumbs)
    idx = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    x = standardise(thumbs[idx])
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = np.zeros((bits, x.shape[1]), np.float32)
    m = min(bits, vt.shape[0])
    comps[:m] = vt[:m]
    # a deterministic sign per component (SVD's sign is arbitrary): the largest-magnitude entry is positive
    sign = np.sign(comps[np.arange(bits), np.abs(comps).argmax(1)])
    comps *= np.where(sign == 0, 1, sign)[:, None]
    return {"mean": mean.astype(np.float32), "components": comps}


def pca_hashes(thumbs: np.ndarray, pca: dict[str, np.ndarray]) -> np.ndarray:
    """Packed sign bits (n, bits/8) of the projections on the PCA components."""
    x = standardise(thumbs) - pca["mean"]
    proj = x @ pca["components"].T
    return np.packbits(proj > 0, axis=1)


def near_pairs(codes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, distance), i < j, of packed binary codes within `threshold` bits, by exact range search.

    Identical codes are collapsed first (they are joined through their shared distinct code)."""
    n, nbytes = codes.shape
    uniq, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    # identical codes: chain each image to the first image with that code
    order = np.argsort(inverse, kind="stable")
    first_of = np.full(len(uniq), -1, np.int64)
    first_of[inverse[order[::-1]]] = order[::-1]
    same_i = first_of[inverse]
    m = same_i != np.arange(n)
    src, dst, dist = [same_i[m]], [np.flatnonzero(m)], [np.zeros(m.sum(), np.int64)]
    if threshold > 0 and len(uniq) > 1:
        import faiss

        d = nbytes * 8
        if len(uniq) > MULTIHASH_ABOVE and threshold + 1 <= d:
            index = faiss.IndexBinaryMultiHash(d, threshold + 1, d // (threshold + 1))
        else:
            index = faiss.IndexBinaryFlat(d)
        index.add(np.ascontiguousarray(uniq))
        lims, D, I = index.range_search(np.ascontiguousarray(uniq), threshold + 1)  # faiss: distance < radius
        qi = np.repeat(np.arange(len(uniq)), np.diff(lims.astype(np.int64)))
        keep = qi < I
        a, b = first_of[qi[keep]], first_of[I[keep]]
        src.append(a)
        dst.append(b)
        dist.append(D[keep].astype(np.int64))
    return np.concatenate(src), np.concatenate(dst), np.concatenate(dist)


class HashStage(Stage):
    name = "hash"

    def plan(self) -> list[Unit]:
        return [Unit(p.stem) for p in sorted(accounting.ledger_dir(self.root, "filter").glob("[0-9]*.parquet"))
                if (self.root / "filter" / f"{p.stem}.tar").exists()]

    def part_path(self, unit_id: str):
        return self.dir / f"part-{unit_id}.parquet"

    def is_done(self, unit: Unit) -> bool:
        return self.part_path(unit.id).exists()

    def run_unit(self, unit: Unit) -> dict:
        hc = self.cfg.hash
        prev = pq.read_table(accounting.ledger_path(self.root, "filter", unit.id), columns=["key", "kept"])
        keys = {k for k, kept in zip(prev["key"].to_pylist(), prev["kept"].to_pylist()) if kept}
        rows = {"key": [], "pixel_sha256": [], "width": [], "height": [], "thumb": [], "border_fill": [],
                "original_width": [], "original_height": []}
        for s in iter_shard_samples(self.root / "filter" / f"{unit.id}.tar", keys):
            im, _ = decode_image(s.data, self.cfg.images.max_image_pixels, drop_animated=False)
            rows["key"].append(s.key)
            rows["pixel_sha256"].append(pixel_sha256(im))
            rows["width"].append(im.width)
            rows["height"].append(im.height)
            rows["thumb"].append(thumbnail(im, hc.thumb_side).tobytes())
            rows["border_fill"].append(border_fill(im))
            rows["original_width"].append(s.meta.get("original_width"))
            rows["original_height"].append(s.meta.get("original_height"))
        if len(rows["key"]) != len(keys):
            missing = sorted(keys - set(rows["key"]))[:5]
            raise RuntimeError(f"hash unit {unit.id}: {len(keys) - len(rows['key'])} kept keys missing from the "
                               f"filter shard, e.g. {missing}")
        table = pa.table(rows, schema=pa.schema([(f.name, f.type) for f in HASHES])).sort_by("key")
        write_table(self.part_path(unit.id), table, "hashes")
        return {"hashed": table.num_rows}

    # -- global grouping -----------------------------------------------------------------------------------------
    def groups_path(self):
        return self.dir / "groups.parquet"

    def finalize(self) -> None:
        if self.groups_path().exists():
            return
        hc = self.cfg.hash
        t = read_tables(sorted(self.dir.glob("part-*.parquet")), "hashes").sort_by("key")
        inputs = accounting.kept_keys(self.root, accounting.previous_ledger_stage(self.name))
        if t["key"].to_pylist() != inputs["key"].to_pylist():
            raise RuntimeError("hash: the hashed keys differ from the keys the filter kept (incomplete units?)")
        n = t.num_rows
        side = hc.thumb_side
        thumbs = np.frombuffer(b"".join(t["thumb"].to_pylist()), np.uint8).reshape(n, side * side)
        if n == 0:
            codes = np.zeros((0, max(1, hc.bits // 8) if hc.method == "pca" else 8), np.uint8)
        elif hc.method == "pca":
            pca = fit_pca(thumbs, hc.bits, hc.pca_sample, self.cfg.seed)
            with atomic_path(self.dir / "pca.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, mean=pca["mean"], components=pca["components"], thumb_side=side)
            codes = pca_hashes(thumbs, pca)
        else:
            codes = phash_codes(thumbs, side)
        labels = hash_groups(t["pixel_sha256"].to_pylist(), codes, hc.hamming_threshold)
        sizes = np.bincount(labels, minlength=n)[labels] if n else np.zeros(0, np.int64)
        groups = pa.table({
            "key": t["key"],
            "pixel_sha256": t["pixel_sha256"],
            "hash": pa.array([c.tobytes() for c in codes], pa.binary()),
            "group": pa.array(labels.astype(np.int64)),
            "group_size": pa.array(sizes.astype(np.int64)),
        })
        write_table(self.groups_path(), groups, "hash_groups")
        exact = n - len(set(t["pixel_sha256"].to_pylist()))
        print(f"[hash] {n} images in {len(np.unique(labels))} hash groups ({exact} same-pixel copies); the dedup "
              f"stage judges them with the SSCD neighbours", flush=True)


def hash_groups(pixel_sha256: list[str], codes: np.ndarray, threshold: int) -> np.ndarray:
    """Group label per image (smallest member index): same pixels, or hash codes within `threshold` bits."""
    n = len(pixel_sha256)
    if n == 0:
        return np.zeros(0, np.int64)
    same = first_of_equal(np.asarray(pixel_sha256, dtype=str))  # exact duplicates: linked to the first twin
    nsrc, ndst, _ = near_pairs(codes, threshold)
    return connected_components(n, np.concatenate([same, nsrc]), np.concatenate([np.arange(n), ndst]))


def phash_codes(thumbs: np.ndarray, side: int) -> np.ndarray:
    """imagehash's 64-bit pHash of each side x side grayscale thumbnail, packed (n, 8)."""
    import imagehash

    hexes = [str(imagehash.phash(Image.fromarray(t.reshape(side, side), "L"))) for t in thumbs]
    return np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in hexes])
