"""The survivor of a copy group: which member of a duplicate component the dedup stage keeps.

The hash stage measures every image (:func:`edge_fill`, :func:`canvas`, :func:`encoding`); the dedup stage reads
those measurements (:func:`read_hash_info`) and sorts each component's members by :func:`survivor_priority`.

``original`` (the default ``dedup.survivor``) prefers the source of the edits, by in turn:

1. **not derived** (:func:`derived_members`, :func:`holds`): within a component, a member whose small grayscale
   canvas holds another member as a sub-image (normalised cross-correlation of the other's canvas, searched over
   scales and positions) is either a canvas copy of it - a screenshot (the other under half its width) or a
   border or padding (more edge fill), the rest of its canvas low-detail - or its source, of which the other is a
   crop (no added fill: a rotated copy of a smooth photograph can match its source, its corners give it away).
   The canvas copy, or the crop, is *derived* and sorts after every member that is not; two members that each
   hold the other (the same framing) are neither;
2. the least **edge fill** (:func:`edge_fill`: uniform area joined to the edges, any colour), in
   steps of :data:`FILL_STEP` above the component's least (:func:`fill_steps`): a border, letterbox or the
   corners of a rotation add fill, so a copy never has less
   than its source;
3. the largest **resolution** (size before download's resize): a source before its downscaled copies;
4. the best **JPEG quality** estimated from the quantisation tables, in steps of :data:`QUALITY_STEP` (a
   quality-30 re-encode after its quality-90 original; files that are not JPEG count as 100);
5. the SSCD **medoid** (:func:`medoid_scores`): among same-size edits (colour, text, flip) the one the others were
   made from - edits of one source are each close to it and less close to each other; then the smallest key.

The download stage re-encodes every image at ``images.jpeg_quality``, so in a downloaded pool the tables tie; they
decide where the stored bytes are the source's own.  The hash stage also records bytes per pixel and sharpness
(variance of the Laplacian), but they do not decide: measured on the demo corpus after download's re-encode, colour
and low-quality JPEG copies carry *more* bytes per pixel than their originals (encoding the copy's artefacts
costs bytes) and blocking raises the Laplacian's variance.

``resolution`` is the plain rule: largest resolution, then smallest key (it keeps a bordered, padded or rotated
copy over its source).  No rule can tell an upscaled copy from its source by pixels alone: both keep the larger.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.rules.hashing import HASH_METHOD_KEY
from curation.pipeline.layout import RunLayout
from curation.pipeline.storage import read_table

FILL_STEP = 0.1  # edge-fill differences below one step (JPEG noise, natural flat edges) do not decide
QUALITY_STEP = 10  # JPEG quality differences below one step (re-saves at close settings) do not decide
FILL_TOLERANCE = 10  # max per-channel difference from the fill colour (JPEG noise on a flat band is a few levels)
CANVAS_SIDE = 64  # the longer side of the grayscale canvas the containment test matches on
MATCH_NCC = 0.92  # cross-correlation above which the smaller canvas is a sub-image (rotated copies: 0.67-0.97)
FLAT_MARGIN = 0.35  # margin detail / matched-area detail below which the rest of a canvas is low-detail
SCREENSHOT_SHARE = 0.5  # a source under this share of a canvas's width on a low-detail rest: a screenshot
FLAT_DETAIL = 2.0  # or median gray step (canvas px) below which it is low-detail whatever the matched part holds
MIN_TEMPLATE = 8  # the smallest template side (canvas px) the containment test tries
SCALES = np.geomspace(0.15, 0.9, 26)  # template width as a share of the larger canvas's width


# --------------------------------------------------------------------------------------------- measurements
def _small(im: Image.Image, side: int) -> Image.Image:
    w, h = im.size
    scale = min(1.0, side / max(w, h))
    if scale < 1.0:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    return im


def edge_fill(im: Image.Image, side: int = 128, tol: int = FILL_TOLERANCE) -> float:
    """Fraction of the image that is uniform fill reached straight from its edges, in any colour: a border,
    letterbox padding, the corners of a rotated copy on a larger canvas, a flat canvas.

    The fill colour is the median colour of the outermost pixel ring, whatever it is; a pixel is fill when every
    channel is within `tol` of it and an unbroken run of fill pixels joins it to the edge along its row or column.
    Measured on a copy of at most `side` px per side (area average).  Fill of one colour is additive: a canvas
    added around a source whose own edges are flat in a close colour continues its fill, so the copy measures at
    least its source's fill plus the canvas.  (Counting low-detail texture as fill too breaks that: a rotated
    copy's edge line cuts the source's smooth areas off from its corners.  Low-detail canvases - a screenshot's
    interface - are the containment test's.)"""
    a = np.asarray(_small(im, side).convert("RGB"), dtype=np.int16)
    h, w = a.shape[:2]
    if h < 1 or w < 1:
        return 0.0
    ring = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    flat = np.abs(a - np.median(ring, axis=0)).max(axis=2) <= tol

    def run(m: np.ndarray) -> np.ndarray:  # per row: length of the leading run of True
        return np.where(m.all(1), m.shape[1], np.argmin(m, axis=1))

    left, right = run(flat), run(flat[:, ::-1])
    top, bottom = run(flat.T), run(flat[::-1].T)
    cols, rows = np.arange(w)[None, :], np.arange(h)[:, None]
    mask = ((cols < left[:, None]) | (cols >= w - right[:, None]) | (rows < top[None, :])
            | (rows >= h - bottom[None, :]))
    return float(mask.mean())


