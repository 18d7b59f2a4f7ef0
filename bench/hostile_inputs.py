"""Hostile images that fit inside the byte caps, and what decoding each costs.

    .venv/bin/python bench/hostile_inputs.py --json

Each case runs `aigd.image_view.prepare` (the one image path of serving, scoring and un-augmented
training) in a fresh process and prints its answer (decoded, or the error code the API would send),
wall time and the process's peak memory above the interpreter's own. The generators are also the
inputs of tests/test_images.py and tests/test_serve.py.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from aigd.dev.demo_data import jpeg_scan_bomb, png_header_bomb

ROOT = Path(__file__).resolve().parents[1]
# An EXIF block whose orientation entry has the wrong type: Pillow's exif_transpose raises
# struct.error on it (found by fuzzing a valid block).
BAD_EXIF = bytes.fromhex("4578696600004d4d002a000000080002014e00020000000443616d0001120003000000010006000000000000")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def progressive_jpeg_scans() -> bytes:
    """~120 KB: a smooth 3000x2000 progressive JPEG with one small scan repeated 5,000 times."""
    return jpeg_scan_bomb(Image.new("RGB", (3000, 2000), (120, 130, 140)))


def rle_bmp(width: int = 4000, height: int = 3000) -> bytes:
    """A few KB of RLE8 delta escapes that Pillow pads out in Python to width x height."""
    runs = bytes([0, 2, 255, 255]) * ((height // 255 + 1) * (width // 255 + 1)) + bytes([0, 1])
    offset = 14 + 40 + 1024
    return (b"BM" + struct.pack("<IHHI", offset + len(runs), 0, 0, offset)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(runs), 0, 0, 256, 0)
            + bytes(1024) + runs)


def png_many_chunks(n: int = 200_000) -> bytes:
    """A valid 300x300 PNG behind n empty text chunks (12 bytes each)."""
    raw = zlib.compress(b"".join(b"\x00" + bytes(900) for _ in range(300)))
    ihdr = struct.pack(">IIBBBBB", 300, 300, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"tEXt", b"a\x00") * n
            + _chunk(b"IDAT", raw) + _chunk(b"IEND", b""))


def png_16bit(side: int = 4000) -> bytes:
    """A 16-bit greyscale ramp of side^2 pixels that compresses to ~100 KB (float64 would be ~27 B/px)."""
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // side).astype(np.uint16)
    return _save(Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()), "PNG", compress_level=9)


def webp_animated_canvas(side: int = 6000) -> bytes:
    """A two-frame animated WebP of a flat 36 MP canvas: a few KB."""
    frames = [Image.new("RGB", (side, side), c) for c in ((10, 10, 10), (20, 20, 20))]
    return _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


def jpeg_bad_exif() -> bytes:
    return _save(Image.new("RGB", (160, 112), (90, 120, 30)), "JPEG", exif=BAD_EXIF)


def jpeg_48mp(width: int = 8000, height: int = 6000) -> bytes:
    """An ordinary large camera JPEG: accepted, and decoded at 1/8 scale."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (height // 100, width // 100, 3), dtype=np.uint8))
    return _save(small.resize((width, height), Image.Resampling.BILINEAR), "JPEG", quality=85)


def _textured(width: int = 1024, height: int = 768) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR)


