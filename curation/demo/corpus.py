"""The demo / test corpus: synthetic images that know their own truth.

:func:`generate_corpus` writes, deterministically from a seed (same seed and scale: byte-identical files)::

    OUT/
      www/...                       what :class:`~curation.demo.server.DemoServer` serves (pool, copies, bad inputs)
      routes.json                   per-path overrides for the server (content type, headers) and redirect targets
      anchors/<set>/<class>/<id>.jpg  two anchor sets as class folders: `objects` and `scenes`
      eval/heldout/<id>.jpg         an evaluation set whose copies are planted in the pool
      manifest.parquet              one row per URL-list row: role, concept, duplicate-of, edit, expected stage/reason
      anchors.parquet, eval.parquet the anchor and evaluation images with their concepts
      corpus.json                   seed, scale and counts (the CLI regenerates when these differ)

:func:`write_url_list` turns the manifest into the URL list the pipeline reads (``urls.parquet`` or ``urls.csv``,
columns ``url``, ``caption``) for a server's base URL, and ``truth.parquet`` (the manifest plus the resolved ``url``).

**Visual concepts.** Eight synthetic concepts, each with its own shape family, palette (base hue, saturation and
brightness of background and foreground) and spatial frequency: circles, stripes, checker, triangles (the `objects`
anchor set, 3 anchors each), rings, waves (the `scenes` set, 4 anchors each), and blobs, dots (in no anchor set: the
distractors, together with smooth-noise and gradient images).  Each anchor draws its own parameters (a hue offset
within its concept, a layout, an angle, a frequency); a pool image "near" an anchor is rendered from that anchor's
parameters with perturbations: hue +-0.01, shapes moved by ~8% of the image and resized +-15% (a third of them
re-placed), periodic patterns with a new phase and angle/frequency jitter.  So a thumbnail or colour-histogram
descriptor ranks it closest to its own anchor, while sibling images are different enough not to be near duplicates
of each other (a 32x32 grayscale thumbnail moves far more between siblings than under any planted edit).

**Truth.** Every row says what should happen to it: ``expected_stage`` is null for a row that must survive download,
filter and dedup, else the stage that must drop it, with ``expected_reason`` from :func:`curation.stages.drop_reasons`
(exact and hash-near copies are judged by dedup too: the hash stage only links them).  Originals of duplicates come before their copies in row order, and each
original has at most one planted copy (duplicate groups are pairs), so "keep the first" keeps the original.

Choices worth knowing:
- The extreme-aspect input is 1000x200 (5:1), not thinner: the downloader shrinks images to ``max_side`` first, and a
  1200x60 image would arrive at 256x13 and be dropped as ``too_small`` before its aspect is checked.  5:1 stays
  above 48 px at max_side 256 (and 64 px at 512), so ``bad_aspect`` is the only reason that fits it.
- The decompression bomb is a 40000x40000 RGB PNG header with a tiny IDAT (a few zero rows) and IEND: PIL refuses it
  on open (1.6 G pixels > 2 x MAX_IMAGE_PIXELS) and the file stays a few hundred bytes.
- Near-duplicate originals have a shorter side >= 300 px so a 0.5x resize stays above any sensible ``min_side``.
- Evaluation images are fresh draws of a concept (new parameters, not any anchor's), so pool images near an anchor
  are not accidental eval near-copies; only the planted ``eval_copy`` rows are.
"""

from __future__ import annotations

import colorsys
import csv
import hashlib
import io
import json
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

CORPUS_VERSION = 2  # 2: exact and hash-near copies are expected at stage dedup

# concept name -> (shape family, base hue, background (sat, val), foreground (sat, val), frequency range)
CONCEPTS: dict[str, dict] = {
    "circles": {"family": "circles", "hue": 0.00, "bg": (0.25, 0.95), "fg": (0.85, 0.85), "freq": (5, 9)},
    "stripes": {"family": "stripes", "hue": 0.13, "bg": (0.30, 0.25), "fg": (0.80, 0.95), "freq": (5, 12)},
    "checker": {"family": "checker", "hue": 0.33, "bg": (0.50, 0.40), "fg": (0.70, 0.90), "freq": (3, 7)},
    "triangles": {"family": "triangles", "hue": 0.58, "bg": (0.15, 0.90), "fg": (0.85, 0.60), "freq": (4, 8)},
    "rings": {"family": "rings", "hue": 0.75, "bg": (0.40, 0.20), "fg": (0.60, 0.95), "freq": (4, 10)},
    "waves": {"family": "waves", "hue": 0.48, "bg": (0.60, 0.55), "fg": (0.90, 0.95), "freq": (2, 5)},
    "blobs": {"family": "blobs", "hue": 0.90, "bg": (0.20, 0.70), "fg": (0.80, 0.50), "freq": (3, 7)},
    "dots": {"family": "dots", "hue": 0.07, "bg": (0.10, 0.15), "fg": (0.90, 0.90), "freq": (6, 14)},
}
ANCHOR_SETS: dict[str, tuple[tuple[str, ...], int]] = {
    "objects": (("circles", "stripes", "checker", "triangles"), 3),
    "scenes": (("rings", "waves"), 4),
}
DISTRACTOR_CONCEPTS = ("blobs", "dots", "noise", "gradient")  # in no anchor set; noise/gradient are not CONCEPTS
EVAL_SET = "heldout"