def canvas(im: Image.Image, side: int = CANVAS_SIDE) -> np.ndarray:
    """The grayscale canvas of the containment test: at most `side` px on the longer side, aspect kept, uint8."""
    return np.asarray(_small(im, side).convert("L"), dtype=np.uint8)


def jpeg_quality(data: bytes) -> int | None:
    """The IJG quality (1-100) whose scaled standard luminance table is closest to the file's first quantisation
    table, or None when the bytes are not a JPEG."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            tables = getattr(im, "quantization", None) if im.format == "JPEG" else None
    except Exception:
        return None
    if not tables:
        return None
    q = np.asarray(tables[min(tables)], np.float64)
    if q.size != 64:
        return None
    q = np.sort(q)  # the zigzag order of the stored table does not matter for the comparison
    best, err = 100, np.inf
    for quality in range(1, 101):
        scale = 5000 / quality if quality < 50 else 200 - 2 * quality
        std = np.sort(np.clip(np.floor((_STD_LUMA * scale + 50) / 100), 1, 255))
        e = np.abs(std - q).sum()
        if e < err:
            best, err = quality, e
    return best


_STD_LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                      14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
                      92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float64)
"""The JPEG standard's (Annex K) luminance quantisation table, which the IJG quality setting scales."""


def sharpness(im: Image.Image, side: int = 512) -> float:
    """Variance of the 4-neighbour Laplacian of the grayscale image (at most `side` px per side): blur and heavy
    compression lower it."""
    g = np.asarray(_small(im, side).convert("L"), dtype=np.float64)
    if min(g.shape) < 3:
        return 0.0
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def measurements(im: Image.Image, data: bytes) -> dict:
    """The hash stage's per-image measurements for the survivor rule (columns of the ``hashes`` schema)."""
    c = canvas(im)
    return {"border_fill": edge_fill(im), "jpeg_quality": jpeg_quality(data),
            "bytes_per_pixel": len(data) / max(1, im.width * im.height), "sharpness": sharpness(im),
            "canvas": c.tobytes(), "canvas_width": c.shape[1], "canvas_height": c.shape[0]}


