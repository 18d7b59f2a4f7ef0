"""Side by side with what users would pick instead, each pair in one run on this machine:

    make train-demo && python bench/peers.py --json              # every part (about 10 minutes on 2 CPUs)
    python bench/peers.py --parts train overhead --json           # some parts: train, overhead, serve, batching

  train     the Method 1 Ray Train job vs TRL's SFTTrainer in one process (bench/peer_trl.py): same tiny
            model, LoRA, data, batch, optimizer and steps; samples/s, wall time with start-up, validation
            AUC of each one's final weights scored by the same function, and both losses on one batch
            before training (the same work, or the comparison is void)
  overhead  the Method 1 job's training samples/s vs a plain loop over the same batches on every core
            (framework_ratio), a 1-thread loop over one worker's batch, and the job's wait for batches
  serve     the Serve app vs one FastAPI + uvicorn process around the same Scorer (bench/peer_server.py),
            closed-loop clients on 127.0.0.1: req/s, p50/p99, and what the ensemble answer costs
  batching  the Detector deployment's batching gain through its handle vs the model's own
            (handle_share_of_model_gain; bench/serve_load.py's measurement)

Everything runs at Ray's worker niceness (15), so no process of either side has priority on the shared CPUs.
Each part's figures are printed as it ends; --json adds them all as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "jobs"), str(REPO / "bench")]
# As the Makefile sets them: the demo's files under the repo, a loopback cluster without token auth.
MAKE_ENV = {"AIGD_HOME": str(REPO / ".aigd"), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            "TOKENIZERS_PARALLELISM": "false"}


WORKER_NICENESS = 15  # Ray's default for worker processes


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "jobs"), str(REPO / "bench"),
                                                          os.environ.get("PYTHONPATH", "")])}


# --------------------------------------------------------------------------- training vs TRL


def model_view(data: bytes, cfg):
    """The training image policy's view of an image, or None where the job would skip and count it."""
    from aigd.config import DecodeLimits
    from aigd.errors import AigdError
    from aigd.image_view import prepare

    try:
        return prepare(data, DecodeLimits.preset("training"), cfg.image)
    except AigdError:
        return None


def val_auc(model, processor, cfg) -> float:
    """ROC AUC over the whole val split of a model in this process: one function for both trainers."""
    import contextlib

    from aigd.batching import collate, encode, pixel_affine
    from aigd.prompt import label_token_ids
    from aigd.sampling import Catalog
    from aigd.validation import validate

    rows = [(view, r["label"], r["img_id"]) for r in Catalog.read(cfg.data, extra=("image",)).select("val").to_pylist()
            if (view := model_view(r["image"]["bytes"], cfg)) is not None]
    batches = []
    for i in range(0, len(rows), cfg.optim.batch_size):
        views, labels, ids = zip(*rows[i:i + cfg.optim.batch_size])
        enc = encode(processor, list(views), cfg.image)
        enc.update(label=list(labels), img_id=list(ids))
        batches.append(collate(enc, processor.tokenizer.pad_token_id, pixel_affine(processor)))
    out = validate(model, batches, label_token_ids(processor.tokenizer), 1, contextlib.nullcontext())
    return round(float(out["metrics"]["roc_auc"]), 4)


def job_final_auc(run_dir: Path, cfg) -> float:
    """The job's final LoRA weights (its last checkpoint before the final pass, which holds the best),
    scored by `val_auc`."""
    import torch

    from aigd import checkpoint
    from aigd.loop import load_trainable
    from aigd.model import load_for_training

    states = {p: json.loads((p / "loop_state.json").read_text()) for p in run_dir.glob("checkpoint_*") if p.is_dir()}
    last = max((p for p, st in states.items() if not st["finished"]), key=lambda p: states[p]["global_step"])
    model, processor, _ = load_for_training(cfg.model, cfg.lora, torch.device("cpu"))
    load_trainable(model, checkpoint.load(last).trainable)
    return val_auc(model, processor, cfg)


def run_timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({done.returncode}); its log: {log}")
    return wall


JOBS: dict = {}


def method1_job(work: Path, overrides: tuple[str, ...]) -> dict:
    """The Method 1 demo job as `python jobs/train_method1.py` runs it (its own local Ray, started and
    stopped inside the wall time); once per bench run, for the train and overhead parts."""
    if overrides in JOBS:
        return JOBS[overrides]
    from aigd.manifest import read_manifest
    from peer_trl import job_config

    name = f"peers-m1-{int(time.time())}"
    wall = run_timed([sys.executable, "jobs/train_method1.py", "--config", "configs/demo_method1.yaml",
                      f"run.name={name}", f"run.storage_path={work}/runs", f"run.export_dir={work}/m1", *overrides],
                     work / "job.log")
    run = work / "runs" / name
    last = max(run.glob("checkpoint_*/loop_state.json"), key=lambda p: json.loads(p.read_text())["global_step"])
    history = [h for h in json.loads(last.read_text())["history"] if "train_samples_per_s" in h]
    JOBS[overrides] = {"steps": read_manifest(work / "m1")["training"]["global_step"],
                       "samples_per_s": round(history[-1]["train_samples_per_s"], 1),  # the whole run's, eval excluded
                       "data_wait_s": history[-1].get("data_wait_s"), "wall_s": round(wall, 1),
                       "val_auc": job_final_auc(run, job_config(overrides))}
    return JOBS[overrides]


