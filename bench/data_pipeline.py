"""Throughput and memory of the streamed Method-2 preprocessing against the seed's per-image loop.

    python bench/data_pipeline.py                       # table (about 2 minutes on 2 CPUs)
    python bench/data_pipeline.py --repeat 3 --json     # three consecutive measurements, JSON lines
    python bench/data_pipeline.py --n 500 --scale 10

Generates SID_Set-format parquet with 1024-px-wide JPEGs (cached under $AIGD_HOME/bench-data) and
uses configs/method2.yaml's augmentation and pixel budget with the tiny model's processor (the same
Qwen image processor and chat template as the 7B model's). Figures:
  seed_loop_ips  one process doing what the seed's notebook did per image: full decode, flip +
                 jitter + crop 512 in the seed's order, JPEG re-encode, one processor call per image
  pipeline_ips   aigd.data.build_dataset on a fresh local Ray with all CPUs, consumed through the
                 trainer's collate, 10N images, start-up included (planning, actors importing torch
                 and transformers: first_batch_s)
  pipeline_steady_ips   the same run after its first batch
  ratio_to_bound        pipeline_steady_ips / bound_ips: like the tight loop, without start-up
  ratio_to_bound_with_startup   pipeline_ips / bound_ips
  bound_ips      the pipeline's own per-row work (aigd.data.Preprocessor on the planned blocks) in a
                 tight loop in as many single-threaded processes as CPUs, all at once, without Ray
  single_process_x_cpus_ips   the same loop in one process alone, times the number of CPUs
  method2_cpu_ms_per_image      CPU per image at the parallel floor (cpus / bound_ips)
  eval_expand_cpu_ms_per_image  the evaluation job's decode + 11 perturbations per image, same images
  rss_mb_1x/10x  peak PSS of the whole pipeline (driver, GCS, raylet, workers) for N and 10N images
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HEIGHTS = (768, 683, 1024)  # SID_Set's common 1024-wide shapes
SHARD_ROWS = 100


def home() -> Path:
    return Path(os.environ.get("AIGD_HOME", "~/.cache/aigd")).expanduser()


# --------------------------------------------------------------------------- data


def base_images(rng: np.random.Generator) -> list:
    """1024-wide photos with sensor-like noise, so JPEGs have realistic size and decode cost."""
    from PIL import Image

    from aigd.dev.demo_data import source_photos

    out = []
    for i, photo in enumerate(source_photos().values()):
        h = HEIGHTS[i % len(HEIGHTS)]
        img = np.asarray(Image.fromarray(photo).resize((1024, h), Image.Resampling.BICUBIC), dtype=np.int16)
        img = img + rng.integers(-8, 9, img.shape, dtype=np.int16)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def make_data(n_rows: int) -> Path:
    """n_rows balanced real/fake rows in 100-row shards; reused when already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out = home() / "bench-data" / f"rows{n_rows}"
    if (out / "DONE").exists():
        return out
    (out / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    bases = base_images(rng)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("img_id", pa.string()), ("image", image_type), ("mask", image_type),
                        ("width", pa.int32()), ("height", pa.int32()), ("label", pa.int64())])
    for s in range(0, n_rows, SHARD_ROWS):
        rows = []
        for i in range(s, min(s + SHARD_ROWS, n_rows)):
            arr = np.roll(bases[i % len(bases)], int(rng.integers(0, 1024)), axis=1)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
            rows.append({"img_id": f"bench{i:06d}", "image": {"bytes": buf.getvalue(), "path": None},
                         "mask": None, "width": arr.shape[1], "height": arr.shape[0], "label": i % 2})
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "data" / f"train-{s // SHARD_ROWS:05d}.parquet")
    (out / "DONE").write_text("")
    return out