# ------------------------------------------------------------------------------------------------- containment
def _ncc_at(B: np.ndarray, small: np.ndarray, tw: int, th: int) -> tuple[float, tuple[int, int, int, int] | None]:
    """Best normalised cross-correlation of `small` resized to tw x th over every placement inside `B`."""
    from scipy.signal import fftconvolve

    H, W = B.shape
    if tw < MIN_TEMPLATE or th < MIN_TEMPLATE or tw > W or th > H or (tw >= W and th >= H):
        return -1.0, None
    t = np.asarray(Image.fromarray(small).resize((tw, th), Image.Resampling.BOX), np.float64)
    t = t - t.mean()
    tn = np.sqrt((t * t).sum())
    if tn < 1e-6:
        return -1.0, None
    k = np.ones((th, tw))
    s1 = fftconvolve(B, k, mode="valid")
    s2 = fftconvolve(B * B, k, mode="valid")
    var = np.maximum(s2 - s1 * s1 / (th * tw), 1e-6)
    ncc = fftconvolve(B, t[::-1, ::-1], mode="valid") / (np.sqrt(var) * tn)
    ncc[var < 1e-3 * tn * tn] = -1  # a flat window correlates with nothing
    i = int(np.argmax(ncc))
    y, x = divmod(i, ncc.shape[1])
    return float(ncc.flat[i]), (y, x, th, tw)


def find_inside(big: np.ndarray, small: np.ndarray) -> tuple[float, tuple[int, int, int, int] | None]:
    """Best normalised cross-correlation of `small` (resized, aspect kept, to a share :data:`SCALES` of `big`'s
    width, then refined in 1 px steps around the best) placed inside `big`, and the rectangle (top, left, height,
    width) where it matched; (-1, None) when no scale fits."""
    B = big.astype(np.float64)
    W = B.shape[1]
    aspect = small.shape[0] / small.shape[1]
    best, where, best_w = -1.0, None, 0
    for s in SCALES:
        tw = int(round(s * W))
        ncc, rect = _ncc_at(B, small, tw, int(round(tw * aspect)))
        if ncc > best:
            best, where, best_w = ncc, rect, tw
    if where is None:
        return best, where
    for tw in range(max(MIN_TEMPLATE, int(best_w * 0.93)), int(best_w * 1.07) + 2):
        for th in {int(np.floor(tw * aspect)), int(np.ceil(tw * aspect))}:
            ncc, rect = _ncc_at(B, small, tw, th)
            if ncc > best:
                best, where = ncc, rect
    return best, where


def _detail_map(g: np.ndarray) -> np.ndarray:
    """Per pixel, the largest absolute step to a 4-neighbour."""
    d = np.zeros(g.shape)
    dx, dy = np.abs(np.diff(g, axis=1)), np.abs(np.diff(g, axis=0))
    d[:, :-1] = np.maximum(d[:, :-1], dx)
    d[:, 1:] = np.maximum(d[:, 1:], dx)
    d[:-1] = np.maximum(d[:-1], dy)
    d[1:] = np.maximum(d[1:], dy)
    return d


def holds(big: np.ndarray, small: np.ndarray, fill_big: float = 0.0, fill_small: float = 0.0) -> str | None:
    """How `big`'s canvas holds `small`'s content (`fill_*`: their edge fills): ``"canvas"`` when `big` is a
    canvas copy of `small` (a screenshot, border or padding: matched, the rest of `big` low-detail, and either
    `small` under :data:`SCREENSHOT_SHARE` of `big`'s width or `big` with more edge fill), ``"crop"`` when `small`
    is a crop of `big` (matched, and `big` without added fill: a rotated copy of a smooth photograph can hold its
    source well enough to match, but its corners give it away), or None."""
    ncc, rect = find_inside(big, small)
    if rect is None or ncc < MATCH_NCC:
        return None
    y, x, h, w = rect
    d = _detail_map(big.astype(np.float64))
    inside = d[y + 3:y + h - 3, x + 3:x + w - 3]
    margin = np.ones(d.shape, bool)
    margin[max(0, y - 3):y + h + 3, max(0, x - 3):x + w + 3] = False  # the matched edge, give or take 3 px
    if not margin.any() or not inside.size:
        return None
    # medians: a strip of the source's edge left in the margin by a 1-2 px misplacement does not count
    low = max(FLAT_MARGIN * float(np.median(inside)), FLAT_DETAIL)
    flat = np.median(d[margin]) < low
    added_fill = fill_big >= fill_small + FILL_STEP / 2
    if flat and (w <= SCREENSHOT_SHARE * big.shape[1] or added_fill):
        return "canvas"
    return None if added_fill else "crop"


