"""GPU path check, one GPU, offline: what a user runs, each stage in its own process under its own
cap, so a failing stage reports its error and the others still run; the caps sum within the
budget, and the JSON line is printed whatever happens (partial, stage by stage).

    bash bench/gpu_check.sh                        # one GPU, no internet, under 10 minutes
    python bench/gpu_check.py --cpu-smoke --json   # the same stages on CPU with the tiny model

Stages (a Qwen2.5-VL with the 7B's widths, Qwen's 152k-row embedding, 2 text layers and 2 vision
blocks, random weights; `aigd.dev.tiny_model.SEVEN_B_WIDTHS`):
  prepare                       build that model and a small SID_Set-format set (cached between runs)
  backend_unsloth               Unsloth's mapped load: the model placed in a private HF cache as
                                Qwen/Qwen2.5-VL-7B-Instruct and as the 4-bit repo Unsloth maps it to, the
                                commit recorded, a pinned revision refused; then as backend_hf
  backend_hf                    4-bit load, 6 Method-2 steps on 8 images of 512x512 under the loop's
                                autocast: load time, step time, samples/s, peak GPU memory, scoring
                                images/s, and the dtype a forward hook sees leave the language MLPs
  train_method2                 jobs/train_method2.py through Ray Train at the real configs' 512 px, 2
                                workers sharing the GPU (gpus_per_worker 0.5: gloo), evaluations,
                                checkpoints, an injected failure, the restart, the sharded final pass, export
  train_method1                 jobs/train_method1.py, 1 worker holding the GPU: the cpu:gloo,cuda:nccl group
  score                         a Scorer with both exported adapters, warmed up, answering a batch
The last line with --json is one JSON object: per stage ok/error, seconds and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 8
STEPS = 6
# Seconds per stage on one GPU; they sum to BUDGET_S, inside gpu_check.sh's outer `timeout`.
TIMEOUTS = {"prepare": 90, "backend_unsloth": 90, "backend_hf": 70, "train_method2": 140, "train_method1": 90,
            "score": 50}
BUDGET_S = sum(TIMEOUTS.values())
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"


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


def as_hub_cache(model_path: str, repos: list[str]) -> tuple[str, str]:
    """`model_path` as snapshot `commit` of each repo in a private, offline HF cache; (cache, commit)."""
    import shutil

    cache, commit = home() / "hf-cache", "c0ffee" + "0" * 34
    for repo in repos:
        root = cache / f"models--{repo.replace('/', '--')}"
        if not (root / "snapshots" / commit).exists():  # hard links: the 7B-width model is ~3 GB
            shutil.copytree(model_path, root / "snapshots" / commit, copy_function=os.link)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
    return str(cache), commit


def mapped_load(cfg) -> dict:
    """Unsloth's own name mapping, offline: the repo it loads, and the refusal of a revision it drops."""
    from aigd.errors import BackendUnavailable
    from aigd.model import check_available, loaded_repo

    repo = loaded_repo(cfg, "unsloth")
    try:
        check_available(dataclasses.replace(cfg, revision="0" * 40), "unsloth")
        refused = None
    except BackendUnavailable as e:
        refused = str(e)[:120]
    return {"maps_to": repo, "pinned_revision_refused": refused}


def activation_dtypes(model) -> tuple[list, set]:
    """Forward hooks on the language MLPs: the dtype of what leaves them (fp32 = no autocast)."""
    seen, hooks = set(), []
    for name, module in model.named_modules():
        if name.endswith("language_model.layers.0.mlp") or name.endswith("language_model.layers.1.mlp"):
            hooks.append(module.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype).removeprefix("torch."))))
    return hooks, seen


