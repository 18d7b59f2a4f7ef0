"""`aigd explain`: where the evidence for a verdict is, for one image, made here or by a running API."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from aigd import config as C

EXAMPLES = {
    "explain": ["aigd explain --adapter .aigd/adapters/method2 photo.jpg --out overlay.png",
                "aigd explain --adapter m1=.aigd/adapters/method1 --adapter m2=.aigd/adapters/method2 "
                "--method input_x_gradient photo.jpg",
                "aigd explain --api http://127.0.0.1:8000 --adapter method1 photo.jpg --json"],
}

HELP = """Score one image and show where the evidence is: a map over the model's 28-px tokens of how
much each region drives the Fake-minus-Real margin (several adapters: the ensemble's weighted map),
its strongest regions, and an overlay PNG (--out). Made here, or by a running API (--api).

exit status: 0 explained; 2 the image, an adapter or the API could not be used."""


def _local(args, data: bytes) -> dict:
    from aigd.cli import scoring_config
    from aigd.explain import explain
    from aigd.provenance import origin
    from aigd.scorer import Scorer

    cfg = scoring_config(args.adapter, args.model, args.build_tiny)
    scorer = Scorer(cfg)
    image = scorer.prepare(data, C.DecodeLimits.preset("batch"))
    adapter = next(iter(cfg.adapters)) if len(cfg.adapters) == 1 else "ensemble"
    answer = explain(scorer, image, adapter, list(cfg.adapters), cfg.ensemble, C.ExplainConfig(), args.method)
    return {**answer, **origin(data, cfg.provenance)}


def _remote(args, data: bytes) -> dict:
    from aigd.cli import UsageError
    from aigd.client import API_KEY_ENV, ApiError, Client

    if len(args.adapter or []) > 1 or args.model:
        raise UsageError("with --api, --adapter names one of the API's adapters (none: its ensemble)")
    try:
        answer = Client(args.api, args.api_key or os.environ.get(API_KEY_ENV), timeout_s=120).explain(
            Path(args.image).name, data, args.adapter[0] if args.adapter else None, args.method)
    except ApiError as e:
        raise UsageError(str(e)) from None
    answer.pop("timing", None)
    return answer


def summary(image: str, answer: dict, overlay: str | None) -> str:
    """What a person reads: the verdict, the strongest regions, the map as digits 0-9."""
    e = answer["explanation"]
    version = answer.get("model", {}).get("version") or ", ".join(
        f"{n} {m['model']['version']}" for n, m in answer.get("members", {}).items())
    from aigd.ui import box_text

    lines = [f"{image}: {answer['label'].upper()}  P(fake) {answer['p_fake']:.3f}  ({answer['adapter']}: {version})",
             f"where the evidence for fake is ({e['method']}):"]
    for i, b in enumerate(e["region_boxes"], 1):
        lines.append(f"  {i}. {box_text(b)}   peak {b['score']:.2f}, {100 * b['area']:.0f} % of the image")
    if not e["region_boxes"]:
        lines.append("  none: no region pushes the answer towards fake")
    lines.append(f"map ({e['grid_shape'][0]} x {e['grid_shape'][1]} tokens, 0-9 = share of the peak):")
    lines += ["  " + " ".join(str(min(9, int(v * 10))) for v in row) for row in e["grid"]]
    if overlay:
        lines.append(f"overlay: {overlay}")
    return "\n".join(lines)


def run(args) -> int:
    from aigd.cli import UsageError

    if not args.api and not args.adapter:
        raise UsageError("name an adapter folder (--adapter DIR) or a running API (--api URL)")
    data = Path(args.image).read_bytes()
    answer = _remote(args, data) if args.api else _local(args, data)
    png = base64.b64decode(answer["explanation"].pop("overlay_png_base64"))
    if args.out:
        Path(args.out).write_bytes(png)
    if args.json:
        print(json.dumps({"image": args.image, **answer, "overlay": args.out}))
    else:
        print(summary(args.image, answer, args.out))
    return 0


def add_command(sub, subcommand) -> None:
    import argparse

    e = subcommand(sub, "explain", run, "show where in an image the evidence for the verdict is", HELP)
    e.add_argument("--adapter", action="append",
                   help="exported adapter folder or NAME=FOLDER; repeat for the ensemble's map. With --api: one "
                        "of the API's adapters (default: its ensemble)")
    e.add_argument("--method", choices=C.EXPLAIN_METHODS, default=None, help=f"default: {C.ExplainConfig.method}")
    e.add_argument("--out", help="write the overlay PNG here")
    e.add_argument("--json", action="store_true", help="the API's answer as JSON (the overlay in --out, not inline)")
    e.add_argument("--model", default=None, help="the base's folder (default: the one in the adapter's manifest)")
    e.add_argument("--api", metavar="URL", help="ask this running API instead of loading the model")
    e.add_argument("--api-key", help="the API's key (default: $AIGD_API_KEY)")
    e.add_argument("--build-tiny", action="store_true", help=argparse.SUPPRESS)
    e.add_argument("image")