def subset(data: Path, n: int) -> Path:
    """A folder of links to the first n rows' shards, so 1x and 10x read the same files."""
    out = data.parent / f"{data.name}-first{n}"
    out.mkdir(exist_ok=True)
    shards = sorted((data / "data").glob("*.parquet"))[: -(-n // SHARD_ROWS)]
    for f in shards:
        link = out / f.name
        if not link.exists():
            link.symlink_to(f)
    return out


# --------------------------------------------------------------------------- configs


def bench_configs(data_path: Path):
    import dataclasses

    from aigd.config import TrainJobConfig, load

    cfg = load(TrainJobConfig, REPO / "configs/method2.yaml")
    data = dataclasses.replace(cfg.data, source="sid_parquet", path=str(data_path), val_fraction=0.0,
                               test_fraction=0.0, preprocess_cpus=1.0)
    return data, cfg.image, cfg.augment, cfg.optim.batch_size


def processor_path() -> str:
    from aigd.dev.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(home() / "tiny-qwen2.5-vl"))


def rows(data_path: Path, n: int):
    import pyarrow.parquet as pq

    return pq.ParquetDataset(sorted(str(p) for p in data_path.glob("*.parquet"))).read().slice(0, n)


# --------------------------------------------------------------------------- measurements


def seed_loop_ips(data_path: Path, n: int) -> float:
    import torchvision.transforms.v2 as T
    from PIL import Image

    from aigd.batching import encode
    from aigd.data import cached_processor
    from aigd.image_view import prepare_image

    _, policy, aug, _ = bench_configs(data_path)
    proc = cached_processor(processor_path())
    seed_order = T.Compose([T.RandomHorizontalFlip(aug.hflip_p), T.ColorJitter(*aug.color_jitter),
                            T.RandomResizedCrop(aug.crop_size, scale=aug.crop_scale, ratio=aug.crop_ratio)])
    rng = np.random.default_rng(0)
    batch = rows(data_path, n)
    t0 = time.perf_counter()
    for item in batch.column("image").to_pylist():
        img = Image.open(io.BytesIO(item["bytes"])).convert("RGB")
        img = seed_order(img)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(50, 96)))
        img = Image.open(buf).convert("RGB")
        encode(proc, [prepare_image(img, policy)], policy)
    return n / (time.perf_counter() - t0)


def tight_loop(data_path: Path, n: int) -> tuple[int, float]:
    """(images, seconds): the pipeline's own per-row work (aigd.data.Preprocessor: read a block's bytes,
    decode, augment, JPEG, processor) block by block in this process, without Ray."""
    import torch

    from aigd.data import ROWS_PER_TASK, Preprocessor
    from aigd.sampling import Catalog, balance
    from aigd.sources import row_blocks, shards

    torch.set_num_threads(1)  # what a Ray actor with num_cpus=1 gets
    data, policy, aug, batch_size = bench_configs(data_path)
    cat = Catalog.read(data)
    kept = cat.select("train", balance(cat, 0)).slice(0, n)
    work = Preprocessor(data, shards(data), (processor_path(), None), policy, aug, 0, batch_size, "train", None)
    blocks = row_blocks(kept, ROWS_PER_TASK)
    sum(1 for _ in work(blocks[0][:batch_size]))  # first calls build the prompt and the transforms
    t0 = time.perf_counter()
    done = sum(len(out["img_id"]) for block in blocks for out in work(block))
    return done, time.perf_counter() - t0


def eval_expand_ms(data_path: Path, n: int) -> float:
    """CPU per image of the evaluation job's decode stage (aigd.evaluation.expand_block: decode + the
    eval config's perturbations, each prepared to configs/method2.yaml's policy) on these 1024-px
    JPEGs, one process: what sizes the evaluation's CPUs per GPU."""
    from aigd import config as C
    from aigd.evaluation import expand_block
    from aigd.sampling import Catalog
    from aigd.sources import row_blocks, shards

    data, policy, _, _ = bench_configs(data_path)
    perturbations = list(C.load(C.EvalConfig, REPO / "configs/eval_demo.yaml").perturbations)
    blocks = row_blocks(Catalog.read(data).select("all").slice(0, n), 32)
    expand_block(blocks[0][:2], data, shards(data), perturbations, policy)
    t0 = time.perf_counter()
    for block in blocks:
        expand_block(block, data, shards(data), perturbations, policy)
    return (time.perf_counter() - t0) / n * 1000


def bound_ips(data_path: Path, n: int, cpus: int) -> tuple[float, float]:
    """(one process's images/s x cpus, images/s of `cpus` such processes running at once). The second
    is the pipeline's parallel floor: it includes what running every CPU at once costs (shared
    caches and memory bandwidth), but no Ray."""
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        done, seconds = pool.submit(tight_loop, data_path, n).result()
    single = done / seconds * cpus
    with cf.ProcessPoolExecutor(cpus, mp_context=ctx) as pool:
        pool.submit(tight_loop, data_path, 8).result()  # spawn + imports outside the timing below
        futures = [pool.submit(tight_loop, data_path, n) for _ in range(cpus)]
        results = [f.result() for f in futures]
    parallel = sum(d for d, _ in results) / max(s for _, s in results)
    return single, parallel