def stage_backend(backend: str, model_path: str, cpu: bool) -> dict:
    """Load through one backend (fresh process: Unsloth patches transformers globally) and train a bit."""
    from aigd.config import ImagePolicy, LoraConfig, ModelConfig, OptimConfig
    from aigd.model import import_backend_first

    extra = {}
    if backend == "unsloth":  # the hub id, through the mapping, from a cache that holds only what it maps to
        cache, commit = as_hub_cache(model_path, [QWEN, "unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit"])
        os.environ["HF_HUB_CACHE"] = cache
        model_path, extra["cache_commit"] = QWEN, commit
    cfg = ModelConfig(name_or_path=model_path, backend=backend, load_in_4bit=not cpu, gradient_checkpointing=not cpu)
    import_backend_first(cfg)  # before transformers, as the training workers do
    import torch

    if backend == "unsloth":
        extra.update(mapped_load(cfg))

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
    amp = autocast(cfg, device)
    hooks, dtypes = activation_dtypes(model)
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
    for h in hooks:
        h.remove()
    return {**extra, "backend": base["backend"], "checkpoint": base["checkpoint"], "commit": base["commit"],
            "quantization": base["quantization"], "precision": precision(cfg, device),
            "activation_dtypes": sorted(dtypes), "gradient_checkpointing": bool(getattr(
                model, "is_gradient_checkpointing", False)), "load_s": round(load_s, 1),
            "step_s": round(step, 3), "samples_per_s": round(BATCH / step, 2),
            "score_images_per_s": round(3 * BATCH / (time.perf_counter() - t), 1), "loss": round(float(loss), 4),
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if not cpu else None,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _train_args(method: str, model_path: str, data: Path, cpu: bool, workers: int, extra: list[str]) -> list[str]:
    """The demo config on this model; on a GPU at the real configs' 512 px (configs/method*.yaml).
    scaling.backend stays auto: two ranks sharing the GPU get gloo, one rank cpu:gloo,cuda:nccl."""
    root = home()
    real_size = [] if cpu else ["image.max_pixels=262144", "augment.crop_size=512", "augment.crop_scale=[0.4,1.0]",
                                "augment.crop_ratio=[0.8,1.25]"]
    return ["--config", str(REPO / f"configs/demo_{method}.yaml"), f"model.name_or_path={model_path}",
            "model.build_tiny=false", f"model.load_in_4bit={str(not cpu).lower()}",
            f"model.gradient_checkpointing={str(not cpu).lower()}", f"data.path={data}",
            f"run.storage_path={root}/runs", f"run.name=gpu-check-{method}-{int(time.time())}",
            f"run.export_dir={root}/adapters/{method}", "optim.epochs=1", "optim.batch_size=4", "optim.grad_accum=1",
            "optim.eval_samples=24", f"optim.eval_every_samples={4 * workers}", "optim.early_stop_patience=null",
            f"scaling.num_workers={workers}", f"scaling.use_gpu={str(not cpu).lower()}",
            f"scaling.gpus_per_worker={0.0 if cpu else 1.0 / workers}",
            f"scaling.cpus_per_worker={0.5 if cpu else 2.0}", *(real_size if method == "method2" else
                                                                  real_size[:1]), *extra]


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
            # what the ranks' torch.distributed reported, and the policy the adapter was trained at
            "process_group": manifest["training"]["process_group"],
            "max_pixels": manifest["image_policy"]["max_pixels"],
            "global_step": manifest["training"]["global_step"], "backend": manifest["base"]["backend"],
            "val_n": manifest["val_metrics"].get("n"), "temperature": manifest["calibration"]["temperature"]}


def stage_score(model_path: str, cpu: bool) -> dict:
    from aigd.config import EnsembleConfig, ModelConfig, ScoringConfig
    from aigd.manifest import read_manifest

    # both adapters after a whole run; the ones trained when stages were left out (--stages)
    adapters = {m: str(home() / "adapters" / m) for m in ("method1", "method2") if (home() / "adapters" / m).exists()}
    base = read_manifest(next(iter(adapters.values())))["base"]
    from aigd.scorer import Scorer

    # backend auto, as configs/serve_7b.yaml: the same loader as training, or a refusal naming both bases
    cfg = ScoringConfig(model=ModelConfig(name_or_path=model_path, load_in_4bit=not cpu), adapters=adapters)

    t0 = time.perf_counter()
    scorer = Scorer(cfg, warm_up=True)  # as a Serve replica: one forward per adapter before it is ready
    load_s = time.perf_counter() - t0
    side = 112
    batch = images(BATCH, (side, side))
    scorer.answers(batch, EnsembleConfig())
    t = time.perf_counter()
    answers = scorer.answers(batch, EnsembleConfig())
    warm = {n: a["warmup_ms"] for n, a in scorer.describe()["adapters"].items()}
    return {"load_s": round(load_s, 1), "warmup_ms": warm, "trained_on": base["checkpoint"],
            "served_on": scorer.base["checkpoint"],
            "ensemble_images_per_s": round(BATCH / (time.perf_counter() - t), 1),
            "labels": sorted({a["label"] for a in answers})}


# --------------------------------------------------------------------------- parent


