"""`aigd` command line: build the tiny model, write demo data, score images (one by one, locally or
through the HTTP API, or in batch)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path

import yaml

from aigd import cli_explain, cli_lifecycle
from aigd import config as C
from aigd.errors import AigdError

EXAMPLES = {
    "tiny-model": ["aigd tiny-model --out .aigd/tiny-qwen2.5-vl"],
    "demo-data": ["aigd demo-data --config configs/demo_data.yaml",
                  "aigd demo-data --config configs/demo_data.yaml rows_per_class=50"],
    "score": ["aigd score --adapter .aigd/adapters/method2 photo.jpg other.png",
              "aigd score --adapter m1=.aigd/adapters/method1 --adapter m2=.aigd/adapters/method2 photo.jpg",
              "aigd score --api http://127.0.0.1:8000 photo.jpg other.png",
              "AIGD_API_KEY=KEY aigd score --api https://aigd.example.com --adapter method1 photo.jpg"],
    "score-batch": ["aigd score-batch --config configs/eval_demo.yaml --input FOLDER_OR_PARQUET --out scores.parquet",
                    "aigd score-batch --config configs/eval_demo.yaml --input FOLDER --out scores.jsonl "
                    "--batch-size 8"],
    **cli_explain.EXAMPLES,
    **cli_lifecycle.EXAMPLES,
}

OVERRIDES = "dotted config overrides, KEY=VALUE (e.g. model.load_in_4bit=false)"

SCORE_HELP = """Print one JSON answer per image file: P(fake), label, threshold and the adapter's version
(with several adapters, the ensemble's verdict and each member's answer), scored here or by a
running API (--api). A file that cannot be scored gets {"image": ..., "error": {"code", "message"}}.

exit status: 0 every image scored; 1 some image failed (its line holds the error); 2 usage error:
bad arguments, an unusable adapter, or an API that is unreachable or refuses the key (scoring
stops there)."""

SCORE_BATCH_HELP = """Score a folder or parquet into one row per image (.parquet or .jsonl, written as it goes);
an unreadable image gets a row with the reason and no scores.

