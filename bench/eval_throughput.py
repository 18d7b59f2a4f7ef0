"""Evaluation throughput against its scoring floor: jobs/evaluate.py's scoring stage (Ray Data: read,
decode + 11 perturbations, an actor pool of Scorers) vs the same forward passes in a tight loop.

    make train-demo && .venv/bin/python bench/eval_throughput.py --json       # ~1 minute on 2 CPUs

  job_images_per_s    (images x perturbations) scored per second by the job's scoring stage, Ray
                      Data start-up included (what a user waits for)
  floor_images_per_s  the same prepared arrays through Scorer.pair_logits for every adapter, batch
                      by batch in one process with the job's torch thread count: no reading, no decoding
  ratio               job / floor (goal >= 0.7)
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


def floor(cfg, threads: int) -> tuple[int, float]:
    """(arrays scored, seconds) for the tight loop over the split's prepared images."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from aigd import robustness as E
    from aigd.sampling import select_rows
    from aigd.scorer import Scorer
    from aigd.sources import parquet_files, resolve_source

    torch.set_num_threads(threads)
    data = resolve_source(cfg.data)
    fs, files = parquet_files(data.path)
    table = select_rows(pq.ParquetDataset(files, filesystem=fs).read(), data, cfg.split)
    rows = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in table.column_names}
    arrays = E.expand(rows, list(cfg.perturbations), cfg.image, data.max_image_pixels)["pixels"]
    scorer = Scorer(cfg)
    for name in cfg.adapters:  # warm up
        scorer.pair_logits(arrays[:cfg.batch_size], name)
    t0 = time.perf_counter()
    for i in range(0, len(arrays), cfg.batch_size):
        for name in cfg.adapters:
            scorer.pair_logits(arrays[i:i + cfg.batch_size], name)
    return len(arrays), time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs/eval_demo.yaml"))
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import ray

    import evaluate

    cfg = evaluate.parse_args(["--config", args.config])
    from bench.serve_load import require_adapters

    require_adapters({"adapters": cfg.adapters})
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "jobs"), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    evaluate.configure_execution(cfg.data)
    t0 = time.perf_counter()
    scores, unreadable = evaluate.score(cfg, cfg.split, list(cfg.perturbations))
    job_s = time.perf_counter() - t0
    ray.shutdown()
    n_job = len(scores["label"])
    threads = max(1, int(cfg.scorer_cpus))  # what Ray gives the actor (OMP_NUM_THREADS)
    n_floor, floor_s = floor(cfg, threads)
    result = {"images": n_job // len(cfg.perturbations), "perturbations": len(cfg.perturbations),
              "adapters": len(cfg.adapters), "job_s": round(job_s, 2), "job_images_per_s": round(n_job / job_s, 1),
              "floor_s": round(floor_s, 2), "floor_images_per_s": round(n_floor / floor_s, 1),
              "floor_torch_threads": threads, "unreadable": unreadable}
    result["ratio"] = round(result["job_images_per_s"] / result["floor_images_per_s"], 2)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