def stage_prepare(cpu: bool) -> dict:
    """The model with the 7B's widths (tiny on CPU) and a small data set, built once and cached."""
    from aigd.config import DemoDataConfig, ZooConfig
    from aigd.dev.demo_data import write_demo_data
    from aigd.dev.tiny_model import SEVEN_B_WIDTHS, TINY_DIMS, build_tiny_model

    dims, dtype, path = (TINY_DIMS, "float32", home() / "smoke-model") if cpu else \
        (SEVEN_B_WIDTHS, "bfloat16", home() / "7b-widths-model")
    if not (path / "model.safetensors").exists():
        build_tiny_model(path, dims=dims, dtype=dtype, format_steps=0 if not cpu else 200)
    # the stages need rows of every kind, not fakes a detector can learn: a zoo trained for seconds
    data = write_demo_data(DemoDataConfig(out_dir=str(home() / "data"), rows_per_class=60, tampered_rows=4,
                                          small_rows=4, corrupt_rows=1, shards=2,
                                          zoo=ZooConfig(steps=30, width=8, ddim_steps=2)))
    return {"model": str(path), "data": str(data)}


def run_stage(name: str, args: list[str], timeout: float) -> dict:
    """One stage in a child process of its own session: on a timeout or an interrupt the whole
    group goes (Ray's processes with it, and the GPU memory they hold), and the stage says so."""
    if timeout < 5:
        return {"ok": False, "error": "not run: the budget was spent", "seconds": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--stage", name, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as e:  # the cap, or gpu_check's own SIGTERM / Ctrl-C
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        why = f"timed out after {timeout:.0f} s" if isinstance(e, subprocess.TimeoutExpired) else "interrupted"
        result = {"ok": False, "error": why, "log_tail": stderr[-1500:], "seconds": round(time.perf_counter() - t0, 1)}
        if isinstance(e, subprocess.TimeoutExpired):
            return result
        e.stage_result = result
        raise
    seconds = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        errors = [ln for ln in stderr.splitlines() if "Error" in ln or "error" in ln]
        return {"ok": False, "error": (errors[-1] if errors else f"exit {proc.returncode}")[-600:],
                "log_tail": stderr[-1500:], "seconds": seconds}
    return {"ok": True, "seconds": seconds, **json.loads(lines[-1])}


def run_child(args) -> None:
    cpu = args.cpu_smoke
    if args.stage == "prepare":
        out = stage_prepare(cpu)
    elif args.stage.startswith("backend_"):
        out = stage_backend(args.stage.removeprefix("backend_"), args.model, cpu)
    elif args.stage.startswith("train_"):
        out = stage_train(args.stage.removeprefix("train_"), args.model, Path(args.data), cpu)
    else:
        out = stage_score(args.model, cpu)
    print(json.dumps(out))


def report(device: str, results: dict, as_json: bool) -> bool:
    ok = bool(results) and all(r["ok"] for r in results.values())
    if as_json:
        print(json.dumps({"device": device, "ok": ok, "stages": {
            k: {x: y for x, y in v.items() if x != "log_tail"} for k, v in results.items()}}), flush=True)
    return ok


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, hf backend, no 4-bit, on CPU")
    ap.add_argument("--stages", nargs="+", default=[s for s in TIMEOUTS if s != "prepare"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        return run_child(args)

    import torch

    if args.cpu_smoke:
        device = "cpu (smoke)"
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (run with --cpu-smoke to check the code path on CPU)")
    else:
        device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"device: {device}", flush=True)
    # 2 CPUs take longer than a GPU node: the smoke's method2 stage (two worker-group starts) took 135 s of 150
    scale = 2 if args.cpu_smoke else 1
    deadline = time.monotonic() + BUDGET_S * scale
    smoke = ["--cpu-smoke"] if args.cpu_smoke else []
    results = {}
    try:
        for name in ["prepare", *[s for s in args.stages if not (args.cpu_smoke and s == "backend_unsloth")]]:
            common = smoke if name == "prepare" else \
                ["--model", results["prepare"]["model"], "--data", results["prepare"]["data"], *smoke]
            try:
                results[name] = r = run_stage(name, common, min(TIMEOUTS[name] * scale, deadline - time.monotonic()))
            except BaseException as e:
                results[name] = getattr(e, "stage_result", {"ok": False, "error": "interrupted", "seconds": 0})
                raise
            print(f"{name:16s} {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s: "
                  f"{ {k: v for k, v in r.items() if k not in ('ok', 'seconds', 'log_tail')} }", flush=True)
            if not r["ok"]:
                print(r.get("log_tail", ""), file=sys.stderr)
                if name == "prepare":
                    break
    finally:  # also on Ctrl-C or an outer timeout's SIGTERM turned into an exception: what ran is reported
        ok = report(device, results, args.json)
    if not ok:
        sys.exit(1)
    return {"device": device, "stages": results, "ok": ok}


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` sends SIGTERM: still print the JSON
    main()