def derived_members(labels: np.ndarray, canvases: list[np.ndarray | None], fill: np.ndarray | None = None,
                    max_size: int = 16) -> np.ndarray:
    """For each pool image, whether it is derived from another member of its component by the containment test
    (:func:`holds`): it holds the other on a canvas, or it is a crop of the other; when each holds the other (the
    same framing) neither is.  Only components of 2 to `max_size` images are compared, pair by pair (copy groups
    are small)."""
    n = len(labels)
    derived = np.zeros(n, bool)
    if not n:
        return derived
    fill = np.zeros(n) if fill is None else fill
    sizes = np.bincount(labels)
    multi = np.flatnonzero((sizes[labels] > 1) & (sizes[labels] <= max_size))
    order = multi[np.argsort(labels[multi], kind="stable")]
    for comp in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        comp = [int(i) for i in comp if canvases[i] is not None and canvases[i].size]
        how = {(a, b): holds(canvases[a], canvases[b], fill[a], fill[b]) for a in comp for b in comp if a != b}
        for (a, b), h in how.items():
            if h is None or how[(b, a)] is not None:  # each inside the other: the same framing, no verdict
                continue
            derived[a if h == "canvas" else b] = True
    return derived


# ------------------------------------------------------------------------------------------------------ loading
@dataclass
class HashInfo:
    """Per pool image (in key order), what the hash stage measured; neutral values when it did not run."""

    sha: np.ndarray  # pixel hash per image (the key itself when unknown: no exact twins)
    group: np.ndarray  # hash group label (own index when unknown)
    codes: np.ndarray | None  # packed hash codes, for the near_duplicate detail
    resolution: np.ndarray  # pixels before download's resize when known, else as stored; 0 when unknown
    fill: np.ndarray  # edge fill (``border_fill`` column), 0 when unknown
    method: str = "pca"  # the hash the codes are, as the hash stage recorded it
    quality: np.ndarray | None = None  # estimated JPEG quality, 100 when not a JPEG or unknown
    bytes_per_pixel: np.ndarray | None = None  # 0 when unknown
    sharpness: np.ndarray | None = None  # 0 when unknown
    canvases: list = field(default_factory=list)  # grayscale canvas per image, None when unknown

    def __post_init__(self):
        n = len(self.sha)
        self.quality = np.full(n, 100, np.int64) if self.quality is None else self.quality
        self.bytes_per_pixel = np.zeros(n) if self.bytes_per_pixel is None else self.bytes_per_pixel
        self.sharpness = np.zeros(n) if self.sharpness is None else self.sharpness
        self.canvases = self.canvases or [None] * n


MEASURED = ("jpeg_quality", "bytes_per_pixel", "sharpness", "canvas", "canvas_width", "canvas_height")


