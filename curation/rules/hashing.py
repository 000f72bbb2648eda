"""Perceptual hashes of images as packed bit codes, and the groups they form.

* :func:`thumbnail`: the grayscale ``side`` x ``side`` thumbnail every hash is computed from;
* PCA hash: :func:`fit_pca` (on a deterministic sample of standardised thumbnails), then :func:`pca_hashes`, the
  signs of the projections on the top components, packed to bytes; pHash: :func:`phash_codes` (imagehash);
* :func:`hamming`, :func:`near_pairs` (an exact FAISS binary range search) and :func:`hash_groups`: images with
  the same decoded pixels, or codes within a number of bits, joined into connected components.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from curation.engine.components import connected_components, first_of_equal

#: the metadata key of hash/groups.parquet naming the hash its codes are (pca or phash), for the dedup details
HASH_METHOD_KEY = "lvd.hash_method"

MULTIHASH_ABOVE = 200_000  # distinct hashes; above this the range search uses multi-index hashing


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between rows of two packed code arrays (uint8, one row per image)."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=1).sum(1)


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
