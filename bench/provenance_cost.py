"""What reading an image's provenance costs, beside decoding it for the model; and what the
decoder's pixel-completeness checks (aigd.images.check_jpeg_scan, check_png_stream) add to a decode.

    .venv/bin/python bench/provenance_cost.py [--runs 20] [--json]

For each kind of file (none, a signed C2PA manifest, XMP, a web UI's parameters, camera EXIF, the
hostile metadata of aigd.dev.provenance_files.HOSTILE, and the most text the default limits read)
it prints the median and max time of `aigd.provenance.read` over --runs reads, the median time of
`aigd.image_view.prepare` (the decode the router does anyway) for the same bytes, and what the
block reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from PIL import Image

from aigd.config import DecodeLimits, ImagePolicy, ProvenanceConfig
from aigd.dev import provenance_files as P
from aigd.image_view import prepare
from aigd.provenance import read


def files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).resize((1024, 768), Image.BILINEAR)
    jpeg = P.encode(img, "JPEG", quality=90)
    out = {"plain_jpeg_1024x768": jpeg, "c2pa_signed_jpeg": P.c2pa_signed(jpeg),
           "xmp_jpeg": P.declare(jpeg, "xmp"), "camera_exif_jpeg": P.declare(jpeg, "camera"),
           "parameters_png": P.declare(P.encode(img, "PNG"), "generator_text")}
    out.update({f"hostile_{name}": make(img) for name, make in P.HOSTILE.items()})
    out["most_text_the_limits_read"] = P.slow_to_read(img)  # 60 zTXt chunks of 256 KB
    return out


def check_costs(runs: int) -> list[dict]:
    """prepare() of ordinary files, and the share of it the completeness check takes."""
    from aigd.images import check_jpeg_scan, check_png_stream

    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    cases = {"jpeg_1024x768": (P.encode(base.resize((1024, 768), Image.BILINEAR), "JPEG", quality=90), check_jpeg_scan),
             "jpeg_4000x3000": (P.encode(base.resize((4000, 3000), Image.BILINEAR), "JPEG", quality=90), check_jpeg_scan),
             "png_1024x768": (P.encode(base.resize((1024, 768), Image.BILINEAR), "PNG"), check_png_stream)}
    limits, policy, out = DecodeLimits.preset("serving"), ImagePolicy(), []
    for name, (data, check) in cases.items():
        prepare_ms = statistics.median(timed(lambda: prepare(data, limits, policy), runs))
        check_ms = statistics.median(timed(lambda: check(data), runs))
        out.append({"file": name, "prepare_ms_median": round(prepare_ms, 2), "check_ms_median": round(check_ms, 2),
                    "check_share": round(check_ms / prepare_ms, 3)})
    return out


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cfg, limits, policy = ProvenanceConfig(), DecodeLimits.preset("serving"), ImagePolicy()
    rows = []
    for name, data in files().items():
        read_ms = timed(lambda: read(data, cfg), args.runs)
        decode_ms = timed(lambda: prepare(data, limits, policy), max(3, args.runs // 4))
        block = read(data, cfg)
        rows.append({"file": name, "bytes": len(data), "read_ms_median": round(statistics.median(read_ms), 2),
                     "read_ms_max": round(max(read_ms), 2), "decode_ms_median": round(statistics.median(decode_ms), 2),
                     "declared": block["declared"], "error": block["error"]})
    checks = check_costs(max(5, args.runs // 2))
    if args.json:
        print(json.dumps({"provenance": rows, "completeness_checks": checks}, indent=1))
        return
    print(f"{'file':30s} {'bytes':>9s} {'read ms (median/max)':>21s} {'decode ms':>10s}  declared  error")
    for r in rows:
        print(f"{r['file']:30s} {r['bytes']:9d} {r['read_ms_median']:10.2f} / {r['read_ms_max']:8.2f} "
              f"{r['decode_ms_median']:10.2f}  {r['declared']:8s}  {(r['error'] or '')[:60]}")
    print(f"\n{'decode (prepare) of':30s} {'ms':>9s} {'check ms':>9s} {'share':>6s}")
    for c in checks:
        print(f"{c['file']:30s} {c['prepare_ms_median']:9.2f} {c['check_ms_median']:9.2f} {c['check_share']:6.1%}")


if __name__ == "__main__":
    main()