def jpeg_scan_cut_end_kept() -> bytes:
    """A JPEG cut mid-scan with its end marker put back: libjpeg invents the rest and only warns."""
    data = _save(_textured(), "JPEG", quality=90)
    return data[: len(data) // 3] + b"\xff\xd9"


def jpeg_header_declares_more() -> bytes:
    """The frame header claims four times the rows the scan data holds."""
    data = bytearray(_save(_textured(), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    height = int.from_bytes(data[sof + 5:sof + 7], "big")
    data[sof + 5:sof + 7] = (height * 4).to_bytes(2, "big")
    return bytes(data)


def png_idat_not_zlib() -> bytes:
    """A PNG whose IDAT payload is random bytes (with a valid CRC): no pixel in it can be read."""
    raw = np.random.default_rng(2).bytes(30_000)
    ihdr = struct.pack(">IIBBBBB", 600, 400, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")


def png_header_declares_more() -> bytes:
    """IHDR claims twice the rows the (valid, complete) zlib stream holds."""
    img = _save(_textured(600, 400), "PNG")
    end = 8 + 8 + 13 + 4
    ihdr = struct.pack(">IIBBBBB", 600, 800, 8, 2, 0, 0, 0)
    return img[:8] + _chunk(b"IHDR", ihdr) + img[end:]


def gif_cut_trailer_kept() -> bytes:
    data = _save(_textured().convert("P"), "GIF")
    return data[: len(data) // 2] + b"\x3b"


def webp_cut() -> bytes:
    data = _save(_textured(), "WEBP", quality=80)
    return data[: len(data) // 2]


def _harmless_warnings(data: bytes) -> bytes:
    """What real cameras and editors leave that libjpeg warns about without losing a pixel: stray
    bytes before a table, an unknown JFIF revision, junk between the scan and the end marker."""
    jfif = data.index(b"JFIF\x00") + 5
    data = data[:jfif] + b"\x07" + data[jfif + 1:]
    dqt = data.index(b"\xff\xdb")
    data = data[:dqt] + b"\x00\x12\x34" + data[dqt:]
    return data[:-2] + b"\x00\x00\x00" + data[-2:]


def jpeg_harmless_warnings() -> bytes:
    return _harmless_warnings(_save(_textured(), "JPEG", quality=90))


def jpeg_harmless_warning_then_cut() -> bytes:
    """A cut scan behind a harmless warning: a strict decode stopping at the first warning misses it."""
    return _harmless_warnings(jpeg_scan_cut_end_kept())


def mpo_first_picture_cut() -> bytes:
    """A multi-picture JPEG (what phones write for HDR or depth) whose first picture's scan is cut."""
    img = _textured()
    data = _save(img, "MPO", save_all=True, append_images=[img.rotate(180)])
    sos = data.index(b"\xff\xda")
    return data[:sos + (len(data) // 2 - sos) // 2] + b"\xff\xd9"


def jpeg_fill_runs_between_comments(runs: int = 28) -> bytes:
    """69,000 fill bytes before each of `runs` tiny comments: no single run is long, Pillow still steps
    through every byte in Python."""
    data = _save(_textured(), "JPEG", quality=90)
    dqt = data.index(b"\xff\xdb")
    return data[:dqt] + (b"\xff" * 69_000 + b"\xfe\x00\x03x") * runs + data[dqt:]


def jpeg_200k_comments() -> bytes:
    """200,000 four-byte comments after the scan (800 KB): one Python step each for any reader."""
    data = _save(_textured(), "JPEG", quality=90)
    return data[:-2] + b"\xff\xfe\x00\x02" * 200_000 + data[-2:]


def jpeg_fill_run_in_scan() -> bytes:
    """70,000 0xFF bytes then a stuffing 0x00 inside the entropy data: a marker search that restarts
    at every 0xFF of the run is quadratic in it (36 s with the first version of the scan check)."""
    data = _save(_textured(), "JPEG", quality=90)
    mid = len(data) // 2
    return data[:mid] + b"\xff" * 70_000 + b"\x00" + data[mid:]


def jpeg_odd_sequential_sos() -> bytes:
    """A baseline JPEG whose scan header says Ss 1, Se 62, Al 1 (as some Samsung phones write): libjpeg
    warns, resets them and decodes every pixel, so it must be scored."""
    data = bytearray(_save(_textured(), "JPEG", quality=90))
    sos = data.index(b"\xff\xda")
    end = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    data[end - 3:end] = b"\x01\x3e\x01"
    return bytes(data)


# Files whose pixel data is missing or unreadable: a verdict on them would be a verdict on decoder
# padding, at whatever scale they are decoded.
MISSING_PIXELS = {
    "jpeg_harmless_warning_then_cut": jpeg_harmless_warning_then_cut,
    "mpo_first_picture_cut": mpo_first_picture_cut,
    "jpeg_scan_cut_end_kept": jpeg_scan_cut_end_kept,
    "jpeg_header_declares_4x_rows": jpeg_header_declares_more,
    "png_idat_not_zlib": png_idat_not_zlib,
    "png_header_declares_2x_rows": png_header_declares_more,
    "gif_cut_trailer_kept": gif_cut_trailer_kept,
    "webp_cut_in_half": webp_cut,
}

# name -> (generator, the API's answer: "ok" or the error code)
CASES = {
    "progressive_jpeg_5000_scans": (progressive_jpeg_scans, "image_rejected"),
    "rle_bmp_12mp": (rle_bmp, "unsupported_media_type"),
    "png_200k_chunks": (png_many_chunks, "image_rejected"),
    "png_16bit_16mp": (png_16bit, "ok"),
    "webp_animated_36mp_canvas": (webp_animated_canvas, "image_too_large"),
    "png_header_30000x30000": (png_header_bomb, "image_too_large"),
    "jpeg_bad_exif": (jpeg_bad_exif, "ok"),
    "jpeg_48mp_camera": (jpeg_48mp, "ok"),
    "jpeg_harmless_warnings": (jpeg_harmless_warnings, "ok"),
    "jpeg_odd_sequential_sos": (jpeg_odd_sequential_sos, "ok"),
    "jpeg_fill_runs_between_comments": (jpeg_fill_runs_between_comments, "image_rejected"),
    "jpeg_200k_comments": (jpeg_200k_comments, "image_rejected"),
    "jpeg_fill_run_in_scan": (jpeg_fill_run_in_scan, "ok"),  # libjpeg reads the run as fill: no warning, no pixel lost
    **{name: (make, "corrupt_image") for name, make in MISSING_PIXELS.items()},
}


def _measure_one(name: str, path: Path) -> dict:
    """In this (fresh) process: prepare the case's bytes, time it, peak RSS above the baseline."""
    import resource
    import time

    from aigd.config import DecodeLimits, ImagePolicy
    from aigd.errors import AigdError
    from aigd.image_view import prepare

    data = path.read_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        answer, shape = "ok", list(prepare(data, DecodeLimits.preset("serving"), ImagePolicy()).shape)
    except AigdError as e:
        answer, shape = e.code, None
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": name, "bytes": len(data), "answer": answer, "expected": CASES[name][1], "shape": shape,
            "seconds": round(seconds, 4), "peak_mb_above_start": round((peak - before) / 1024, 1)}


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_measure_one(args.one[0], Path(args.one[1]))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, _) in CASES.items():
            path = Path(tmp) / name
            path.write_bytes(make())
            out = subprocess.run([sys.executable, __file__, "--one", name, str(path)], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {"cases": rows, "all_as_expected": all(r["answer"] == r["expected"] for r in rows),
              "max_seconds": max(r["seconds"] for r in rows),
              "max_peak_mb_above_start": max(r["peak_mb_above_start"] for r in rows)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in rows:
            print(f"{r['case']:30s} {r['bytes']:>10,d} B  {r['answer']:24s} {r['seconds']:7.3f} s "
                  f"{r['peak_mb_above_start']:7.1f} MB")


if __name__ == "__main__":
    main()