# per-scale counts (multiplied by `scale`)
POOL_PER_CONCEPT = 20
DISTRACTORS = 60
EXACT_DUPLICATES = 15
NEAR_DUPLICATES = 30
EVAL_IMAGES = 12
EVAL_COPIES = 10
EDITS = ("resize", "jpeg", "color", "crop", "flip", "text")
# Concepts whose images stay recognisable to a fixed pixel descriptor when cropped (no fine periodic pattern, where
# a few percent of shift changes every cell): the sources of crop/flip/text copies and of the evaluation set, so the
# weight-free `pixels` copy descriptor used by tests and the demo has a known, reliable quality on them.
SHIFT_SAFE_CONCEPTS = ("circles", "triangles", "blobs", "dots")
HASH_EDITS = ("resize", "jpeg", "color")  # caught by a perceptual/PCA hash; the others by copy detection

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("absolute_url", pa.string()),
        pa.field("role", pa.string(), nullable=False),
        pa.field("concept", pa.string()),
        pa.field("anchor_set", pa.string()),
        pa.field("anchor_id", pa.string()),
        pa.field("dup_of_row", pa.int64()),
        pa.field("dup_of_eval", pa.string()),
        pa.field("edit", pa.string()),
        pa.field("edit_detail", pa.string()),
        pa.field("expected_stage", pa.string()),
        pa.field("expected_reason", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("content_type", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("caption", pa.string()),
    ]
)
ANCHORS_SCHEMA = pa.schema(
    [("anchor_set", pa.string()), ("anchor_id", pa.string()), ("class", pa.string()), ("concept", pa.string()),
     ("path", pa.string()), ("width", pa.int64()), ("height", pa.int64())]
)
EVAL_SCHEMA = pa.schema(
    [("eval_set", pa.string()), ("eval_id", pa.string()), ("path", pa.string()), ("concept", pa.string()),
     ("width", pa.int64()), ("height", pa.int64())]
)

REDIRECTS = {
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "private10": "http://10.0.0.7/x.jpg",
}
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
                 ".html": "text/html; charset=utf-8", ".txt": "text/plain; charset=utf-8"}


def content_type_for(path: str) -> str:
    return CONTENT_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *stream])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


