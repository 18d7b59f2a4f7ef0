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
import re
import struct
import warnings
import zlib
from typing import Callable

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from aigd.config import DecodeLimits
from aigd.errors import AigdError, CorruptImage, ImageRejected, ImageTooLarge, UnsupportedMediaType

log = logging.getLogger(__name__)

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


def png_spans(data: bytes):
    """(type, start, end) of each PNG chunk (length, type, payload and CRC), up to IEND or the end."""
    pos = 8
    while pos + 8 <= len(data):
        kind, end = data[pos + 4:pos + 8], pos + 12 + int.from_bytes(data[pos:pos + 4], "big")
        yield kind, pos, end
        if kind == b"IEND":
            return
        pos = end


def png_chunks(data: bytes):
    """(type, payload) of each PNG chunk, lazily, up to IEND or the end of the data."""
    for kind, start, end in png_spans(data):
        yield kind, data[start + 8:end - 4]


_PNG_TEXT = (b"tEXt", b"zTXt", b"iTXt")
_PNG_RAW_EXIF = b"Raw profile type"  # ImageMagick's EXIF (orientation) in a text chunk: Pillow reads it


def png_without_text(data: bytes) -> bytes:
    """The PNG minus its text chunks, which never change a pixel: Pillow inflates and keeps every
    one of them and refuses the whole file over a 1 MB one (a 10 MB XMP packet, a zTXt bomb), while
    the metadata is aigd.provenance's business, read under its own limits. Every other chunk is
    kept byte for byte, CRC included."""
    dropped = [(start, end) for kind, start, end in png_spans(data)
               if kind in _PNG_TEXT and not data[start + 8:start + 24].startswith(_PNG_RAW_EXIF)]
    if not dropped:
        return data
    kept, pos = [], 0
    for start, end in dropped:
        kept.append(data[pos:start])
        pos = end
    return b"".join(kept) + data[pos:]