def read_hash_info(layout: RunLayout, keys: list[str]) -> HashInfo:
    """The hash stage's groups and per-image measurements for `keys` (sorted), or neutral values without it (hash
    parts written before a measurement existed leave that measurement neutral)."""
    n = len(keys)
    info = HashInfo(np.array(keys, dtype=object), np.arange(n), None, np.zeros(n, np.int64), np.zeros(n))
    if layout.hash_groups.exists():
        g = read_table(layout.hash_groups, "hash_groups")
        if g["key"].to_pylist() != keys:
            raise RuntimeError(f"dedup: hash/groups.parquet holds {g.num_rows} images but the filter kept {n} "
                               "(rerun the hash stage)")
        info.sha = np.array(g["pixel_sha256"].to_pylist(), dtype=object)
        info.group = np.array(g["group"], np.int64)
        info.codes = np.stack([np.frombuffer(b, np.uint8) for b in g["hash"].to_pylist()]) if n else None
        info.method = (pq.read_schema(layout.hash_groups).metadata or {}).get(HASH_METHOD_KEY.encode(), b"pca").decode()
    parts = layout.hash_parts()
    if parts:
        base = ["key", "width", "height", "original_width", "original_height", "border_fill"]
        tables = []
        for p in parts:
            have = set(pq.read_schema(p).names)
            tables.append(pq.read_table(p, columns=base + [c for c in MEASURED if c in have]))
        t = pa.concat_tables(tables, promote_options="default")
        ow = np.array(t["original_width"].fill_null(0), np.int64)
        oh = np.array(t["original_height"].fill_null(0), np.int64)
        res = np.where(ow * oh > 0, ow * oh, np.array(t["width"], np.int64) * np.array(t["height"], np.int64))
        row = {k: i for i, k in enumerate(t["key"].to_pylist())}
        idx = np.array([row.get(k, -1) for k in keys], np.int64)
        found = idx >= 0
        at = idx[found]
        info.resolution[found] = res[at]
        info.fill[found] = np.array(t["border_fill"], np.float64)[at]
        names = set(t.column_names)
        if "jpeg_quality" in names:
            info.quality[found] = np.array(t["jpeg_quality"].fill_null(100), np.int64)[at]
        if "bytes_per_pixel" in names:
            info.bytes_per_pixel[found] = np.array(t["bytes_per_pixel"].fill_null(0), np.float64)[at]
        if "sharpness" in names:
            info.sharpness[found] = np.array(t["sharpness"].fill_null(0), np.float64)[at]
        if {"canvas", "canvas_width", "canvas_height"} <= names:
            cv, cw, ch = t["canvas"].to_pylist(), t["canvas_width"].to_pylist(), t["canvas_height"].to_pylist()
            for i, j in zip(np.flatnonzero(found), at):
                if cv[j] and cw[j] and ch[j]:
                    info.canvases[i] = np.frombuffer(cv[j], np.uint8).reshape(ch[j], cw[j])
    return info


# -------------------------------------------------------------------------------------------- the survivor rule
def medoid_scores(labels: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Each node's summed cosine similarity to the other nodes of its component (0 when alone), rounded to 1e-4.

    x_i . (S_c - x_i) with S_c the component's descriptor sum: O(n d), no pairwise matrix."""
    n = len(labels)
    score = np.zeros(n)
    multi = np.flatnonzero(np.bincount(labels)[labels] > 1) if n else np.zeros(0, np.int64)
    if not multi.size:
        return score
    order = multi[np.argsort(labels[multi], kind="stable")]
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    xs = X[order].astype(np.float64)
    sums = np.add.reduceat(xs, starts, axis=0)
    comp = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(order)]))
    score[order] = np.einsum("ij,ij->i", xs, sums[comp] - xs)
    return np.round(score, 4)


def fill_steps(labels: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Each image's edge fill above the least of its component, in whole :data:`FILL_STEP` steps: two members
    whose fills differ by less than a step tie, wherever the two fall (a fixed grid would split 0.097 and 0.107)."""
    if not len(labels):
        return np.zeros(0)
    low = np.full(int(labels.max()) + 1, np.inf)
    np.minimum.at(low, labels, fill)
    return np.floor((fill - low[labels]) / FILL_STEP + 1e-9)


def survivor_priority(rule: str, labels: np.ndarray, X: np.ndarray, info: HashInfo) -> list[np.ndarray]:
    """Sort keys (smallest first) of the pool images for the dedup verdicts under `rule` (module docstring)."""
    if rule == "resolution":
        return [-info.resolution]
    if rule == "original":
        return [derived_members(labels, info.canvases, info.fill).astype(np.int64), fill_steps(labels, info.fill),
                -info.resolution, -np.floor(info.quality / QUALITY_STEP), -medoid_scores(labels, X)]
    raise ValueError(f"unknown dedup.survivor {rule!r}")
