"""Safe image decoding shared by the data pipeline, evaluation and the HTTP API.

Everything that can be refused is refused before pixels are decoded: the format by content sniffing
(never the file name), the declared geometry, and the structures no real photo needs but that make
decoders burn CPU (a progressive JPEG with thousands of scans, a PNG made of a million chunks, an
RLE BMP that Pillow pads out in Python). Decoding itself stays small: a JPEG is decoded at the
reduced DCT scale nearest the model's size and any other format is reduced by an integer factor
before mode conversion, so memory follows what the model uses, not what the file declares.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from aigd.config import DecodeLimits
from aigd.errors import CorruptImage, ImageRejected, ImageTooLarge, UnsupportedMediaType

log = logging.getLogger(__name__)

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
_JPEG_SOS = b"\xff\xda"  # entropy-coded data stuffs 0xFF with 0x00, so this pair is always a marker


def sniff(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    raise UnsupportedMediaType("not a JPEG, PNG, WebP, BMP or GIF image (checked by content)")


def _png_chunks_within(data: bytes, limit: int) -> bool:
    pos, n = 8, 0
    while pos + 8 <= len(data):
        n += 1
        if n > limit:
            return False
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return True


def check_structure(data: bytes, fmt: str, limits: DecodeLimits) -> None:
    """Refuse the decoder CPU bombs that fit inside the byte and pixel caps."""
    if fmt == "JPEG" and (scans := data.count(_JPEG_SOS)) > limits.max_jpeg_scans:
        raise ImageRejected(f"JPEG with {scans} scans; the limit is {limits.max_jpeg_scans}")
    if fmt == "PNG" and not _png_chunks_within(data, limits.max_png_chunks):
        raise ImageRejected(f"PNG with more than {limits.max_png_chunks} chunks")


def open_header(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Open lazily (header only) and enforce the structure and geometry limits."""
    fmt = sniff(data)
    check_structure(data, fmt, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"image declares too many pixels: {e}") from None
    except Exception as e:  # Pillow raises many types for broken headers
        log.info("unreadable %s header: %s: %s", fmt, type(e).__name__, e)
        raise CorruptImage(f"cannot read the {fmt} header: the data is corrupt") from None
    w, h = img.size
    cap = limits.max_jpeg_pixels if fmt == "JPEG" else limits.max_pixels
    if w * h > cap:
        raise ImageTooLarge(f"{w}x{h} = {w * h} pixels exceeds the limit of {cap} for {fmt}")
    if min(w, h) < limits.min_side:
        raise ImageRejected(f"{w}x{h} is smaller than the minimum side of {limits.min_side} px")
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise ImageRejected(f"{w}x{h} has an aspect ratio above {limits.max_aspect}")
    if fmt == "BMP" and img.tile and img.tile[0][0] == "bmp_rle":
        raise UnsupportedMediaType("RLE-compressed BMP is not accepted; send PNG or JPEG")
    return img


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey to 8-bit, scaled (not clamped), in integer arithmetic: no float64 copy."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):  # the high byte of each pixel, without a wider temporary
        high = 0 if arr.dtype.byteorder == ">" else 1
        return Image.fromarray(np.ascontiguousarray(arr.view(np.uint8).reshape(*arr.shape, 2)[..., high]), "L")
    top = 65535 if arr.max() > 255 else 255
    scaled = np.clip(arr, 0, top).astype(np.int32 if img.mode == "I" else np.float32)
    scaled *= 255
    scaled += top // 2
    scaled //= top
    return Image.fromarray(scaled.astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha over white, 16-bit scaled (not clamped), CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _sixteen_bit_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _shrink(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Integer-factor box reduction that keeps both sides >= target: cheap, and what follows
    (mode conversion, the policy resize) then works on a small image."""
    factor = min(img.width // max(1, target[0]), img.height // max(1, target[1]))
    if factor < 2:
        return img
    if img.mode.startswith("I;16"):
        img = _sixteen_bit_to_l(img)
    elif img.mode in ("P", "1"):
        img = img.convert("RGBA" if img.mode == "P" else "L")
    return img.reduce(factor)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """The image as a JPEG at `quality` would decode: Method 2's compression simulation and the
    evaluation's JPEG perturbations alike."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _upright(img: Image.Image) -> Image.Image:
    """EXIF orientation applied; an EXIF block Pillow cannot parse leaves the image as stored (the
    pixels are fine, only the metadata is broken)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def decode(data: bytes, limits: DecodeLimits = DecodeLimits(),
           model_size: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Bytes to an upright RGB image, or one of the errors above. GIFs and animated WebPs give their
    first frame. `model_size` maps the upright (w, h) to the size the model sees (aigd.prompt passes
    the image policy's): the image is then returned at exactly that size, decoded on the way at the
    smallest JPEG DCT scale, or box-reduced by the largest integer factor, that stays above it."""
    img = open_header(data, limits)
    try:
        size = None
        if model_size is not None:
            w, h = img.size
            transposed = _orientation(img) in _TRANSPOSED
            size = model_size(*((h, w) if transposed else (w, h)))
            stored = (size[1], size[0]) if transposed else size
            if img.format == "JPEG":
                img.draft("RGB", stored)
        img.seek(0)
        img.load()
        if size is not None:
            img = _shrink(img, stored)
        img = to_rgb(_upright(img))
        return img if size is None or img.size == size else img.resize(size, Image.Resampling.BICUBIC)
    except MemoryError:
        raise ImageTooLarge("not enough memory to decode this image") from None
    except Exception as e:  # Pillow's decoders raise many types (OSError, ValueError, struct.error, ...)
        log.info("undecodable %s image: %s: %s", img.format, type(e).__name__, e)
        raise CorruptImage(f"cannot decode the {img.format} image: the data is truncated or corrupt") from None
