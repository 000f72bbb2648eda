"""Turning untrusted bytes into a plain RGB image, or a clear reason why not.

Every stage that decodes images goes through :func:`decode_image`, so a corrupt, truncated, empty, animated or
oversized file is refused the same way everywhere, with a reason from the drop vocabulary:

* ``empty`` - zero bytes; ``undecodable`` - not an image PIL can identify or decode;
* ``truncated`` - the data ends early, including JPEGs whose scan ends (with an end marker) before the declared
  size is filled: libjpeg pads the rest with neutral grey, and an image that is half or more that padding
  (counted from the end, in decoding order) is refused rather than kept as a flat grey picture; ``decompression_bomb`` - the *declared* pixel count exceeds the limit
  (checked from the header, before any pixel is decoded);
* ``animated`` - more than one frame (when animated images are refused);
* ``unsupported_mode`` - a pixel format with no sensible RGB conversion.

CMYK (including Adobe's inverted CMYK JPEGs), 16-bit and floating-point greyscale, palette and alpha images are
converted to RGB: alpha is composited over white, 16-bit values are scaled to 8 bits.  With ``orient=True``
(the download stage, which stores the result without EXIF, so it happens once) the EXIF orientation is applied.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# libjpeg fills what a premature end of the scan leaves undecoded with zero coefficients: mid-grey pixels.
_JPEG_PADDING = {"L": 128, "RGB": (128, 128, 128)}
MAX_PADDING_FRACTION = 0.5
#: decode_image's default declared-pixel limit (PIL's own decompression-bomb limit; ``images.max_image_pixels``)
DEFAULT_MAX_PIXELS = 89_478_485


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode == "F":
            hi = max(float(arr.max()), 1.0)
        else:
            hi = 65535.0 if (mode.startswith("I;16") or arr.max() > 255) else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageRejected("unsupported_mode", f"cannot convert mode {mode} to RGB: {err}") from None


def padding_fraction(im: Image.Image) -> float:
    """The fraction of a decoded JPEG that is libjpeg's padding for a scan that ended early: the padding grey that
    runs, in decoding order, from some pixel to the bottom-right corner (0.0 for other formats and the common case,
    where that corner is not padding - one pixel looked at)."""
    pad = _JPEG_PADDING.get(im.mode)
    if im.format != "JPEG" or pad is None:
        return 0.0
    w, h = im.size
    if not (np.asarray(im.crop((w - 1, h - 1, w, h))) == pad).all():
        return 0.0
    match = np.asarray(im) == pad
    if match.ndim == 3:
        match = match.all(axis=2)
    reversed_rows = match[:, ::-1]
    trailing = np.where(reversed_rows.all(axis=1), w, reversed_rows.argmin(axis=1))  # padding at each row's end
    real_last = np.flatnonzero(~match[:, -1])  # rows ending in a real pixel: the padded tail starts below them
    start = real_last[-1] + 1 if len(real_last) else 0
    return float(trailing[start:].sum()) / (w * h)


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    drop_animated: bool = True,
    draft_size: int | None = None,
    orient: bool = False,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `data` to an RGB image; return (image, original (width, height)).

    `draft_size` lets JPEG decoding skip detail beyond what a later resize to that longer side keeps; `orient`
    applies the EXIF orientation (the original size is then reported as displayed)."""
    if not data:
        raise ImageRejected("empty", "zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise ImageRejected("decompression_bomb", str(err)) from None
        except UnidentifiedImageError:
            raise ImageRejected("undecodable", f"not an image ({len(data)} bytes, starts {data[:8]!r})") from None
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageRejected("undecodable", str(err)) from None
        width, height = im.size
        if width < 1 or height < 1:
            raise ImageRejected("undecodable", f"declared size {width}x{height}")
        if width * height > max_pixels:
            raise ImageRejected(
                "decompression_bomb", f"declared size {width}x{height} = {width * height} pixels > {max_pixels}"
            )
        frames = getattr(im, "n_frames", 1)
        if frames > 1 and drop_animated:
            raise ImageRejected("animated", f"{im.format} with {frames} frames")
        if draft_size and im.format == "JPEG" and max(width, height) >= 2 * draft_size:
            scale = draft_size / max(width, height)
            im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        try:
            im.load()
        except OSError as err:
            text = str(err)
            if "truncated" in text or "broken data stream" in text or "premature end" in text.lower():
                raise ImageRejected("truncated", text) from None
            raise ImageRejected("undecodable", text) from None
        except (ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise ImageRejected("undecodable", str(err)) from None
        padded = padding_fraction(im)
        if padded >= MAX_PADDING_FRACTION:
            raise ImageRejected(
                "truncated", f"{padded:.0%} of the decoded image is decoder padding: the data ends early "
                f"({len(data)} bytes for a declared {width}x{height})",
            )
        if orient:
            im, width, height = _apply_orientation(im, width, height)
    return _to_rgb(im), (width, height)


def _apply_orientation(im: Image.Image, width: int, height: int) -> tuple[Image.Image, int, int]:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop a decodable image
        return im, width, height
    if orientation not in range(2, 9):
        return im, width, height
    rotated = ImageOps.exif_transpose(im)
    return rotated, *((height, width) if orientation >= 5 else (width, height))


def resize_max_side(im: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the longer side is at most `max_side`, keeping the aspect ratio; never enlarge."""
    w, h = im.size
    if max(w, h) <= max_side:
        return im
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode_jpeg(im: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pixel_sha256(im: Image.Image) -> str:
    """Hash of the decoded pixels (exact-duplicate detection that ignores container bytes)."""
    import hashlib

    h = hashlib.sha256(f"{im.mode}{im.size}".encode())
    h.update(im.tobytes())
    return h.hexdigest()
