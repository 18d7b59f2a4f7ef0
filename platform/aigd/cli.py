"""`aigd` command line: build the tiny model, write demo data, score images (one by one or in batch)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aigd import config as C


def _tiny(args) -> None:
    from aigd.tiny_model import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))


def _demo_data(args) -> None:
    from aigd.demo_data import write_demo_data

    cfg = C.load(C.DemoDataConfig, args.config, args.overrides)
    out = write_demo_data(cfg)
    print(out)
    print((out / "DEMO_DATA.json").read_text())


def _score(args) -> None:
    """Score image files with the base model (+ optional adapter): one forward pass per batch."""
    import torch

    from aigd.images import decode
    from aigd.manifest import read_manifest
    from aigd.model import load_base
    from aigd.prompt import label_token_ids, model_batch
    from aigd.scoring import score_batch

    model_cfg = C.ModelConfig(name_or_path=args.model, load_in_4bit=False, build_tiny=args.build_tiny)
    policy = C.load(C.ImagePolicy, None, args.image)
    model, processor, _ = load_base(model_cfg, torch.device("cpu"), training=False)
    temperature = 1.0
    if args.adapter:
        from peft import PeftModel

        temperature = read_manifest(args.adapter)["calibration"]["temperature"]
        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    label_ids = label_token_ids(processor.tokenizer)
    for path in args.images:
        try:
            img = decode(Path(path).read_bytes())
        except Exception as e:
            print(json.dumps({"image": path, "error": str(e)}))
            continue
        batch = model_batch(processor, [img], policy)
        p = float(score_batch(model, batch, label_ids, temperature)[0])
        print(json.dumps({"image": path, "label": "fake" if p >= 0.5 else "real", "p_fake": round(p, 4)}))


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
    s = sub.add_parser("score", help="print a verdict and P(fake) per image file")
    s.add_argument("--model", required=True)
    s.add_argument("--adapter", default=None)
    s.add_argument("--build-tiny", action="store_true")
    s.add_argument("--image", action="append", default=[], help="image policy override, e.g. max_pixels=19600")
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


if __name__ == "__main__":
    main()
