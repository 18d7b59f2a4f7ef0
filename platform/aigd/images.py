"""Safe image decoding shared by the data pipeline and the HTTP API.

Checks run on the header before any pixel is decoded: format by content sniffing (never the file
name), a pixel cap below Pillow's own decompression-bomb guard, minimum side and aspect ratio.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from aigd.config import DecodeLimits
from aigd.errors import CorruptImage, ImageRejected, ImageTooLarge, UnsupportedMediaType

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def sniff(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    raise UnsupportedMediaType("not a JPEG, PNG, WebP, BMP or GIF image (checked by content)")


def open_header(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Open lazily (header only) and enforce the geometry limits."""
    fmt = sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"image declares too many pixels: {e}") from None
    except Exception as e:  # Pillow raises many types for broken headers
        raise CorruptImage(f"cannot read {fmt} header: {e}") from None
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageTooLarge(f"{w}x{h} = {w * h} pixels exceeds the limit of {limits.max_pixels}")
    if min(w, h) < limits.min_side:
        raise ImageRejected(f"{w}x{h} is smaller than the minimum side of {limits.min_side} px")
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise ImageRejected(f"{w}x{h} has an aspect ratio above {limits.max_aspect}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha over white, 16-bit scaled (not clamped), CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """The image as a JPEG at `quality` would decode: Method 2's compression simulation and the
    evaluation's JPEG perturbations alike."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def decode(data: bytes, limits: DecodeLimits = DecodeLimits(), draft_to: tuple[int, int] | None = None) -> Image.Image:
    """Bytes to an upright RGB image, or one of the errors above. GIFs give their first frame.

    `draft_to` lets JPEG decode at reduced scale (DCT scaling) when the target is smaller.
    """
    img = open_header(data, limits)
    try:
        if draft_to is not None and img.format == "JPEG":
            img.draft("RGB", draft_to)
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise CorruptImage(f"cannot decode {img.format} image: {e}") from None
