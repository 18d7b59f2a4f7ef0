"""GPU path check, one GPU, offline: what a user runs, each stage in its own process with its own
timeout, so a failing stage reports its error and the others still run.

    bash bench/gpu_check.sh                        # one GPU, no internet, under 8 minutes
    python bench/gpu_check.py --cpu-smoke --json   # the same stages on CPU with the tiny model

Stages (a Qwen2.5-VL with the 7B's widths, Qwen's 152k-row embedding, 2 text layers and 2 vision
blocks, random weights; `aigd.dev.tiny_model.SEVEN_B_WIDTHS`):
  backend_unsloth, backend_hf   4-bit load, 6 Method-2 steps on 8 images of 512x512: load time, step
                                time, samples/s, peak GPU memory, scoring images/s
  train_method2                 jobs/train_method2.py through Ray Train, 2 workers sharing the GPU
                                (gpus_per_worker 0.5, gloo), a few steps, evaluations, checkpoints,
                                an injected failure and the restart from the last checkpoint, export
  train_method1                 jobs/train_method1.py, 1 worker, a few steps, export
  score                         a Scorer with both exported adapters answering a batch (the serving path)
The last line with --json is one JSON object: per stage ok/error, seconds and figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 8
STEPS = 6
TIMEOUTS = {"backend_unsloth": 80, "backend_hf": 80, "train_method2": 150, "train_method1": 110, "score": 60}


def home() -> Path:
    return Path(os.environ.get("AIGD_HOME", "~/.cache/aigd")).expanduser() / "gpu-check"


def images(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- stages (child processes)


def stage_backend(backend: str, model_path: str, cpu: bool) -> dict:
    """Load through one backend (fresh process: Unsloth patches transformers globally) and train a bit."""
    from aigd.config import ImagePolicy, LoraConfig, ModelConfig, OptimConfig
    from aigd.model import import_backend_first

    cfg = ModelConfig(name_or_path=model_path, backend=backend, load_in_4bit=not cpu, gradient_checkpointing=not cpu)
    import_backend_first(cfg)  # before transformers, as the training workers do
    import torch

    from aigd.batching import model_batch
    from aigd.decision import p_fake
    from aigd.losses import binary_focal
    from aigd.loop import make_optimizer
    from aigd.model import autocast, load_for_training, precision
    from aigd.prompt import label_token_ids
    from aigd.forward import answer_logits, pair_logits

    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    side = 140 if cpu else 512
    policy = ImagePolicy(max_pixels=side * side)
    t0 = time.perf_counter()
    model, processor, base = load_for_training(cfg, LoraConfig(), device)
    load_s = time.perf_counter() - t0
    ids = label_token_ids(processor.tokenizer)
    batch = model_batch(processor, images(BATCH, (side, side)), policy)
    labels = torch.tensor([0, 1] * (BATCH // 2), device=device)
    opt, sched = make_optimizer(model, OptimConfig(lr=5e-5, scheduler="cosine"), STEPS)
    amp = autocast(cfg, device, base["backend"])
    times = []
    model.train()
    for _ in range(STEPS):
        sync(device)
        t = time.perf_counter()
        with amp:
            logits = answer_logits(model, batch)
        loss = binary_focal(pair_logits(logits, ids), labels, 0.75, 2.0)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    model.eval()
    with torch.inference_mode(), amp:
        answer_logits(model, batch)
        sync(device)
        t = time.perf_counter()
        for _ in range(3):
            p_fake(pair_logits(answer_logits(model, batch), ids).float().cpu().numpy())
        sync(device)
    step = float(np.median(times[1:]))
    return {"backend": base["backend"], "checkpoint": base["checkpoint"], "quantization": base["quantization"],
            "precision": precision(cfg, device, base["backend"]), "load_s": round(load_s, 1),
            "step_s": round(step, 3), "samples_per_s": round(BATCH / step, 2),
            "score_images_per_s": round(3 * BATCH / (time.perf_counter() - t), 1), "loss": round(float(loss), 4),
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if not cpu else None,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _train_args(method: str, model_path: str, data: Path, cpu: bool, workers: int, extra: list[str]) -> list[str]:
    root = home()
    return ["--config", str(REPO / f"configs/demo_{method}.yaml"), f"model.name_or_path={model_path}",
            "model.build_tiny=false", f"model.load_in_4bit={str(not cpu).lower()}",
            f"model.gradient_checkpointing={str(not cpu).lower()}", f"data.path={data}",
            f"run.storage_path={root}/runs", f"run.name=gpu-check-{method}-{int(time.time())}",
            f"run.export_dir={root}/adapters/{method}", "optim.epochs=1", "optim.batch_size=4", "optim.grad_accum=1",
            "optim.eval_samples=24", f"optim.eval_every_samples={4 * workers}", "optim.early_stop_patience=null",
            f"scaling.num_workers={workers}", f"scaling.use_gpu={str(not cpu).lower()}",
            f"scaling.gpus_per_worker={0.0 if cpu else 1.0 / workers}",
            f"scaling.cpus_per_worker={0.5 if cpu else 2.0}", "scaling.backend=gloo", *extra]


def stage_train(method: str, model_path: str, data: Path, cpu: bool) -> dict:
    import ray

    from aigd.dev.faults import FailAtStep

    sys.path[:0] = [str(REPO), str(REPO / "jobs")]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "jobs"), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
    recipe = __import__(f"train_{method}")
    workers = 2 if method == "method2" else 1
    # Method 2: fail at step 3 once; Ray Train restarts the workers from the step-2 checkpoint.
    extra = ["optim.max_steps=4", "run.max_failures=1"] if method == "method2" else ["optim.max_steps=2"]
    hooks = [FailAtStep(3)] if method == "method2" else []
    t0 = time.perf_counter()
    out = recipe.main(_train_args(method, model_path, data, cpu, workers, extra), hooks=hooks)
    from aigd.manifest import read_manifest

    manifest = read_manifest(out)
    return {"seconds_in_job": round(time.perf_counter() - t0, 1), "workers": workers, "adapter": out.uri,
            "global_step": manifest["training"]["global_step"], "backend": manifest["base"]["backend"],
            "val_n": manifest["val_metrics"].get("n"), "temperature": manifest["calibration"]["temperature"]}


def stage_score(model_path: str, cpu: bool) -> dict:
    from aigd.config import EnsembleConfig, ModelConfig, ScoringConfig
    from aigd.manifest import read_manifest

    adapters = {m: str(home() / "adapters" / m) for m in ("method1", "method2")}
    base = read_manifest(adapters["method2"])["base"]
    from aigd.scorer import Scorer

    # backend auto, as configs/serve_7b.yaml: the same loader as training, or a refusal naming both bases
    cfg = ScoringConfig(model=ModelConfig(name_or_path=model_path, load_in_4bit=not cpu), adapters=adapters)

    t0 = time.perf_counter()
    scorer = Scorer(cfg)
    load_s = time.perf_counter() - t0
    side = 112
    batch = images(BATCH, (side, side))
    scorer.answers(batch, EnsembleConfig())
    t = time.perf_counter()
    answers = scorer.answers(batch, EnsembleConfig())
    return {"load_s": round(load_s, 1), "trained_on": base["checkpoint"], "served_on": scorer.base["checkpoint"],
            "ensemble_images_per_s": round(BATCH / (time.perf_counter() - t), 1),
            "labels": sorted({a["label"] for a in answers})}


# --------------------------------------------------------------------------- parent


def run_stage(name: str, args: list[str], timeout: int) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--stage", name, *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:]
        return {"ok": False, "error": f"timed out after {timeout} s", "log_tail": tail.decode(errors="replace")
                if isinstance(tail, bytes) else tail, "seconds": timeout}
    seconds = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln]
        return {"ok": False, "error": (errors[-1] if errors else f"exit {proc.returncode}")[-600:],
                "log_tail": proc.stderr[-1500:], "seconds": seconds}
    return {"ok": True, "seconds": seconds, **json.loads(lines[-1])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, hf backend, no 4-bit, on CPU")
    ap.add_argument("--stages", nargs="+", default=list(TIMEOUTS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        if args.stage.startswith("backend_"):
            out = stage_backend(args.stage.removeprefix("backend_"), args.model, args.cpu_smoke)
        elif args.stage.startswith("train_"):
            out = stage_train(args.stage.removeprefix("train_"), args.model, Path(args.data), args.cpu_smoke)
        else:
            out = stage_score(args.model, args.cpu_smoke)
        print(json.dumps(out))
        return out

    import torch

    from aigd.config import DemoDataConfig, ZooConfig
    from aigd.dev.demo_data import write_demo_data
    from aigd.dev.tiny_model import SEVEN_B_WIDTHS, TINY_DIMS, build_tiny_model

    stages = [s for s in args.stages if not (args.cpu_smoke and s == "backend_unsloth")]
    if args.cpu_smoke:
        dims, dtype, path = TINY_DIMS, "float32", home() / "smoke-model"
        device = "cpu (smoke)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device visible (run with --cpu-smoke to check the code path on CPU)")
        dims, dtype, path = SEVEN_B_WIDTHS, "bfloat16", home() / "7b-widths-model"
        device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"device: {device}", flush=True)
    t0 = time.perf_counter()
    if not (path / "model.safetensors").exists():
        build_tiny_model(path, dims=dims, dtype=dtype, format_steps=0 if not args.cpu_smoke else 200)
    # the stages need rows of every kind, not fakes a detector can learn: a zoo trained for seconds
    data = write_demo_data(DemoDataConfig(out_dir=str(home() / "data"), rows_per_class=60, tampered_rows=4,
                                          small_rows=4, corrupt_rows=1, shards=2,
                                          zoo=ZooConfig(steps=30, width=8, ddim_steps=2)))
    print(f"model {path} and data {data} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    common = ["--model", str(path), "--data", str(data)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    results = {}
    for name in stages:
        # 2 CPUs take longer than a GPU node: the smoke's method2 stage (two worker-group starts) took 135 s of 150
        results[name] = run_stage(name, common, TIMEOUTS[name] * (2 if args.cpu_smoke else 1))
        r = results[name]
        print(f"{name:16s} {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s: "
              f"{ {k: v for k, v in r.items() if k not in ('ok', 'seconds', 'log_tail')} }", flush=True)
        if not r["ok"]:
            print(r.get("log_tail", ""), file=sys.stderr)
    out = {"device": device, "stages": results, "ok": all(r["ok"] for r in results.values())}
    if args.json:
        print(json.dumps({**out, "stages": {k: {x: y for x, y in v.items() if x != "log_tail"}
                                            for k, v in results.items()}}))
    if not out["ok"]:
        sys.exit(1)
    return out


if __name__ == "__main__":
    main()
