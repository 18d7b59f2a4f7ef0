"""GPU path check: 7B-width Qwen2.5-VL (2 text + 2 vision layers, random weights), 4-bit + LoRA,
through the `unsloth` and `hf` (bitsandbytes) backends; a few Method-2 steps and scoring speed.

    bash bench/gpu_check.sh                  # one GPU, no internet, under 8 minutes
    python bench/gpu_check.py --cpu-smoke    # the same code path on CPU with the tiny model (no 4-bit)

Prints per backend: load time, step time, samples/s, peak GPU memory, scoring images/s; with
--json the last line is one JSON object.
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

BATCH = 8
STEPS = 6


def home() -> Path:
    return Path(os.environ.get("AIGD_HOME", "~/.cache/aigd")).expanduser()


def images(n: int, size: tuple[int, int]):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def run_backend(backend: str, model_path: str, cpu_smoke: bool) -> dict:
    """One backend in this (fresh) process: Unsloth patches transformers globally, so never share one."""
    import torch

    from aigd.config import ImagePolicy, LoraConfig, ModelConfig, OptimConfig
    from aigd.losses import binary_focal
    from aigd.model import load_for_training
    from aigd.prompt import label_token_ids, model_batch
    from aigd.scoring import answer_logits, pair_logits, score_batch
    from aigd.train import make_optimizer

    device = torch.device("cpu") if cpu_smoke else torch.device("cuda", 0)
    policy = ImagePolicy(max_pixels=19600 if cpu_smoke else 512 * 512)
    cfg = ModelConfig(name_or_path=model_path, backend=backend, load_in_4bit=not cpu_smoke,
                      gradient_checkpointing=not cpu_smoke)
    t0 = time.perf_counter()
    model, processor, used = load_for_training(cfg, LoraConfig(), device)
    load_s = time.perf_counter() - t0
    ids = label_token_ids(processor.tokenizer)
    batch = model_batch(processor, images(BATCH, (140, 140) if cpu_smoke else (512, 512)), policy)
    labels = torch.tensor([0, 1] * (BATCH // 2), device=device)
    opt, sched = make_optimizer(model, OptimConfig(lr=5e-5, scheduler="cosine"), STEPS)
    times = []
    model.train()
    for _ in range(STEPS):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = binary_focal(pair_logits(answer_logits(model, batch), ids), labels, 0.75, 2.0)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    model.eval()
    score_batch(model, batch, ids)
    t = time.perf_counter()
    for _ in range(3):
        score_batch(model, batch, ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    score_ips = 3 * BATCH / (time.perf_counter() - t)
    step = float(np.median(times[1:]))
    return {"backend": used, "load_s": round(load_s, 1), "step_s": round(step, 3),
            "samples_per_s": round(BATCH / step, 2), "score_images_per_s": round(score_ips, 1),
            "loss_first": round(float(loss.detach()), 4),
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", nargs="+", default=["unsloth", "hf"])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, hf backend, no 4-bit, on CPU")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("BACKEND", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_backend(args.child[0], args.child[1], args.cpu_smoke)))
        return {}

    import torch

    from aigd.tiny_model import SEVEN_B_WIDTHS, TINY_DIMS, build_tiny_model

    if args.cpu_smoke:
        backends, dims, dtype, path = ["hf"], TINY_DIMS, "float32", home() / "gpu-check-smoke-model"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device visible (run with --cpu-smoke to check the code path on CPU)")
        backends, dims, dtype, path = args.backends, SEVEN_B_WIDTHS, "bfloat16", home() / "gpu-check-7b-widths"
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    t0 = time.perf_counter()
    if not (path / "model.safetensors").exists():
        build_tiny_model(path, dims=dims, dtype=dtype)
    print(f"model {path} ({dims}) ready in {time.perf_counter() - t0:.0f} s")
    results = []
    for backend in backends:
        cmd = [sys.executable, __file__, "--child", backend, str(path)] + (["--cpu-smoke"] if args.cpu_smoke else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"backend": backend, "error": proc.stderr.strip().splitlines()[-1:]})
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\n{'backend':9s} {'load s':>7s} {'step s':>7s} {'samples/s':>10s} {'score img/s':>12s} {'peak GB':>8s}")
    for r in results:
        if "error" in r:
            print(f"{r['backend']:9s} FAILED: {r['error']}")
        else:
            print(f"{r['backend']:9s} {r['load_s']:7.1f} {r['step_s']:7.3f} {r['samples_per_s']:10.2f} "
                  f"{r['score_images_per_s']:12.1f} {r['peak_gpu_mem_gb']!s:>8s}")
    out = {"results": results}
    if args.json:
        print(json.dumps(out))
    if any("error" in r for r in results):
        sys.exit(1)
    return out


if __name__ == "__main__":
    main()