def _png_chunks_within(data: bytes, limit: int) -> bool:
    return all(n < limit for n, _ in enumerate(png_chunks(data)))


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_raw_size(ihdr: bytes) -> int:
    """Bytes the IDAT stream must inflate to: per row a filter byte and the packed pixels."""
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
    bits = depth * _PNG_CHANNELS.get(colour, 4)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        pw, ph = -(-(w - x0) // dx) if w > x0 else 0, -(-(h - y0) // dy) if h > y0 else 0
        total += ph * (1 + -(-pw * bits // 8)) if pw else 0
    return total


def check_png_stream(data: bytes) -> None:
    """The IDAT stream inflates to every row the header declares, or CorruptImage: Pillow stops
    quietly where a valid zlib stream ends and leaves the missing rows black. Inflated in bounded
    pieces, so memory stays small whatever the stream claims."""
    chunks = png_chunks(data)
    ihdr = next((payload for kind, payload in chunks if kind == b"IHDR"), b"")
    need, got = _png_raw_size(ihdr) if len(ihdr) >= 13 else 0, 0
    inflate = zlib.decompressobj()
    try:
        for kind, payload in chunks:
            if kind != b"IDAT":
                continue
            piece = payload
            while piece and got < need and not inflate.eof:
                got += len(inflate.decompress(piece, 1 << 20))
                piece = inflate.unconsumed_tail
            if got >= need or inflate.eof:
                break
    except zlib.error:
        pass
    if got < need:
        raise CorruptImage(f"the PNG's pixel data ends after {got} of {need} bytes")


_JPEG_GAP_BYTES = 65_536  # fill or stray bytes between segments: a few in real files; Pillow steps through them in Python


def check_structure(data: bytes, fmt: str, limits: DecodeLimits) -> None:
    """Refuse the decoder CPU bombs that fit inside the byte and pixel caps."""
    if fmt == "JPEG":
        _check_jpeg_segments(data, limits)
    if fmt == "PNG" and not _png_chunks_within(data, limits.max_png_chunks):
        raise ImageRejected(f"PNG with more than {limits.max_png_chunks} chunks")


def _check_jpeg_segments(data: bytes, limits: DecodeLimits) -> None:
    """Scans (each a pass over the image), segments (Pillow reads the header's in Python) and the
    bytes between segments (Pillow steps through fill bytes one by one: 17 s for 19 MB)."""
    scans = segments = gaps = 0
    for marker, _, _, gap in jpeg_segments(data):
        scans, segments, gaps = scans + (marker == 0xDA), segments + 1, gaps + gap
        if scans > limits.max_jpeg_scans:
            raise ImageRejected(f"JPEG with more than {limits.max_jpeg_scans} scans")
        if segments > limits.max_jpeg_segments:
            raise ImageRejected(f"JPEG with more than {limits.max_jpeg_segments} segments")
        if gaps > _JPEG_GAP_BYTES:
            raise ImageRejected(f"JPEG with more than {_JPEG_GAP_BYTES} fill or stray bytes between segments")


def open_header(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Open lazily (header only) and enforce the structure and geometry limits."""
    fmt = sniff(data)
    check_structure(data, fmt, limits)
    if fmt == "PNG":
        data = png_without_text(data)
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

# libjpeg recovers from a cut or garbled scan by inventing pixels (grey or repeated blocks) and only
# warns, which Pillow never reports. These warnings mean pixels are missing, or (extraneous bytes
# between scans) that a later scan could go unchecked behind them.
_JPEG_UNVERIFIED = ("premature end", "bad huffman code", "bad arithmetic code", "instead of rst",
                    "inconsistent progression", "extraneous bytes before marker", "invalid sos parameters")
_JPEG_COMPLETE = "extraneous bytes before marker 0xd9"  # junk after the last scan: every pixel was decoded
# The segments entropy decoding needs: frame headers (SOF0-15 but DHT, JPG, DAC), DHT, DAC, DQT, DRI, DNL.
_JPEG_DECODING = frozenset([*range(0xC0, 0xD0), 0xDB, 0xDC, 0xDD]) - {0xC8}
_JPEG_FRAME = _JPEG_DECODING - {0xC4, 0xCC, 0xDB, 0xDC, 0xDD}  # SOFn: what kind of frame the scans belong to
_JPEG_SEQUENTIAL = frozenset([0xC0, 0xC1, 0xC5, 0xC9, 0xCD])  # frame types whose scans are Ss 0, Se 63, Ah/Al 0
# A marker: 0xFF and a byte that is not stuffing (0x00), a restart marker or another 0xFF (fill before
# it). Matching from the last 0xFF keeps the search linear in a run of them.
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xd0-\xd7\xff])")


def jpeg_segments(data: bytes):
    """(marker, start, end, gap) of each segment after SOI, up to EOI: `start` at its 0xFF, `end` past its
    payload (a scan's: past its entropy data, to the next marker), `gap` the bytes skipped before it
    (fill bytes, strays). Every step moves forward, so a hostile file costs one pass."""
    pos = 2
    while (m := _JPEG_MARKER.search(data, pos)) is not None:
        marker, start = m.group(1)[0], m.start()
        end = m.end()
        if marker not in (0x01, 0xD8, 0xD9):  # TEM, a repeated SOI and EOI have no length
            end = max(end, start + 2 + int.from_bytes(data[start + 2:start + 4], "big"))
            if marker == 0xDA:
                end = nxt.start() if (nxt := _JPEG_MARKER.search(data, end)) else len(data)
        yield marker, start, end, start - pos
        if marker == 0xD9:
            return
        pos = end


def jpeg_scan_only(data: bytes) -> bytes:
    """The JPEG reduced to what its pixels come from (SOI, tables, frame header, scans, EOI): no APPn,
    COM or stray bytes between segments, whose harmless warnings (an unknown JFIF revision, a bad ICC
    profile, stray bytes in the header) would stop a strict decode before the scan is read. A
    sequential frame's scans get the parameters libjpeg would reset them to (Samsung phones write
    others; libjpeg warns and decodes every pixel)."""
    out, sequential = [b"\xff\xd8"], True
    for marker, start, end, _ in jpeg_segments(data):
        segment = data[start:end]
        if marker in _JPEG_FRAME:
            sequential = marker in _JPEG_SEQUENTIAL
        if marker == 0xDA and sequential and (header := 2 + int.from_bytes(segment[2:4], "big")) >= 9:
            segment = segment[:header - 3] + b"\x00\x3f\x00" + segment[header:]
        if marker in _JPEG_DECODING or marker == 0xDA:
            out.append(segment)
    out.append(b"\xff\xd9")
    return b"".join(out)


def check_jpeg_scan(data: bytes) -> None:
    """Every pixel of a JPEG comes from its scan data, or CorruptImage: its scans entropy-decoded by
    libjpeg-turbo at the smallest DCT scale (1/8), stopping on the first warning."""
    try:
        simplejpeg.decode_jpeg(jpeg_scan_only(data), strict=True, min_height=1, min_width=1, min_factor=8)
    except ValueError as e:
        reason = str(e).lower()
        if any(m in reason for m in _JPEG_UNVERIFIED) and _JPEG_COMPLETE not in reason:
            log.info("JPEG with missing or unverifiable pixel data: %s", e)
            raise CorruptImage("the JPEG's pixel data is truncated or corrupt") from None
        log.info("JPEG decoder message that costs no pixels (accepted): %s", e)


def _orientation(img: Image.Image) -> int:
    """Called after load() only, or on a JPEG (whose EXIF is in the header): a PNG's getexif()
    loads the pixels to find a late eXIf chunk, and a decode error swallowed there once left a
    half-decoded image that the next load() took for complete."""
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # EXIF Pillow cannot parse: the image is as stored
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
    jpeg = img.format in ("JPEG", "MPO")  # MPO: a JPEG with more pictures after it (phones' HDR, 3D)
    w, h = img.size  # as declared: a JPEG's draft() changes img.size
    try:
        if jpeg:
            check_jpeg_scan(data)
        elif img.format == "PNG":
            check_png_stream(data)

        def sizes() -> tuple[tuple[int, int], tuple[int, int]]:
            """The model's (w, h), and the same as stored (before EXIF orientation)."""
            transposed = _orientation(img) in _TRANSPOSED
            size = model_size(*((h, w) if transposed else (w, h)))
            return size, ((size[1], size[0]) if transposed else size)

        img.seek(0)
        if model_size is not None and jpeg:
            img.draft("RGB", sizes()[1])
        img.load()
        if model_size is None:
            return to_rgb(_upright(img))
        size, stored = sizes()
        img = to_rgb(_upright(_shrink(img, stored)))
        return img if img.size == size else img.resize(size, Image.Resampling.BICUBIC)
    except AigdError:
        raise
    except MemoryError:
        raise ImageTooLarge("not enough memory to decode this image") from None
    except Exception as e:  # Pillow's decoders raise many types (OSError, ValueError, struct.error, ...)
        log.info("undecodable %s image: %s: %s", img.format, type(e).__name__, e)
        raise CorruptImage(f"cannot decode the {img.format} image: the data is truncated or corrupt") from None