def run_pipeline(data_path: Path, cpus: int, store_mb: int) -> dict:
    """Child process body: a fresh local Ray, the training pipeline, consumed like the trainer does."""
    import ray

    from aigd.data import Collate, build_dataset, cached_processor, configure_execution
    from aigd.sampling import Catalog, balance

    data, policy, aug, batch_size = bench_configs(data_path)
    path = processor_path()
    to_batch = Collate.of(cached_processor(path))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=store_mb * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    configure_execution(data)
    t0 = time.perf_counter()
    cat = Catalog.read(data)
    ds = build_dataset(cat, "train", (path, None), policy, aug, 0, balance(cat, 0),
                       batch_size=batch_size)
    n, first = 0, None
    for batch in ds.iter_torch_batches(batch_size=batch_size, collate_fn=to_batch):
        n += int(batch["label"].shape[0])
        if first is None:
            first = {"first_batch_s": time.perf_counter() - t0, "first_batch_rows": n}
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"rows": n, "seconds": seconds, **first}


def pss_mb(pid: int) -> float:
    """Proportional set size from smaps_rollup: shared pages (torch's libraries, Ray's object store)
    split between the processes that map them, so the sum over a process tree counts each page once."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tree_pss_mb(proc) -> float:
    import psutil

    total = 0.0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += pss_mb(p.pid)
        except (FileNotFoundError, ProcessLookupError, psutil.NoSuchProcess):
            pass
    return total


def measured_pipeline(data_path: Path, cpus: int, store_mb: int) -> dict:
    """Runs the pipeline in a child process and samples the PSS of its whole process tree."""
    import psutil

    child = subprocess.Popen([sys.executable, __file__, "--child", str(data_path), "--cpus", str(cpus),
                              "--object-store-mb", str(store_mb)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    peak = [0.0]

    def sample():
        proc = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                peak[0] = max(peak[0], tree_pss_mb(proc))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"pipeline child failed with exit code {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mb"] = peak[0]
    return result


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="images in the 1x run (the data holds n x scale)")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--loop-images", type=int, default=120, help="images timed in the single-process loops")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--object-store-mb", type=int, default=2048,
                    help="Ray object store size: streaming keeps memory flat only if the store is bounded")
    ap.add_argument("--repeat", type=int, default=1, help="consecutive measurements, each printed")
    ap.add_argument("--json", action="store_true", help="then one JSON line per measurement")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_pipeline(Path(args.child), args.cpus, args.object_store_mb)))
        return {}

    t0 = time.perf_counter()
    data = make_data(args.n * args.scale)
    print(f"data: {args.n * args.scale} rows of 1024-px JPEGs in {data} ({time.perf_counter() - t0:.0f} s)")
    runs = [measure(data, args) for _ in range(args.repeat)]
    for i, res in enumerate(runs):
        print(f"\nrun {i + 1} of {len(runs)}\n{'figure':26s} {'value':>10s}  goal")
        for k, v in res.items():
            print(f"{k:26s} {v:>10}  {GOALS.get(k, '')}")
    if args.json:
        for res in runs:
            print(json.dumps(res))
    return runs[-1]


GOALS = {"ratio_to_bound": ">= 0.8", "speedup_vs_seed": ">= 2", "rss_ratio_10x_1x": "<= 1.2"}


def measure(data: Path, args) -> dict:
    small, large = subset(data, args.n), subset(data, args.n * args.scale)
    seed = seed_loop_ips(small, args.loop_images)
    single_x_cpus, bound = bound_ips(small, args.loop_images, args.cpus)
    expand_ms = eval_expand_ms(small, 64)
    run_1x = measured_pipeline(small, args.cpus, args.object_store_mb)
    run_10x = measured_pipeline(large, args.cpus, args.object_store_mb)
    pipeline = run_10x["rows"] / run_10x["seconds"]
    steady = (run_10x["rows"] - run_10x["first_batch_rows"]) / (run_10x["seconds"] - run_10x["first_batch_s"])
    res = {
        "cpus": args.cpus, "object_store_mb": args.object_store_mb, "n_1x": run_1x["rows"], "n_10x": run_10x["rows"],
        "seed_loop_ips": round(seed, 2), "bound_ips": round(bound, 2), "single_process_x_cpus_ips": round(single_x_cpus, 2),
        "pipeline_ips": round(pipeline, 2), "first_batch_s": round(run_10x["first_batch_s"], 2),
        "pipeline_steady_ips": round(steady, 2), "pipeline_ips_1x": round(run_1x["rows"] / run_1x["seconds"], 2),
        "ratio_to_bound": round(steady / bound, 3), "ratio_to_bound_with_startup": round(pipeline / bound, 3),
        "speedup_vs_seed": round(pipeline / seed, 2),
        "method2_cpu_ms_per_image": round(args.cpus / bound * 1000, 1), "eval_expand_cpu_ms_per_image": round(expand_ms, 1),
        "rss_mb_1x": round(run_1x["peak_mb"], 1), "rss_mb_10x": round(run_10x["peak_mb"], 1),
    }
    res["rss_ratio_10x_1x"] = round(res["rss_mb_10x"] / res["rss_mb_1x"], 3)
    return res


if __name__ == "__main__":
    main()
