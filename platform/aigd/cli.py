"""`aigd` command line: build the tiny model, write demo data, score images (one by one or in batch)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aigd import config as C
from aigd.errors import AigdError


def _tiny(args) -> None:
    from aigd.tiny_model import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))


def _demo_data(args) -> None:
    from aigd.demo_data import write_demo_data

    cfg = C.load(C.DemoDataConfig, args.config, args.overrides)
    out = write_demo_data(cfg)
    print(out)
    print((out / "DEMO_DATA.json").read_text())


def scoring_config(adapters: list[str], model: str | None, build_tiny: bool = False) -> C.ScoringConfig:
    """A ScoringConfig from adapter folders alone: the base, its revision and quantization and the
    image policy come from their manifests, so nothing is re-typed (`--model` picks another copy)."""
    from aigd.manifest import read_manifest

    named = dict(a.split("=", 1) if "=" in a else (Path(a).name, a) for a in adapters)
    base = read_manifest(next(iter(named.values())))["base"]
    model_cfg = C.ModelConfig(name_or_path=model or base["name_or_path"], revision=base.get("revision"),
                              load_in_4bit=base.get("quantization") is not None,
                              build_tiny=build_tiny)
    return C.ScoringConfig(model=model_cfg, adapters=named)


def _score(args) -> None:
    """Print one JSON answer per image file, the same answer the HTTP API gives."""
    from aigd.scorer import Scorer

    cfg = scoring_config(args.adapter, args.model, args.build_tiny)
    scorer = Scorer(cfg)
    limits = C.DecodeLimits.preset("batch")
    for path in args.images:
        try:
            answer = scorer.answers([scorer.prepare(Path(path).read_bytes(), limits)], cfg.ensemble)[0]
        except (AigdError, OSError) as e:
            print(json.dumps({"image": path, "error": {"code": getattr(e, "code", "unreadable"), "message": str(e)}}))
            continue
        print(json.dumps({"image": path, **answer}))


def _score_batch(args) -> None:
    """Score a folder or parquet of images into one row per image."""
    from aigd.batch_score import score_path

    cfg = C.load(C.EvalConfig, args.config, args.overrides)
    print(json.dumps(score_path(cfg, args.input, args.out, args.batch_size)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="aigd")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny-model", help="build the offline tiny Qwen2.5-VL folder")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_tiny)
    d = sub.add_parser("demo-data", help="write the SID_Set-format demo dataset")
    d.add_argument("--config", default=None)
    d.add_argument("overrides", nargs="*")
    d.set_defaults(fn=_demo_data)
    s = sub.add_parser("score", help="print a verdict and P(fake) per image file (JSON lines)")
    s.add_argument("--adapter", action="append", required=True,
                   help="exported adapter folder, or NAME=FOLDER; repeat for an ensemble")
    s.add_argument("--model", default=None, help="the base's folder (default: the one in the adapter's manifest)")
    s.add_argument("--build-tiny", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("images", nargs="+")
    s.set_defaults(fn=_score)
    b = sub.add_parser("score-batch", help="score a folder or parquet into parquet/JSONL, one row per image")
    b.add_argument("--config", required=True, help="an eval config (model, image policy, adapters)")
    b.add_argument("--input", required=True, help="image folder or SID_Set-format parquet folder/file")
    b.add_argument("--out", required=True, help="output .parquet or .jsonl")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("overrides", nargs="*")
    b.set_defaults(fn=_score_batch)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except C.ConfigError as e:
        sys.exit(f"config error: {e}")
    except AigdError as e:
        sys.exit(f"{e.code}: {e}")


if __name__ == "__main__":
    main()