def _size(rng: np.random.Generator, lo: int = 240, hi: int = 640, min_short: int = 200) -> tuple[int, int]:
    long = int(rng.integers(lo, hi + 1))
    ratio = float(rng.uniform(1.0, 2.0))
    short = max(min_short, int(round(long / ratio)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def concept_params(concept: str, rng: np.random.Generator, hue_offset: float = 0.0) -> dict:
    """Fresh parameters for one image (or one anchor) of `concept`."""
    if concept in ("noise", "gradient"):
        return {"concept": concept, "family": concept, "hue": float(rng.random()), "seed": int(rng.integers(2**31)),
                "angle": float(rng.uniform(0, np.pi)), "freq": float(rng.uniform(2, 8)),
                "hue2": float(rng.random()), "bg": (float(rng.uniform(0.3, 1)), float(rng.uniform(0.3, 1))),
                "fg": (float(rng.uniform(0.3, 1)), float(rng.uniform(0.3, 1)))}
    c = CONCEPTS[concept]
    p = {"concept": concept, "family": c["family"], "hue": c["hue"] + hue_offset, "bg": c["bg"], "fg": c["fg"],
         "freq": float(rng.uniform(*c["freq"])), "angle": float(rng.uniform(0, np.pi)),
         "phase": float(rng.uniform(0, 2 * np.pi)), "seed": int(rng.integers(2**31))}
    fam = c["family"]
    if fam in ("circles", "triangles", "blobs"):
        n = int(rng.integers(5, 10))
        p["shapes"] = [_random_shape(rng) for _ in range(n)]
    elif fam == "rings":
        p["shapes"] = [_random_shape(rng) for _ in range(int(rng.integers(1, 4)))]
    elif fam == "waves":
        p["freq2"] = float(rng.uniform(1, 4))
        p["amp"] = float(rng.uniform(0.05, 0.25))
    return p


def _random_shape(rng: np.random.Generator) -> list[float]:
    # centre x, centre y (fractions of width/height), size (fraction of the shorter side), rotation, colour index
    return [float(rng.uniform(0.05, 0.95)), float(rng.uniform(0.05, 0.95)), float(rng.uniform(0.06, 0.2)),
            float(rng.uniform(0, 2 * np.pi)), float(rng.integers(0, 2))]


def perturb(params: dict, rng: np.random.Generator) -> dict:
    """An image "near" the one `params` describes: same concept, palette and family, moderately moved layout."""
    p = json.loads(json.dumps(params))
    p["hue"] = params["hue"] + float(rng.uniform(-0.01, 0.01))
    p["seed"] = int(rng.integers(2**31))
    # Siblings of one anchor must not look like copies of each other: the frequency moves by 10-25% (never less)
    # and the angle by several degrees, so a crop-tolerant copy descriptor separates them from real crops.
    p["angle"] = params["angle"] + float(rng.choice([-1, 1]) * rng.uniform(np.deg2rad(10), np.deg2rad(25)))
    p["freq"] = params["freq"] * float(rng.choice([-1, 1]) * rng.uniform(0.15, 0.30) + 1)
    p["phase"] = float(rng.uniform(0, 2 * np.pi))
    if "shapes" in p:
        new = []
        for s in p["shapes"]:
            if rng.random() < 0.33:
                new.append(_random_shape(rng))
            else:
                new.append([float(np.clip(s[0] + rng.normal(0, 0.08), 0, 1)),
                            float(np.clip(s[1] + rng.normal(0, 0.08), 0, 1)),
                            s[2] * float(rng.uniform(0.85, 1.15)), s[3] + float(rng.normal(0, 0.3)), s[4]])
        p["shapes"] = new
    if "freq2" in p:
        p["freq2"] = params["freq2"] * float(rng.uniform(0.93, 1.07))
        p["amp"] = params["amp"] * float(rng.uniform(0.9, 1.1))
    return p


def render(p: dict, width: int, height: int) -> Image.Image:
    """Render parameters to an RGB image (deterministic: the noise comes from ``p['seed']``)."""
    rng = np.random.default_rng(p["seed"])
    h, w = height, width
    m = float(min(w, h))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = x / w, y / h  # layout coordinates
    xs, ys = x / m, y / m  # isotropic coordinates (shorter side = 1)
    bg = _hsv(p["hue"], *p["bg"])
    fg = [_hsv(p["hue"] + 0.06, *p["fg"]), _hsv(p["hue"] - 0.06, p["fg"][0] * 0.8, p["fg"][1] * 0.75)]
    img = np.empty((h, w, 3), np.float32)
    img[:] = bg
    fam = p["family"]
    ca, sa = np.cos(p["angle"]), np.sin(p["angle"])
    if fam == "circles":
        for cx, cy, r, _, ci in p["shapes"]:
            mask = (xs - cx * w / m) ** 2 + (ys - cy * h / m) ** 2 < r * r
            img[mask] = fg[int(ci)]
    elif fam == "triangles":
        for cx, cy, r, rot, ci in p["shapes"]:
            px, py = xs - cx * w / m, ys - cy * h / m
            inside = np.ones((h, w), bool)
            for k in range(3):  # inside an equilateral triangle = on the inner side of 3 edges
                a = rot + k * 2 * np.pi / 3
                inside &= px * np.cos(a) + py * np.sin(a) < r * 0.5
            img[inside] = fg[int(ci)]
    elif fam == "stripes":
        t = np.sin(2 * np.pi * p["freq"] * (xs * ca + ys * sa) + p["phase"])
        img[t > 0.3] = fg[0]
        img[t < -0.85] = fg[1]
    elif fam == "checker":
        a = xs * ca + ys * sa
        b = -xs * sa + ys * ca
        t = np.sin(np.pi * p["freq"] * a + p["phase"]) * np.sin(np.pi * p["freq"] * b)
        img[t > 0] = fg[0]
        img[t < 0] = fg[1] * 0.6 + bg * 0.4
    elif fam == "rings":
        for cx, cy, r, _, ci in p["shapes"]:
            d = np.sqrt((xs - cx * w / m) ** 2 + (ys - cy * h / m) ** 2)
            ring = (np.sin(2 * np.pi * p["freq"] * d + p["phase"]) > 0.4) & (d < r * 3.5)
            img[ring] = fg[int(ci)]
    elif fam == "waves":
        wobble = p["amp"] * np.sin(2 * np.pi * p["freq2"] * (v * ca - u * sa))
        t = np.sin(2 * np.pi * (p["freq"] * (u * ca + v * sa) + wobble) + p["phase"])
        k = ((t + 1) / 2)[..., None]
        img = fg[0] * k + (fg[1] * 0.5 + bg * 0.5) * 0.35 * (1 - k)  # bright crests, dark troughs
    elif fam == "blobs":
        field_ = np.zeros((h, w), np.float32)
        for cx, cy, r, _, _ in p["shapes"]:
            field_ += np.exp(-((xs - cx * w / m) ** 2 + (ys - cy * h / m) ** 2) / (2 * (r * 0.8) ** 2))
        k = np.clip((field_ - 0.5) * 4, 0, 1)[..., None]
        img = img * (1 - k) + fg[0] * k
    elif fam == "dots":
        s = 1.0 / p["freq"]
        a = (xs * ca + ys * sa) / s + p["phase"] / (2 * np.pi)
        b = (-xs * sa + ys * ca) / s
        d = (a - np.round(a)) ** 2 + (b - np.round(b)) ** 2
        img[d < 0.09] = fg[0]
    elif fam == "noise":
        gh, gw = int(rng.integers(3, 12)), int(rng.integers(3, 12))
        grid = rng.random((gh, gw, 3)).astype(np.float32) * 255
        small = Image.fromarray(grid.astype(np.uint8), "RGB")
        img = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255.0
    elif fam == "gradient":
        c1 = _hsv(p["hue"], p["bg"][0], 0.05 + 0.25 * p["bg"][1])  # dark end
        c2 = _hsv(p["hue2"], 0.2 + 0.4 * p["fg"][0], 0.7 + 0.3 * p["fg"][1])  # light end
        t = np.clip((u - 0.5) * ca + (v - 0.5) * sa + 0.5, 0, 1)
        t = np.clip(t + 0.2 * np.sin(2 * np.pi * p["freq"] * (v * ca - u * sa) + p["hue2"] * 6.28), 0, 1)[..., None]
        img = c1 * (1 - t) + c2 * t
    else:  # pragma: no cover - CONCEPTS and render() are kept in step
        raise ValueError(f"unknown family {fam!r}")
    img = img * 255.0 + rng.integers(-6, 7, img.shape, dtype=np.int16)  # mild noise (std ~3.7 grey levels)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _encode(im: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=quality)
    elif fmt == "PNG":
        im.save(buf, "PNG", compress_level=6)
    else:
        raise ValueError(fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# edits (the known transforms that make copies)


def apply_edit(im: Image.Image, edit: str, rng: np.random.Generator, mild: bool = False) -> tuple[bytes, str, str]:
    """Apply one known edit; return (JPEG bytes, edit detail as JSON, extension)."""
    w, h = im.size
    quality = 90
    if edit == "resize":
        f = float(rng.uniform(0.7, 0.85) if mild else rng.uniform(0.5, 0.8))
        out = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR)
        detail = {"factor": round(f, 4)}
    elif edit == "jpeg":
        quality = int(rng.integers(40, 51) if mild else rng.integers(30, 51))
        out = im
        detail = {"quality": quality}
    elif edit == "color":
        b = float(rng.uniform(0.04, 0.08)) * (1 if rng.random() < 0.5 else -1)
        dh = int(rng.integers(2, 6)) * (1 if rng.random() < 0.5 else -1)
        hsv = np.asarray(im.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + dh) % 256
        hsv[..., 2] = np.clip(hsv[..., 2].astype(np.float32) * (1 + b), 0, 255).astype(np.uint8)
        out = Image.fromarray(hsv, "HSV").convert("RGB")
        detail = {"brightness": round(1 + b, 4), "hue_shift_of_256": dh}
    elif edit == "crop":
        area = float(rng.uniform(0.92, 0.97) if mild else rng.uniform(0.88, 0.96))
        s = np.sqrt(area)
        cw, ch = round(w * s), round(h * s)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = im.crop((x0, y0, x0 + cw, y0 + ch))
        detail = {"area": round(cw * ch / (w * h), 4), "box": [x0, y0, x0 + cw, y0 + ch]}
    elif edit == "flip":
        out = ImageOps.mirror(im)
        detail = {"direction": "horizontal"}
    elif edit == "text":
        out = im.copy()
        size = max(12, min(w, h) // 14)
        font = ImageFont.load_default(size=size)
        text = str(rng.choice(["(c) lvd demo", "SAMPLE", "photo #%d" % int(rng.integers(100, 999)), "www.example"]))
        d = ImageDraw.Draw(out)
        x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
        tw, th = x1 - x0 + 8, y1 - y0 + 8
        corner = int(rng.integers(0, 4))
        px = 6 if corner in (0, 2) else w - tw - 6
        py = 6 if corner in (0, 1) else h - th - 6
        d.rectangle((px, py, px + tw, py + th), fill=(255, 255, 255))
        d.text((px + 4 - x0, py + 4 - y0), text, fill=(0, 0, 0), font=font)
        detail = {"text": text, "corner": ["top-left", "top-right", "bottom-left", "bottom-right"][corner]}
    else:
        raise ValueError(f"unknown edit {edit!r}")
    return _encode(out, "JPEG", quality), json.dumps(detail, sort_keys=True), ".jpg"


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A PNG that declares width x height RGB pixels but holds only a few zero rows: tiny file, huge declared size."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((1 + 3 * width) * 4), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


HTML_NOT_IMAGE = (b"<!DOCTYPE html>\n<html><head><title>Not found</title></head>\n"
                  b"<body><h1>This is a web page, not an image</h1><p>lvd demo corpus</p></body></html>\n")


# ---------------------------------------------------------------------------------------------------------------
# the corpus


@dataclass(eq=False)
class _Row:
    role: str
    path: str | None = None
    absolute_url: str | None = None
    concept: str | None = None
    anchor_set: str | None = None
    anchor_id: str | None = None
    dup_of: "_Row | None" = None
    dup_of_eval: str | None = None
    edit: str | None = None
    edit_detail: str | None = None
    expected_stage: str | None = None
    expected_reason: str | None = None
    width: int | None = None
    height: int | None = None
    content_type: str | None = None
    data: bytes | None = None  # file bytes under www/ (None: no file, or the file is shared with `dup_of`)
    image: Image.Image | None = field(default=None, repr=False)  # the rendered original (edits start from it)
    caption: str = ""
    ext: str | None = None  # pool files: the extension of their file under www/img/ (named after ordering)
    row_id: int = -1

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else None


def _n(count: int, scale: float) -> int:
    return max(1, int(round(count * scale)))


def generate_corpus(out_dir, seed: int = 0, scale: float = 1) -> dict:
    """Generate the demo corpus under `out_dir` (see the module docstring); return a summary dict.

    Deterministic: the same seed and scale give byte-identical files.  Earlier output of this function in `out_dir`
    (www/, anchors/, eval/ and the tables) is replaced; nothing else there is touched.
    """
    if scale <= 0:
        raise ValueError("scale must be > 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("www", "anchors", "eval"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)

    # -- anchors ------------------------------------------------------------------------------------------------
    anchors: list[dict] = []  # with "params"
    for si, (aset, (concepts, per)) in enumerate(ANCHOR_SETS.items()):
        for ci, concept in enumerate(concepts):
            offsets = np.linspace(-0.04, 0.04, per) if per > 1 else np.zeros(1)
            for k in range(per):
                rng = _rng(seed, 1, si, ci, k)
                params = concept_params(concept, rng, hue_offset=float(offsets[k]))
                w, h = _size(rng, 320, 512, 256)
                anchor_id = f"{aset}-{concept}-{k}"
                rel = f"anchors/{aset}/{concept}/{anchor_id}.jpg"
                im = render(params, w, h)
                _write(out / rel, _encode(im, "JPEG", 92))
                anchors.append({"anchor_set": aset, "anchor_id": anchor_id, "class": concept, "concept": concept,
                                "path": rel, "width": w, "height": h, "params": params})

    # -- evaluation set -----------------------------------------------------------------------------------------
    all_concepts = list(CONCEPTS)
    evals: list[dict] = []
    for k in range(_n(EVAL_IMAGES, scale)):
        rng = _rng(seed, 2, k)
        concept = SHIFT_SAFE_CONCEPTS[k % len(SHIFT_SAFE_CONCEPTS)]
        params = concept_params(concept, rng, hue_offset=float(rng.uniform(-0.04, 0.04)))
        w, h = _size(rng, 320, 560, 300)
        eval_id = f"{EVAL_SET}-{k:04d}"
        rel = f"eval/{EVAL_SET}/{eval_id}.jpg"
        im = render(params, w, h)
        _write(out / rel, _encode(im, "JPEG", 92))
        evals.append({"eval_set": EVAL_SET, "eval_id": eval_id, "path": rel, "concept": concept, "width": w,
                      "height": h, "image": im})

    # -- pool: images near anchors and distractors --------------------------------------------------------------
    good: list[_Row] = []
    for ai_set, (aset, (concepts, per)) in enumerate(ANCHOR_SETS.items()):
        for concept in concepts:
            mine = [a for a in anchors if a["anchor_set"] == aset and a["concept"] == concept]
            n = _n(POOL_PER_CONCEPT, scale)
            for k in range(n):
                a = mine[k % len(mine)]
                rng = _rng(seed, 3, ai_set, all_concepts.index(concept), k)
                params = perturb(a["params"], rng)
                good.append(_image_row(rng, params, "anchor_near", concept, a["anchor_set"], a["anchor_id"]))
    n_dis = _n(DISTRACTORS, scale)
    for k in range(n_dis):
        rng = _rng(seed, 4, k)
        # half of the distractors are the two unanchored concepts, the other half smooth noise and gradients
        concept = DISTRACTOR_CONCEPTS[k % 2] if k < n_dis // 2 else DISTRACTOR_CONCEPTS[2 + k % 2]
        params = concept_params(concept, rng, hue_offset=float(rng.uniform(-0.04, 0.04)))
        good.append(_image_row(rng, params, "distractor", concept))

    order_rng = _rng(seed, 5)
    rows: list[_Row] = [good[i] for i in order_rng.permutation(len(good))]

    # -- special images that must be converted and kept ----------------------------------------------------------
    special = _special_rows(seed)
    # -- eval copies ---------------------------------------------------------------------------------------------
    n_ec = min(_n(EVAL_COPIES, scale), len(evals))
    ec_rng = _rng(seed, 6)
    eval_copies = []
    for k, ei in enumerate(ec_rng.permutation(len(evals))[:n_ec]):
        e = evals[int(ei)]
        edit = EDITS[k % len(EDITS)]
        data, detail, ext = apply_edit(e["image"], edit, _rng(seed, 7, k), mild=True)
        w, h = Image.open(io.BytesIO(data)).size
        eval_copies.append(_Row(role="eval_copy", concept=e["concept"], dup_of_eval=e["eval_id"], edit=edit,
                                edit_detail=detail, expected_stage="dedup", expected_reason="eval_contamination",
                                width=w, height=h, content_type="image/jpeg", data=data, caption=_caption(e["concept"]),
                                ext=ext))
    # -- bad inputs ----------------------------------------------------------------------------------------------
    bad = _bad_rows(seed)
    for r in special + eval_copies + [b for b in bad if b.role != "_dup_url"]:
        pos = int(order_rng.integers(0, len(rows) + 1))
        rows.insert(pos, r)

    # -- duplicates: exact copies, near copies (edits), repeated URLs; each after its original -------------------
    candidates = [r for r in good if r.image is not None]
    pick = order_rng.permutation(len(candidates))
    n_exact, n_near = _n(EXACT_DUPLICATES, scale), _n(NEAR_DUPLICATES, scale)
    big = [candidates[i] for i in pick if min(candidates[i].width, candidates[i].height) >= 300]
    small_ok = [candidates[i] for i in pick if min(candidates[i].width, candidates[i].height) < 300]
    # Crop/flip/text copies come from shift-safe concepts only (see SHIFT_SAFE_CONCEPTS); hash edits from any.
    near_src, used = [], set()
    for k in range(n_near):
        shift_safe = EDITS[k % len(EDITS)] not in HASH_EDITS
        for i, c in enumerate(big):
            if i not in used and (not shift_safe or c.concept in SHIFT_SAFE_CONCEPTS):
                near_src.append(c)
                used.add(i)
                break
    rest = [c for i, c in enumerate(big) if i not in used] + small_ok
    exact_src = rest[:n_exact]
    url_src = rest[n_exact:n_exact + 2]
    copies: list[_Row] = []
    for o in exact_src:
        copies.append(_Row(role="exact_duplicate", concept=o.concept, anchor_set=o.anchor_set, anchor_id=o.anchor_id,
                           dup_of=o, expected_stage="dedup", expected_reason="exact_duplicate", width=o.width,
                           height=o.height, content_type=o.content_type, data=o.data, caption=o.caption,
                           ext=o.ext))
    for k, o in enumerate(near_src):
        edit = EDITS[k % len(EDITS)]
        data, detail, ext = apply_edit(o.image, edit, _rng(seed, 8, k))
        w, h = Image.open(io.BytesIO(data)).size
        reason = "near_duplicate" if edit in HASH_EDITS else "copy_duplicate"
        copies.append(_Row(role="near_duplicate", concept=o.concept, anchor_set=o.anchor_set, anchor_id=o.anchor_id,
                           dup_of=o, edit=edit, edit_detail=detail, expected_stage="dedup", expected_reason=reason,
                           width=w, height=h, content_type="image/jpeg", data=data, caption=o.caption, ext=ext))
    for o in url_src:
        copies.append(_Row(role="bad_input", concept=o.concept, dup_of=o, expected_stage="download",
                           expected_reason="duplicate_url", content_type=o.content_type, caption=o.caption))
    for c in [copies[i] for i in order_rng.permutation(len(copies))]:
        i = rows.index(c.dup_of)
        rows.insert(int(order_rng.integers(i + 1, len(rows) + 1)), c)

    # -- names: pool files get neutral names in a random order; then write www/ --------------------------------
    names = order_rng.permutation(len(rows))
    www = out / "www"
    for i, r in enumerate(rows):
        r.row_id = i
        if r.ext is not None:
            r.path = f"/img/{int(names[i]):05d}{r.ext}"
    for r in rows:
        if r.expected_reason == "duplicate_url":  # the same URL as its (earlier, now named) original
            r.path = r.dup_of.path
    for r in rows:
        if r.data is not None and r.path is not None and not r.path.startswith(("/status/", "/redirect/")):
            _write(www / r.path.lstrip("/"), r.data)

    # -- tables ---------------------------------------------------------------------------------------------------
    manifest = pa.Table.from_pylist([_row_dict(r) for r in rows], schema=MANIFEST_SCHEMA)
    _write_parquet(manifest, out / "manifest.parquet")
    _write_parquet(pa.Table.from_pylist([{k: v for k, v in a.items() if k != "params"} for a in anchors],
                                        schema=ANCHORS_SCHEMA), out / "anchors.parquet")
    _write_parquet(pa.Table.from_pylist([{k: v for k, v in e.items() if k != "image"} for e in evals],
                                        schema=EVAL_SCHEMA), out / "eval.parquet")
    routes = {
        "files": {
            "/files/not_an_image.jpg": {"content_type": "image/jpeg"},
            "/noai/optout-0.jpg": {"headers": {"X-Robots-Tag": "noai"}},
            "/noai/optout-1.jpg": {"headers": {"X-Robots-Tag": "noimageai"}},
        },
        "redirects": REDIRECTS,
        "slow": ["/slow/slow-0.jpg"],
    }
    _write(out / "routes.json", (json.dumps(routes, indent=2, sort_keys=True) + "\n").encode())
    summary = {
        "version": CORPUS_VERSION,
        "seed": int(seed),
        "scale": int(scale) if float(scale).is_integer() else float(scale),
        "rows": len(rows),
        "anchors": {s: sum(a["anchor_set"] == s for a in anchors) for s in ANCHOR_SETS},
        "eval": {EVAL_SET: len(evals)},
        "roles": _count(r.role for r in rows),
        "expected_reasons": _count(r.expected_reason or "kept" for r in rows),
    }
    _write(out / "corpus.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return {**summary, "out_dir": str(out), "manifest": str(out / "manifest.parquet")}


def _caption(concept: str | None) -> str:
    return f"a synthetic image of {concept}" if concept else ""


def _image_row(rng, params, role, concept, anchor_set=None, anchor_id=None) -> _Row:
    w, h = _size(rng)
    im = render(params, w, h)
    fmt = "PNG" if rng.random() < 0.12 else "JPEG"
    data = _encode(im, fmt, int(rng.integers(85, 96)))
    return _Row(role=role, concept=concept, anchor_set=anchor_set, anchor_id=anchor_id, width=w, height=h,
                content_type="image/png" if fmt == "PNG" else "image/jpeg", data=data, image=im,
                caption=_caption(concept), ext=".png" if fmt == "PNG" else ".jpg")


def _special_rows(seed: int) -> list[_Row]:
    rows = []
    rng = _rng(seed, 9, 0)
    im = render(concept_params("blobs", rng), 360, 280)
    buf = io.BytesIO()
    im.convert("CMYK").save(buf, "JPEG", quality=90)
    rows.append(_Row(role="special_kept", path="/files/cmyk.jpg", concept="blobs", width=360, height=280,
                     content_type="image/jpeg", data=buf.getvalue(), edit_detail='{"mode": "CMYK"}',
                     caption="a CMYK JPEG"))
    rng = _rng(seed, 9, 1)
    gray = np.asarray(render(concept_params("gradient", rng), 300, 320).convert("L"), np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    rows.append(_Row(role="special_kept", path="/files/gray16.png", concept="gradient", width=300, height=320,
                     content_type="image/png", data=buf.getvalue(), edit_detail='{"mode": "I;16"}',
                     caption="a 16-bit grayscale PNG"))
    rng = _rng(seed, 9, 2)
    im = render(concept_params("dots", rng), 320, 320).convert("RGBA")
    a = np.asarray(im).copy()
    yy, xx = np.mgrid[0:320, 0:320]
    a[..., 3] = np.where((xx - 160) ** 2 + (yy - 160) ** 2 < 140**2, 255, 0).astype(np.uint8)
    a[..., 3] = np.where(xx < 40, 128, a[..., 3]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, "PNG")
    rows.append(_Row(role="special_kept", path="/files/alpha.png", concept="dots", width=320, height=320,
                     content_type="image/png", data=buf.getvalue(), edit_detail='{"mode": "RGBA"}',
                     caption="an RGBA PNG with transparency"))
    return rows


def _bad_rows(seed: int) -> list[_Row]:
    def bad(reason, stage="download", **kw) -> _Row:
        kw.setdefault("caption", f"bad input: {reason}")
        return _Row(role="bad_input", expected_stage=stage, expected_reason=reason, **kw)

    rng = _rng(seed, 10, 0)
    real = _encode(render(concept_params("circles", rng), 400, 300), "JPEG", 90)
    trunc = real[: int(len(real) * 0.6)]
    slow = _encode(render(concept_params("waves", _rng(seed, 10, 1)), 320, 240), "JPEG", 90)
    noai = [_encode(render(concept_params(c, _rng(seed, 10, 2 + i)), 320, 256), "JPEG", 90)
            for i, c in enumerate(("stripes", "rings"))]
    frames = [render(concept_params("dots", _rng(seed, 10, 4 + i)), 200, 200).quantize(64) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=120, loop=0)
    gif = buf.getvalue()
    wide = _encode(render(concept_params("stripes", _rng(seed, 10, 8)), 1000, 200), "JPEG", 90)
    tiny = _encode(render(concept_params("circles", _rng(seed, 10, 9)), 32, 32), "JPEG", 90)
    return [
        bad("http_error", path="/status/404", content_type="text/plain; charset=utf-8"),
        bad("http_error", path="/status/500", content_type="text/plain; charset=utf-8"),
        bad("timeout", path="/slow/slow-0.jpg", content_type="image/jpeg", data=slow),
        bad("undecodable", path="/files/not_an_image.jpg", content_type="image/jpeg", data=HTML_NOT_IMAGE),
        bad("truncated", path="/files/truncated.jpg", content_type="image/jpeg", data=trunc),
        bad("empty", path="/files/empty.jpg", content_type="image/jpeg", data=b""),
        bad("decompression_bomb", path="/files/bomb.png", content_type="image/png", data=bomb_png(),
            edit_detail='{"declared": [40000, 40000]}'),
        bad("animated", path="/files/animated.gif", content_type="image/gif", data=gif, width=200, height=200),
        bad("bad_aspect", stage="filter", path="/files/wide.jpg", content_type="image/jpeg", data=wide, width=1000,
            height=200, concept="stripes"),
        bad("too_small", stage="filter", path="/files/tiny.jpg", content_type="image/jpeg", data=tiny, width=32,
            height=32, concept="circles"),
        *[bad("private_address", path=f"/redirect/{name}", edit_detail=json.dumps({"location": REDIRECTS[name]}))
          for name in ("metadata", "private10")],
        bad("private_address", absolute_url="http://10.0.0.1/a.jpg"),
        bad("private_address", absolute_url="http://169.254.169.254/latest/meta-data/iam"),
        bad("opted_out", path="/noai/optout-0.jpg", content_type="image/jpeg", data=noai[0], width=320, height=256,
            edit_detail='{"X-Robots-Tag": "noai"}'),
        bad("opted_out", path="/noai/optout-1.jpg", content_type="image/jpeg", data=noai[1], width=320, height=256,
            edit_detail='{"X-Robots-Tag": "noimageai"}'),
        bad("blocked_domain", absolute_url="http://blocked.example/cat.jpg"),
        bad("blocked_domain", absolute_url="http://ads.blocked.example/x.jpg"),
        bad("bad_url", absolute_url="htp://broken"),
        bad("bad_url", absolute_url="http//missing-colon.jpg"),
        bad("bad_url", absolute_url="not a url"),
    ]


def _row_dict(r: _Row) -> dict:
    return {
        "row_id": r.row_id, "path": r.path, "absolute_url": r.absolute_url, "role": r.role, "concept": r.concept,
        "anchor_set": r.anchor_set, "anchor_id": r.anchor_id,
        "dup_of_row": r.dup_of.row_id if r.dup_of is not None else None, "dup_of_eval": r.dup_of_eval,
        "edit": r.edit, "edit_detail": r.edit_detail, "expected_stage": r.expected_stage,
        "expected_reason": r.expected_reason, "width": r.width, "height": r.height,
        "content_type": r.content_type, "sha256": r.sha256 if r.data is not None else (
            r.dup_of.sha256 if r.dup_of is not None and r.role == "exact_duplicate" else None),
        "caption": r.caption,
    }


def _count(values) -> dict:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd")


# ---------------------------------------------------------------------------------------------------------------
# URL list


def write_url_list(corpus_dir, base_url: str, fmt: str = "parquet") -> Path:
    """Write ``urls.parquet`` (or ``urls.csv``; columns url, caption) and ``truth.parquet`` for `base_url`.

    url = base_url + path for served rows, else the row's fixed absolute_url.  Returns the URL list's path.
    """
    corpus = Path(corpus_dir)
    if fmt not in ("parquet", "csv"):
        raise ValueError("fmt must be 'parquet' or 'csv'")
    manifest = pq.read_table(corpus / "manifest.parquet")
    base = base_url.rstrip("/")
    urls = [base + p if p is not None else a
            for p, a in zip(manifest["path"].to_pylist(), manifest["absolute_url"].to_pylist())]
    captions = manifest["caption"].to_pylist()
    truth = manifest.append_column(pa.field("url", pa.string(), nullable=False), pa.array(urls, pa.string()))
    _write_parquet(truth, corpus / "truth.parquet")
    if fmt == "parquet":
        path = corpus / "urls.parquet"
        _write_parquet(pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string())}), path)
    else:
        path = corpus / "urls.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["url", "caption"])
            w.writerows(zip(urls, captions))
    return path
