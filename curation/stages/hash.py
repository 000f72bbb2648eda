"""hash: exact duplicates (same decoded pixels) and near-exact duplicates (PCA hash, or pHash).

Per unit (a filter shard, same id): decode every kept image, and write ``hash/part-NNNNN.parquet`` (schema
``hashes``): key, ``pixel_sha256`` (:func:`curation.images.pixel_sha256`), width, height, a grayscale
``thumb_side`` x ``thumb_side`` thumbnail (area-averaged, uint8), and the pHash (``hash.method: phash``).

``finalize`` (global, idempotent: skipped when the ledger unit ``final`` exists):

1. **PCA hash** (``method: pca``): each thumbnail is standardised (its own mean removed, scaled to unit norm, so a
   brightness or contrast change does not move it), a PCA is fitted on a deterministic sample of
   ``hash.pca_sample`` thumbnails (SVD of the mean-centred sample; ``hash/pca.npz`` holds mean and components), and
   each image's hash is the sign of its projection on the top ``hash.bits`` components, packed to bytes.
2. **Groups**: images with the same ``pixel_sha256`` (exact), and images whose hashes are within
   ``hash.hamming_threshold`` bits (a FAISS binary range search over the distinct hashes: ``IndexBinaryFlat``, or
   ``IndexBinaryMultiHash`` with threshold + 1 tables for large sets, which is exact by the pigeonhole principle),
   are joined in a graph whose connected components are the duplicate groups (:mod:`curation.components`).
3. One image per group is kept: the largest resolution (width x height before download's resize, from the
   sample json, else as stored), then the smallest key.  The others are
   dropped as ``exact_duplicate`` (same pixels as the kept image) or ``near_duplicate``, with ``detail`` naming the
   kept key.  ``hash/groups.parquet`` (schema ``hash_groups``) records every image's group, and the ledger unit
   ``final`` gets one row per key the filter kept.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation import accounting
from curation.components import connected_components, pick_one_per_component
from curation.images import decode_image, pixel_sha256
from curation.samples import iter_shard_samples
from curation.stages.base import Stage, Unit
from curation.storage import atomic_path, read_tables, write_table

FINAL = "final"
MULTIHASH_ABOVE = 200_000  # distinct hashes; above this the range search uses multi-index hashing


def thumbnail(im: Image.Image, side: int) -> np.ndarray:
    """Grayscale side x side thumbnail (area average), uint8."""
    return np.asarray(im.convert("L").resize((side, side), Image.Resampling.BOX), dtype=np.uint8)


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


def phash_bits(hex_hashes) -> np.ndarray:
    return np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in hex_hashes])


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


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.bitwise_xor(a, b), axis=1).sum(1)


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
        rows = {"key": [], "pixel_sha256": [], "width": [], "height": [], "thumb": [], "pca_hash": [], "phash": [],
                "original_width": [], "original_height": []}
        if hc.method == "phash":
            import imagehash
        for s in iter_shard_samples(self.root / "filter" / f"{unit.id}.tar", keys):
            im, _ = decode_image(s.data, self.cfg.filter.max_image_pixels, drop_animated=False)
            rows["key"].append(s.key)
            rows["pixel_sha256"].append(pixel_sha256(im))
            rows["width"].append(im.width)
            rows["height"].append(im.height)
            rows["thumb"].append(thumbnail(im, hc.thumb_side).tobytes())
            rows["pca_hash"].append(None)
            rows["phash"].append(str(imagehash.phash(im)) if hc.method == "phash" else None)
            rows["original_width"].append(s.meta.get("original_width"))
            rows["original_height"].append(s.meta.get("original_height"))
        if len(rows["key"]) != len(keys):
            missing = sorted(keys - set(rows["key"]))[:5]
            raise RuntimeError(f"hash unit {unit.id}: {len(keys) - len(rows['key'])} kept keys missing from the "
                               f"filter shard, e.g. {missing}")
        table = pa.table(rows).sort_by("key")
        write_table(self.part_path(unit.id), table, "hashes")
        return {"hashed": table.num_rows}

    # -- global grouping -----------------------------------------------------------------------------------------
    def finalize(self) -> None:
        if accounting.ledger_path(self.root, self.name, FINAL).exists():
            return
        hc = self.cfg.hash
        t = read_tables(sorted(self.dir.glob("part-*.parquet")), "hashes").sort_by("key")
        inputs = accounting.kept_keys(self.root, accounting.previous_ledger_stage(self.name))
        if t["key"].to_pylist() != inputs["key"].to_pylist():
            raise RuntimeError("hash: the hashed keys differ from the keys the filter kept (incomplete units?)")
        keys = np.array(t["key"].to_pylist(), dtype=object)
        n = len(keys)
        if n == 0:
            codes = np.zeros((0, max(1, hc.bits // 8)), np.uint8)
        elif hc.method == "pca":
            side = hc.thumb_side
            thumbs = np.frombuffer(b"".join(t["thumb"].to_pylist()), np.uint8).reshape(n, side * side)
            pca = fit_pca(thumbs, hc.bits, hc.pca_sample, self.cfg.seed)
            with atomic_path(self.dir / "pca.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, mean=pca["mean"], components=pca["components"], thumb_side=side)
            codes = pca_hashes(thumbs, pca)
        else:
            codes = phash_bits(t["phash"].to_pylist())
        sha = np.array(t["pixel_sha256"].to_pylist(), dtype=object)
        # exact duplicates: chain each image to the first with the same pixel hash
        _, sha_inv = np.unique(sha.astype(str), return_inverse=True) if n else (None, np.zeros(0, np.int64))
        sha_inv = sha_inv.ravel()
        first = np.full(sha_inv.max() + 1 if n else 0, n, np.int64)
        np.minimum.at(first, sha_inv, np.arange(n))
        ex_src, ex_dst = first[sha_inv], np.arange(n)
        nsrc, ndst, _ = near_pairs(codes, hc.hamming_threshold) if n else (np.zeros(0, int),) * 3
        labels = connected_components(n, np.concatenate([ex_src, nsrc]), np.concatenate([ex_dst, ndst]))
        # resolution: the size before download's resize when known (a 0.7x copy and its original can both arrive
        # at max_side and differ by a rounding pixel), else the stored size
        ow = np.array(t["original_width"].fill_null(0), np.int64)
        oh = np.array(t["original_height"].fill_null(0), np.int64)
        res = np.where(ow * oh > 0, ow * oh, np.array(t["width"], np.int64) * np.array(t["height"], np.int64))
        # priority: larger resolution first; keys are sorted, so the index breaks ties by smallest key
        keep = pick_one_per_component(labels, -res)
        sizes = np.bincount(labels, minlength=n)[labels] if n else np.zeros(0, np.int64)
        rep = np.full(n, -1, np.int64)
        rep[labels[keep]] = np.flatnonzero(keep)
        kept_idx = rep[labels]
        dist = _hamming(codes, codes[kept_idx]) if n else np.zeros(0, np.int64)
        reasons, details = [], []
        for i in range(n):
            if keep[i]:
                reasons.append(None)
                details.append(None)
            elif sha[i] == sha[kept_idx[i]]:
                reasons.append("exact_duplicate")
                details.append(f"duplicate of {keys[kept_idx[i]]} (same pixels)")
            else:
                reasons.append("near_duplicate")
                details.append(f"duplicate of {keys[kept_idx[i]]} ({hc.method} hash Hamming distance {dist[i]})")
        groups = pa.table({
            "key": pa.array(keys.tolist(), pa.string()),
            "pixel_sha256": t["pixel_sha256"],
            "hash": pa.array([c.tobytes() for c in codes], pa.binary()),
            "group": pa.array(labels.astype(np.int64)),
            "group_size": pa.array(sizes.astype(np.int64)),
            "kept": pa.array(keep),
            "kept_key": pa.array(keys[kept_idx].tolist() if n else [], pa.string()),
            "hamming_to_kept": pa.array(dist.astype(np.int32)),
            "reason": pa.array(reasons, pa.string()),
        })
        write_table(self.dir / "groups.parquet", groups, "hash_groups")
        url = dict(zip(inputs["key"].to_pylist(), inputs["url"].to_pylist()))
        ledger = accounting.make_ledger(self.name, keys.tolist(), [url[k] for k in keys], reasons, details)
        accounting.write_ledger(self.root, self.name, FINAL, ledger)
        n_drop = sum(r is not None for r in reasons)
        print(f"[hash] {n} images, {n - n_drop} kept, {reasons.count('exact_duplicate')} exact and "
              f"{reasons.count('near_duplicate')} near duplicates dropped", flush=True)
