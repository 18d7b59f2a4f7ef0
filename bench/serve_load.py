"""Load test of the Serve app over HTTP on 127.0.0.1, plus memory and scoring-path comparisons.

    make train-demo && python bench/serve_load.py            # table (about 3 minutes on 2 CPUs)
    python bench/serve_load.py --json                        # table, then one JSON line
    python bench/serve_load.py --concurrency 1 8 32 --seconds 10

Uses configs/serve_demo.yaml's application (tiny model + the demo adapters under $AIGD_HOME).
  batched_rps / unbatched_rps   requests/s over HTTP at the highest concurrency, max_batch_size 16 vs 1
  handle_*_rps                  the same Detector deployment through a DeploymentHandle (no HTTP,
                                no router, images already decoded): what batching itself buys
  http_over_handle              HTTP batched / handle batched: what proxy, router and decoding cost
  p99_ms_batched                p99 latency there, batching on
  shared_base_mem_mb            PSS of the one replica holding the base + both adapters
  two_models_mem_mb             PSS of two replicas holding one adapter each (the alternative)
  forward_score_ms              one forward pass, softmax over the two label logits (this project)
  model_batching_gain           forward_score_ms / per-image time of one 16-image forward, in one
                                process with one torch thread: the most batching can buy this model
  handle_share_of_model_gain    handle_batching_gain / model_batching_gain
  generate_score_ms             greedy generate() then the first step's scores (the seed's way)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# As the Makefile sets them: the demo's files under the repo, a loopback cluster without token auth.
for key, value in {"AIGD_HOME": str(REPO / ".aigd"), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)


def demo_args() -> dict:
    raw = yaml.safe_load((REPO / "configs/serve_demo.yaml").read_text())
    return raw["applications"][0]["args"]


def sample_images(n: int) -> list[bytes]:
    """PNG photos from the demo data's samples folder, else synthetic ones of the demo's sizes."""
    from PIL import Image

    home = Path(os.environ.get("AIGD_HOME", "~/.cache/aigd")).expanduser()
    files = sorted((home / "demo-data" / "samples").glob("*"))
    out = [f.read_bytes() for f in files]
    rng = np.random.default_rng(0)
    while len(out) < n:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (112, 140, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out[:n]


def require_adapters(args: dict) -> None:
    from aigd.config import expand

    for name, path in args["adapters"].items():
        if not Path(expand(path)).exists():
            raise SystemExit(f"adapter {name} missing at {expand(path)}: run `make train-demo`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- HTTP load


async def drive(url: str, images: list[bytes], concurrency: int, seconds: float) -> dict:
    """`concurrency` clients in a closed loop for `seconds`: throughput and latency percentiles."""
    import aiohttp

    latencies, errors = [], 0
    deadline = time.perf_counter() + seconds

    async def client(session, k):
        nonlocal errors
        i = k
        while time.perf_counter() < deadline:
            form = aiohttp.FormData()
            form.add_field("image", images[i % len(images)], filename="x.png")
            t0 = time.perf_counter()
            async with session.post(url, data=form) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
            i += concurrency

    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(client(s, k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "rps": round(len(ms) / wall, 2), "errors": errors,
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}


def prepared(args: dict, images: list[bytes]) -> list[np.ndarray]:
    """The images as the router hands them to the model (decoded, policy-sized uint8 arrays)."""
    from aigd import config as C
    from aigd.manifest import policy_for
    from aigd.image_view import prepare

    cfg = C.from_dict(C.ServeConfig, args)
    return [prepare(d, cfg.limits, policy_for(cfg)) for d in images]


async def drive_handle(handle, pixels: list[np.ndarray], concurrency: int, seconds: float) -> dict:
    """`concurrency` callers of the Detector deployment's handle in a closed loop: no HTTP, no router."""
    latencies = []
    deadline = time.perf_counter() + seconds

    async def client(k):
        i = k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await handle.score.remote(pixels[i % len(pixels)], ("method1",))
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    await asyncio.gather(*(client(k) for k in range(4)))  # warm up
    latencies.clear()
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "rps": round(len(ms) / (time.perf_counter() - t0), 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def replica_pss_mb(app: str) -> float:
    """Summed PSS of the Detector replica processes of one Serve application (found by process title)."""
    from tests.helpers import pids_by_cmdline

    total = 0.0
    for pid in pids_by_cmdline(f"ServeReplica:{app}:Detector"):
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    if total == 0:
        raise RuntimeError(f"no Detector replica process found for app {app}")
    return total


def serve_figures(args, images) -> dict:
    import ray
    from ray import serve

    from serve.app import build_app

    base = demo_args()
    require_adapters(base)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def app(name: str, **changes):
        cfg = json.loads(json.dumps(base))
        cfg["detector"].update(changes.pop("detector", {}))
        cfg.update(changes)
        serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
        return f"http://127.0.0.1:{port}/{name}"

    rows, handle_rows = {}, {}
    for mode, batch in (("batched", 16), ("unbatched", 1)):
        url = app(mode, detector={"max_batch_size": batch, "max_queued_requests": -1, "max_ongoing_requests": 64},
                  router={"max_in_flight": 256, "num_cpus": 0.1})
        asyncio.run(drive(f"{url}/v1/detect?adapter=method1", images, 4, 3))  # warm up
        rows[mode] = [asyncio.run(drive(f"{url}/v1/detect?adapter=method1", images, c, args.seconds))
                      for c in args.concurrency]
        # The same model deployment without HTTP: what the batching itself buys, and what the proxy,
        # router and decoding cost on top of it.
        handle = serve.get_deployment_handle("Detector", app_name=mode)
        handle_rows[mode] = asyncio.run(drive_handle(handle, prepared(base, images), args.concurrency[-1],
                                                     args.seconds))
        serve.delete(mode)
    shared_url = app("shared")
    one_a = app("single1", adapters={"method1": base["adapters"]["method1"]}, ensemble={})
    one_b = app("single2", adapters={"method2": base["adapters"]["method2"]}, ensemble={})
    for url, adapter in ((shared_url, "method1"), (shared_url, "method2"), (one_a, "method1"), (one_b, "method2")):
        asyncio.run(drive(f"{url}/v1/detect?adapter={adapter}", images, 2, 2))
    shared = replica_pss_mb("shared")
    two = replica_pss_mb("single1") + replica_pss_mb("single2")
    serve.shutdown()
    ray.shutdown()
    return {"rows": rows, "handle": handle_rows, "shared_base_mem_mb": round(shared, 1),
            "two_models_mem_mb": round(two, 1)}


# --------------------------------------------------------------------------- scoring paths


def scoring_figures(images: list[bytes], repeats: int) -> dict:
    """One forward over two label logits vs the seed's greedy generate(), same model and image."""
    import torch

    from aigd import config as C
    from aigd.batching import model_batch, normalize_pixels
    from aigd.scorer import Scorer

    torch.set_num_threads(1)
    cfg = C.from_dict(C.ServeConfig, demo_args())
    det = Scorer(C.replace(cfg, adapters={"method1": cfg.adapters["method1"]}))
    img = det.prepare(images[0], cfg.limits)
    det.model.set_adapter(det.member("method1").peft_name)
    batch = model_batch(det.processor, [img], det.policy)
    inputs = {k: v for k, v in batch.items() if k not in ("pixel_affine",)}
    inputs["pixel_values"] = normalize_pixels(batch["pixel_values"], batch["pixel_affine"])

    def forward():
        det.p_fake([img], "method1")

    def forward16():
        det.p_fake([img] * 16, "method1")

    @torch.no_grad()
    def generate():
        out = det.model.generate(**inputs, max_new_tokens=8, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=det.processor.tokenizer.pad_token_id)
        torch.softmax(out.scores[0][0], dim=-1)[list(det.label_ids)]
        det.processor.tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:])

    def timed(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats * 1000

    one, sixteen = timed(forward), timed(forward16) / 16
    return {"forward_score_ms": round(one, 2), "forward_batch16_ms_per_image": round(sixteen, 2),
            "model_batching_gain": round(one / sixteen, 2), "generate_score_ms": round(timed(generate), 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    images = sample_images(16)
    scoring = scoring_figures(images, repeats=30)
    serving = serve_figures(args, images)
    print(f"\n{'mode':10s} {'conc':>5s} {'rps':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
    for mode, rows in serving["rows"].items():
        for r in rows:
            print(f"{mode:10s} {r['concurrency']:5d} {r['rps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
                  f"{r['errors']:7d}")
    hb, hu = serving["handle"]["batched"], serving["handle"]["unbatched"]
    for mode, r in serving["handle"].items():
        print(f"{'handle ' + mode:10s} {r['concurrency']:5d} {r['rps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}")
    top_b, top_u = serving["rows"]["batched"][-1], serving["rows"]["unbatched"][-1]
    res = {"batched_rps": top_b["rps"], "unbatched_rps": top_u["rps"], "p99_ms_batched": top_b["p99_ms"],
           "p99_ms_unbatched": top_u["p99_ms"], "at_concurrency": top_b["concurrency"],
           "handle_batched_rps": hb["rps"], "handle_unbatched_rps": hu["rps"], "handle_p99_ms_batched": hb["p99_ms"],
           "handle_batching_gain": round(hb["rps"] / hu["rps"], 2),
           "http_over_handle": round(top_b["rps"] / hb["rps"], 2),
           "shared_base_mem_mb": serving["shared_base_mem_mb"], "two_models_mem_mb": serving["two_models_mem_mb"],
           **scoring}
    res["batching_gain"] = round(res["batched_rps"] / res["unbatched_rps"], 2)
    res["mem_ratio"] = round(res["shared_base_mem_mb"] / res["two_models_mem_mb"], 3)
    res["generate_over_forward"] = round(res["generate_score_ms"] / res["forward_score_ms"], 2)
    res["handle_share_of_model_gain"] = round(res["handle_batching_gain"] / res["model_batching_gain"], 2)
    goals = {"handle_batching_gain": ">= 3", "http_over_handle": ">= 0.5", "mem_ratio": "<= 0.6",
             "generate_over_forward": ">= 3"}
    print(f"\n{'figure':22s} {'value':>10s}  goal")
    for k, v in res.items():
        print(f"{k:22s} {v!s:>10s}  {goals.get(k, '')}")
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