def train_figures(work: Path, overrides: tuple[str, ...]) -> dict:
    """The Method 1 job, then TRL over the same steps."""
    job = method1_job(work, overrides)
    trl_wall = run_timed([sys.executable, "bench/peer_trl.py", "--steps", str(job["steps"]), "--out",
                          str(work / "trl.json"), *overrides], work / "trl.log")
    trl = {**json.loads((work / "trl.json").read_text()), "wall_s": round(trl_wall, 1)}
    return {"job": job, "trl": trl,
            "job_over_trl_samples_per_s": round(job["samples_per_s"] / trl["samples_per_s"], 2),
            "trl_wall_over_job_wall": round(trl_wall / job["wall_s"], 2),
            "val_auc_gap": round(abs(job["val_auc"] - trl["val_auc"]), 4),
            "same_loss_at_step_0": trl["step0"]["abs_diff"] < 1e-4}


# --------------------------------------------------------------------------- the job's overhead


def plain_loop_samples_per_s(steps: int = 40, threads: int | None = None, per_step: int | None = None) -> float:
    """The same model, LoRA, loss and batch as the Method 1 demo job, in one process on `threads` cores
    (default: all), over `steps` distinct batches of the job's first epoch (its balanced rows, shuffled),
    prepared beforehand: what the framework's throughput is measured against. `per_step`: rows per
    optimizer step (default: the job's, all workers together)."""
    import torch

    from aigd.batching import collate, encode, pixel_affine
    from aigd.forward import answer_logits
    from aigd.loop import make_optimizer
    from aigd.losses import loss_fn
    from aigd.model import load_for_training
    from aigd.prompt import label_token_ids
    from aigd.sampling import Catalog, balance
    from peer_trl import job_config

    torch.set_num_threads(threads or os.cpu_count())
    cfg = job_config()
    model, proc, _ = load_for_training(cfg.model, cfg.lora, torch.device("cpu"))
    cat = Catalog.read(cfg.data, extra=("image",))
    table = cat.select("train", balance(cat, 0))
    b = per_step or cfg.optim.batch_size * cfg.scaling.num_workers
    views = []
    for i in np.random.default_rng(cfg.optim.seed).permutation(table.num_rows):
        row = table.slice(int(i), 1).to_pylist()[0]
        if (view := model_view(row["image"]["bytes"], cfg)) is not None:
            views.append((view, row["label"]))
        if len(views) == steps * b:
            break
    batches = []
    for i in range(0, len(views) - b + 1, b):
        pixels, labels = zip(*views[i:i + b])
        rows = encode(proc, list(pixels), cfg.image)
        rows["label"] = list(labels)
        batches.append(collate(rows, proc.tokenizer.pad_token_id, pixel_affine(proc)))
    opt, _ = make_optimizer(model, cfg.optim, steps)
    ids, loss_of = label_token_ids(proc.tokenizer), loss_fn(cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    t0, n = time.perf_counter(), 0
    for batch in batches:
        loss_of(answer_logits(model, batch), batch["label"], ids).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n += len(batch["label"])
    return n / (time.perf_counter() - t0)


def overhead_figures(work: Path, overrides: tuple[str, ...]) -> dict:
    """The job's training samples/s against the plain loop on every core (framework_ratio), and the
    parts of the difference: the two workers' compute alone (one 1-thread loop over 16-row batches,
    times the workers) and the time the job's loop waited for batches."""
    job = method1_job(work, overrides)
    plain = plain_loop_samples_per_s()
    per_worker = plain_loop_samples_per_s(threads=1, per_step=16)
    from peer_trl import job_config

    cfg = job_config(overrides)
    train_s = job["steps"] * cfg.optim.batch_size * cfg.scaling.num_workers / job["samples_per_s"]
    return {"job_samples_per_s": job["samples_per_s"], "plain_loop_samples_per_s": round(plain, 1),
            "framework_ratio": round(job["samples_per_s"] / plain, 2),
            "one_thread_16_rows_samples_per_s": round(per_worker, 1),
            "job_data_wait_s": job["data_wait_s"],
            "job_data_wait_share": round(job["data_wait_s"] / train_s, 3)}


# --------------------------------------------------------------------------- serving vs a plain server

CLIENTS = (1, 8, 32)


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{url} exited with {proc.returncode} before it was ready")
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout_s} s")


