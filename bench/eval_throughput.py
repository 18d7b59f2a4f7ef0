"""Evaluation throughput against its scoring floor: jobs/evaluate.py's scoring stage (Ray Data: planned
rows, decode + 11 perturbations, an actor pool of Scorers) vs the same forward passes in a tight loop.

    make train-demo && .venv/bin/python bench/eval_throughput.py --json            # test split, ~1 min
    .venv/bin/python bench/eval_throughput.py --split all --json                    # ~2,000 images, ~3 min

  job_images_per_s      (images x perturbations) scored per second by the job's scoring stage, Ray
                        Data start-up included (what a user waits for)
  first_batch_s         start-up: planning, the Scorer actor loading the base and every adapter
  job_steady_images_per_s   the same after the first scored batch
  floor_images_per_s    the same prepared arrays through Scorer.pair_logits for every adapter, batch
                        by batch in one process with the job's torch thread count: no reading, no
                        decoding (the split's first --floor-images images)
  ratio                 job steady / floor (goal >= 0.7); ratio_with_startup: job / floor
  expand_ms_per_image   CPU to read and decode one image and make its prepared perturbed copies
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "jobs")]
for key, value in {"AIGD_HOME": str(REPO / ".aigd"), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)


def floor(cfg, split: str, threads: int, max_images: int) -> dict:
    """Tight-loop figures on the split's first `max_images` images, in this process, without Ray."""
    import pyarrow as pa
    import torch

    from aigd import evaluation as E
    from aigd.data import ROWS_PER_TASK
    from aigd.sampling import Catalog
    from aigd.scorer import Scorer
    from aigd.sources import resolve_source, row_blocks, shards

    torch.set_num_threads(threads)
    data = resolve_source(cfg.data)
    kept = Catalog.read(data).select(split).slice(0, max_images)
    files = shards(data)
    t0 = time.perf_counter()
    parts = [E.expand_block(b, data, files, list(cfg.perturbations), cfg.image) for b in row_blocks(kept, ROWS_PER_TASK)]
    expand_s = time.perf_counter() - t0
    arrays = [a for p in parts for a in p["pixels"]]
    scorer = Scorer(cfg)
    for name in cfg.adapters:  # warm up
        scorer.pair_logits(arrays[:cfg.batch_size], name)
    t0 = time.perf_counter()
    for i in range(0, len(arrays), cfg.batch_size):
        for name in cfg.adapters:
            scorer.pair_logits(arrays[i:i + cfg.batch_size], name)
    seconds = time.perf_counter() - t0
    return {"floor_arrays": len(arrays), "floor_s": round(seconds, 2),
            "floor_images_per_s": round(len(arrays) / seconds, 1),
            "expand_ms_per_image": round(expand_s / max(1, kept.num_rows) * 1000, 1)}


def job(cfg, split: str) -> dict:
    """The job's scoring stage on a fresh local Ray (already initialised), consumed like evaluate.score."""
    import evaluate
    t0 = time.perf_counter()
    n, first = 0, None
    for batch in evaluate.scoring_dataset(cfg, evaluate.catalog(cfg), split, list(cfg.perturbations)).iter_batches(
            batch_size=None, batch_format="numpy"):  # blocks as they arrive
        n += len(batch["label"])
        if first is None:
            first = (time.perf_counter() - t0, n)
    seconds = time.perf_counter() - t0
    return {"arrays": n, "job_s": round(seconds, 2), "job_images_per_s": round(n / seconds, 1),
            "first_batch_s": round(first[0], 2),
            "job_steady_images_per_s": round((n - first[1]) / (seconds - first[0]), 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs/eval_demo.yaml"))
    ap.add_argument("--split", help="default: the config's split (test); `all` for every readable row")
    ap.add_argument("--floor-images", type=int, default=300)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import ray

    import evaluate

    cfg = evaluate.parse_args(["--config", args.config])
    split = args.split or cfg.split
    from bench.serve_load import require_adapters

    require_adapters({"adapters": cfg.adapters})
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "jobs"), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    evaluate.configure_execution(cfg.data)
    result = {"split": split, "perturbations": len(cfg.perturbations), "adapters": len(cfg.adapters), **job(cfg, split)}
    ray.shutdown()
    result["images"] = result["arrays"] // len(cfg.perturbations)
    result.update(floor(cfg, split, max(1, int(cfg.scorer_cpus)), args.floor_images))  # the actor's thread count
    result["floor_torch_threads"] = max(1, int(cfg.scorer_cpus))
    result["ratio"] = round(result["job_steady_images_per_s"] / result["floor_images_per_s"], 2)
    result["ratio_with_startup"] = round(result["job_images_per_s"] / result["floor_images_per_s"], 2)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