exit status: 0 output written; 2 usage error (bad arguments, config, --input or --out), reported
before the model loads."""


class UsageError(Exception):
    """Arguments that cannot work together, or an API that refuses the whole call."""


def _examples(*names: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for n in names for line in EXAMPLES[n])


def _version() -> str:
    try:
        return metadata.version("aigd")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _tiny(args) -> None:
    from aigd.dev.tiny_model import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))


def _demo_data(args) -> None:
    from aigd.dev.demo_data import write_demo_data

    cfg = C.load(C.DemoDataConfig, args.config, args.overrides)
    out = write_demo_data(cfg)
    print(out)
    print((out / "DEMO_DATA.json").read_text())


def scoring_config(adapters: list[str], model: str | None, build_tiny: bool = False) -> C.ScoringConfig:
    """A ScoringConfig from adapter folders alone: the base, its revision and quantization and the
    image policy come from their manifests, so nothing is re-typed (`--model` picks another copy)."""
    from aigd.manifest import read_manifest
    from aigd.registry import resolve

    named = dict(a.split("=", 1) if "=" in a else (resolve(a).name, a) for a in adapters)
    base = read_manifest(next(iter(named.values())))["base"]
    model_cfg = C.ModelConfig(name_or_path=model or base["name_or_path"], revision=base.get("revision"),
                              load_in_4bit=base.get("quantization") is not None,
                              build_tiny=build_tiny)
    return C.ScoringConfig(model=model_cfg, adapters=named)


def _error(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _local_answers(args):
    """(image, answer or error) per file, from a Scorer in this process."""
    from aigd.provenance import origin
    from aigd.scorer import Scorer

    cfg = scoring_config(args.adapter, args.model, args.build_tiny)
    scorer = Scorer(cfg)
    limits = C.DecodeLimits.preset("batch")
    for path in args.images:
        try:
            data = Path(path).read_bytes()
            answer = scorer.answers([scorer.prepare(data, limits)], cfg.ensemble)[0]
            yield path, {**answer, **origin(data, cfg.provenance)}
        except (AigdError, OSError) as e:
            yield path, _error(getattr(e, "code", "unreadable"), str(e))


# The API refuses the call itself, not the image: no other image would fare better.
WHOLE_CALL = (None, 401, 403, 404, 405)


def _api_answers(args):
    """(image, answer or error) per file, from the HTTP API: one adapter, or its ensemble."""
    from aigd.client import API_KEY_ENV, ApiError, Client

    if len(args.adapter or []) > 1 or args.model:
        raise UsageError("with --api, --adapter names one of the API's adapters (none: its ensemble); "
                         "--model is for local scoring")
    client = Client(args.api, args.api_key or os.environ.get(API_KEY_ENV))
    adapter = args.adapter[0] if args.adapter else None
    for path in args.images:
        try:
            answer = client.score(Path(path).name, Path(path).read_bytes(), adapter)
        except OSError as e:
            yield path, _error("unreadable", str(e))
        except ApiError as e:
            if e.status in WHOLE_CALL:
                raise UsageError(str(e)) from None
            yield path, _error(e.code, e.message)
        else:
            answer.pop("timing", None)  # server-side latency: local answers have none, the shapes stay equal
            yield path, answer


def _score(args) -> int:
    """Print one JSON answer per image file, the same answer the HTTP API gives."""
    if not args.api and not args.adapter:
        raise UsageError("name an adapter folder (--adapter DIR) or a running API (--api URL)")
    failed = 0
    for path, answer in (_api_answers(args) if args.api else _local_answers(args)):
        print(json.dumps({"image": path, **answer}), flush=True)
        failed += "error" in answer
    return 1 if failed else 0


def _score_batch(args) -> None:
    """Score a folder or parquet of images into one row per image."""
    from aigd.batch_score import score_path

    cfg = C.load(C.EvalConfig, args.config, args.overrides)
    print(json.dumps(score_path(cfg, args.input, args.out, args.batch_size)))


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _subcommand(sub, name: str, fn, summary: str, description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=description or summary, epilog=_examples(name),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if fn is not None:
        p.set_defaults(fn=fn)
    return p


def _add_score(sub) -> None:
    s = _subcommand(sub, "score", _score, "print a verdict and P(fake) per image file (JSON lines)", SCORE_HELP)
    s.add_argument("--adapter", action="append",
                   help="exported adapter folder, or NAME=FOLDER; repeat for an ensemble. With --api: the name "
                        "of one of the API's adapters (default: its ensemble)")
    s.add_argument("--model", default=None, help="the base's folder (default: the one in the adapter's manifest)")
    s.add_argument("--api", metavar="URL", help="score through this running API instead of loading the model")
    s.add_argument("--api-key", help="the API's key (default: $AIGD_API_KEY, which keeps it out of `ps`)")
    s.add_argument("--build-tiny", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("images", nargs="+")


def _add_score_batch(sub) -> None:
    b = _subcommand(sub, "score-batch", _score_batch, "score a folder or parquet into parquet/JSONL, one row per image",
                    SCORE_BATCH_HELP)
    b.add_argument("--config", required=True, help="an eval config (model, image policy, adapters)")
    b.add_argument("--input", required=True, help="image folder or SID_Set-format parquet folder/file")
    b.add_argument("--out", required=True, help="output .parquet or .jsonl")
    b.add_argument("--batch-size", type=_positive_int, default=16)
    b.add_argument("overrides", nargs="*", help=OVERRIDES)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="aigd", description="Detect AI-generated images.",
                                 epilog=_examples(*EXAMPLES), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = _subcommand(sub, "tiny-model", _tiny, "build the offline tiny Qwen2.5-VL folder")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    d = _subcommand(sub, "demo-data", _demo_data, "write the SID_Set-format demo dataset")
    d.add_argument("--config", default=None)
    d.add_argument("overrides", nargs="*", help=OVERRIDES)
    _add_score(sub)
    _add_score_batch(sub)
    cli_explain.add_command(sub, _subcommand)
    cli_lifecycle.add_commands(sub, _subcommand)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `a.b=c` overrides may also follow the options (argparse takes positionals in one run).
    if extra and isinstance(getattr(args, "overrides", None), list) and \
            all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    """The exit status: 0 done, 1 some image failed (`score`), 2 the command could not run."""
    args = parse_args(argv)
    from aigd.batch_score import OutputError  # after parsing: `--version` and `--help` need no pyarrow
    from aigd.sources import DataError

    try:
        return args.fn(args) or 0
    except AigdError as e:
        message = f"{e.code}: {e}"
    except C.ConfigError as e:
        message = f"config error: {e}"
    except yaml.YAMLError as e:
        message = f"config is not valid YAML: {e}"
    except (UsageError, DataError, OutputError, OSError) as e:
        message = str(e)
    print(f"aigd {args.cmd}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
