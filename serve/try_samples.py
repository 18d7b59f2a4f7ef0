"""Send image files to a running detector app and print each verdict against the truth in its name.

    python serve/try_samples.py --url http://127.0.0.1:8000 .aigd/demo-data/samples/*

Files named real-* or fake-* (as `aigd demo-data` writes its held-out samples) are counted as
right or wrong; "uncertain" answers count as neither. Standard library only: a client needs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def detect(url: str, data: bytes, endpoint: str = "/v1/ensemble") -> dict:
    req = urllib.request.Request(url.rstrip("/") + endpoint, data=data, headers={"content-type": "image/*"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # the API's JSON error body
        return json.loads(e.read())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--endpoint", default="/v1/ensemble", help="/v1/ensemble or /v1/detect?adapter=NAME")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    right = wrong = uncertain = 0
    print(f"{'file':36s} {'truth':6s} {'verdict':9s} {'p_fake':>7s}  threshold [uncertain band]")
    for f in map(Path, args.files):
        answer = detect(args.url, f.read_bytes(), args.endpoint)
        truth = f.name.split("-", 1)[0] if f.name.split("-", 1)[0] in ("real", "fake") else "?"
        if "error" in answer:
            print(f"{f.name[:36]:36s} {truth:6s} error: {answer['error']['message']}")
            continue
        label = answer["label"]
        band = answer.get("uncertain_band")
        print(f"{f.name[:36]:36s} {truth:6s} {label:9s} {answer['p_fake']:7.3f}  {answer['threshold']:.3f} "
              f"{'[%.3f, %.3f)' % tuple(band) if band else ''}")
        if label == "uncertain":
            uncertain += 1
        elif truth != "?":
            right, wrong = right + (label == truth), wrong + (label != truth)
    answered = right + wrong
    print(f"\n{right} of {answered} answered correctly ({right / max(1, answered):.0%}), {uncertain} uncertain")
    return 0 if answered else 1


if __name__ == "__main__":
    sys.exit(main())