def load_figures(url: str, images: list[bytes], seconds: float) -> dict:
    """Closed-loop clients: one adapter at 1, 8 and 32 clients, the ensemble at 1 and 32."""
    import asyncio

    from serve_load import drive

    asyncio.run(drive(f"{url}/v1/detect?adapter=method1", images, 4, 3))  # warm up
    detect = {c: asyncio.run(drive(f"{url}/v1/detect?adapter=method1", images, c, seconds)) for c in CLIENTS}
    ensemble = {c: asyncio.run(drive(f"{url}/v1/ensemble", images, c, seconds)) for c in (CLIENTS[0], CLIENTS[-1])}
    return {"detect": detect, "ensemble": ensemble}


def plain_server(images: list[bytes], seconds: float) -> dict:
    from serve_load import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "bench/peer_server.py", "--port", str(port)], cwd=REPO, env=env())
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        return load_figures(f"http://127.0.0.1:{port}", images, seconds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serve_app(images: list[bytes], seconds: float, cpus: int) -> dict:
    """The demo app as configs/serve_demo.yaml builds it, its admission limits raised as in
    bench/serve_load.py so that 32 closed-loop clients are queued, not shed."""
    import ray
    from ray import serve

    from serve.app import build_app
    from serve_load import demo_args, free_port, require_adapters

    args = demo_args()
    require_adapters(args)
    args["detector"].update(max_queued_requests=-1, max_ongoing_requests=64)
    args["router"].update(max_in_flight=256)
    os.environ["PYTHONPATH"] = env()["PYTHONPATH"]
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="aigd", route_prefix="/")
        wait_ready(f"http://127.0.0.1:{port}")
        return load_figures(f"http://127.0.0.1:{port}", images, seconds)
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_figures(work: Path, overrides: tuple[str, ...], seconds: float = 8.0) -> dict:
    from serve_load import sample_images

    images = sample_images(16)
    plain = plain_server(images, seconds)
    app = serve_app(images, seconds, os.cpu_count())
    top, one = CLIENTS[-1], CLIENTS[0]

    def ensemble_cost(r: dict) -> float:  # req/s of one adapter over req/s of the ensemble answer, at 32 clients
        return round(r["detect"][top]["rps"] / r["ensemble"][top]["rps"], 2)

    return {"plain": plain, "serve": app,
            "serve_over_plain_rps_at_32": round(app["detect"][top]["rps"] / plain["detect"][top]["rps"], 2),
            "serve_over_plain_p99_at_32": round(app["detect"][top]["p99_ms"] / plain["detect"][top]["p99_ms"], 2),
            "serve_over_plain_p50_at_1": round(app["detect"][one]["p50_ms"] / plain["detect"][one]["p50_ms"], 2),
            "ensemble_cost_plain": ensemble_cost(plain), "ensemble_cost_serve": ensemble_cost(app),
            "errors": sum(r["errors"] for side in (plain, app) for rows in side.values() for r in rows.values())}


# --------------------------------------------------------------------------- batching where it lives


def batching_figures(work: Path, overrides: tuple[str, ...]) -> dict:
    """bench/serve_load.py's measurement at 32 callers: the Detector deployment's batching gain through
    its handle against the model's own (one process, one thread)."""
    import serve_load

    res = serve_load.main(["--concurrency", "32", "--seconds", "8"])
    return {k: res[k] for k in ("handle_batched_rps", "handle_unbatched_rps", "handle_batching_gain",
                                "forward_score_ms", "forward_batch16_ms_per_image", "model_batching_gain",
                                "handle_share_of_model_gain")}


PARTS = {"train": train_figures, "overhead": overhead_figures, "serve": serve_figures, "batching": batching_figures}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="a.b=c overrides of the training config (the train part)")
    args = ap.parse_args(argv)
    for key, value in MAKE_ENV.items():
        os.environ.setdefault(key, value)
    # Ray runs its workers at niceness 15 (RAY_worker_niceness) and its daemons at this process's: on one
    # machine shared with the load clients, the plain server and TRL would run ahead of every Serve replica
    # and training worker. Everything this bench starts runs at the workers' niceness instead.
    os.nice(max(0, WORKER_NICENESS - os.nice(0)))
    out = {}
    with tempfile.TemporaryDirectory(prefix="aigd-peers-") as tmp:
        for part in args.parts:
            t0 = time.perf_counter()
            out[part] = PARTS[part](Path(tmp), tuple(args.overrides))
            out[part]["part_s"] = round(time.perf_counter() - t0, 1)
            print(part, json.dumps(out[part], indent=1))
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
