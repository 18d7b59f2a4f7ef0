"""Reliability under overload and replica loss: the demo Serve app on a local Ray, real HTTP.

    make train-demo && .venv/bin/python bench/serve_soak.py --json          # ~6 minutes on 2 CPUs
    .venv/bin/python bench/serve_soak.py --soak-s 60 --kill-s 20             # shorter

Phases, each printed and summed up in one JSON line:
  capacity   16 clients in a closed loop: the app's saturation throughput (req/s)
  soak       open-loop arrivals at --overload x capacity for --soak-s: every answer must be a 200 or
             a JSON 503/429 with Retry-After; router and model-replica memory sampled throughout
  recovery   after the load stops: seconds until 5 requests in a row are answered 200
  kill       4 clients against an app with two model replicas; one replica process is SIGKILLed:
             failed share, slowest request, seconds until both replicas are back
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_load import demo_args, drive, free_port, require_adapters, sample_images  # noqa: E402
from tests.helpers import pids_by_cmdline  # noqa: E402


def replica_pids(app: str, role: str) -> list[int]:
    return pids_by_cmdline(f"ServeReplica:{app}:{role}")


def rss_mb(pids: list[int]) -> list[float]:
    """RSS of each live process (MB)."""
    out = []
    for pid in pids:
        try:
            kb = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
            out.append(round(kb / 1024, 1))
        except (OSError, StopIteration):
            continue
    return out


def acceptable(status: int, headers, body: bytes) -> bool:
    """A 200, or a refusal the client can act on: JSON 503/429 with Retry-After."""
    if status == 200:
        return True
    if status in (429, 503) and "Retry-After" in headers:
        try:
            return "error" in json.loads(body)
        except ValueError:
            return False
    return False


async def open_loop(url: str, images: list[bytes], rate: float, seconds: float, mem_sample) -> dict:
    """Poisson arrivals at `rate` req/s for `seconds`, whatever the server's pace (no client waits on
    another), each with a 60 s timeout."""
    import aiohttp

    rng = np.random.default_rng(0)
    results, memory, tasks = [], [], []

    async def one(session, i):
        form = aiohttp.FormData()
        form.add_field("image", images[i % len(images)], filename="x.png")
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=form) as r:
                body = await r.read()
                results.append((r.status, acceptable(r.status, r.headers, body), time.perf_counter() - t0))
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            results.append((type(e).__name__, False, time.perf_counter() - t0))

    async def sampler():
        while True:
            memory.append(mem_sample())
            await asyncio.sleep(5)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        watch = asyncio.create_task(sampler())
        start, i = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            tasks.append(asyncio.create_task(one(session, i)))
            i += 1
            await asyncio.sleep(rng.exponential(1 / rate))
        await asyncio.gather(*tasks)
        watch.cancel()
    memory.append(mem_sample())
    ok_ms = np.asarray([r[2] for r in results if r[0] == 200]) * 1000
    by_status: dict[str, int] = {}
    for r in results:
        by_status[str(r[0])] = by_status.get(str(r[0]), 0) + 1
    failed = sum(not r[1] for r in results)
    return {"sent": len(results), "by_status": by_status, "failed": failed,
            "failed_share": round(failed / max(1, len(results)), 5),
            "p50_ms_200": round(float(np.percentile(ok_ms, 50)), 1) if len(ok_ms) else None,
            "p99_ms_200": round(float(np.percentile(ok_ms, 99)), 1) if len(ok_ms) else None,
            "slowest_s": round(max(r[2] for r in results), 2),
            "memory_mb": memory}


def recovery_s(url: str, image: bytes) -> float:
    import requests

    t0, streak = time.perf_counter(), 0
    while streak < 5 and time.perf_counter() - t0 < 120:
        try:
            streak = streak + 1 if requests.post(url, files={"image": ("x.png", image)}, timeout=30).status_code == 200 else 0
        except requests.RequestException:
            streak = 0
        time.sleep(0.05)
    return round(time.perf_counter() - t0, 2)


def kill_phase(url: str, images: list[bytes], seconds: float) -> dict:
    import threading

    import requests

    pids = replica_pids("twin", "Detector")
    results, stop = [], threading.Event()

    def client(k):
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = requests.post(url, files={"image": ("x.png", images[k])}, timeout=60)
                results.append((acceptable(r.status_code, r.headers, r.content), time.perf_counter() - t0))
            except requests.RequestException:
                results.append((False, time.perf_counter() - t0))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    os.kill(pids[0], signal.SIGKILL)
    killed_at = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    while len(replica_pids("twin", "Detector")) < 2 and time.perf_counter() - killed_at < 120:
        time.sleep(0.5)
    failed = sum(not ok for ok, _ in results)
    return {"sent": len(results), "failed": failed, "failed_share": round(failed / max(1, len(results)), 5),
            "slowest_s": round(max(s for _, s in results), 2),
            "replicas_back_s": round(time.perf_counter() - killed_at, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--soak-s", type=float, default=240.0)
    ap.add_argument("--overload", type=float, default=2.0)
    ap.add_argument("--kill-s", type=float, default=20.0)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import ray
    from ray import serve

    from serve.app import build_app

    require_adapters(demo_args())
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 70})
    base = demo_args()
    serve.run(build_app(base), name="soak", route_prefix="/soak")
    images = sample_images(16)
    url = f"http://127.0.0.1:{port}/soak/v1/ensemble"

    def memory():
        return {"router": rss_mb(replica_pids("soak", "Router")), "model": rss_mb(replica_pids("soak", "Detector"))}

    asyncio.run(drive(url, images, 4, 3))  # warm up
    capacity = asyncio.run(drive(url, images, 16, 15))
    rate = capacity["rps"] * args.overload
    print(f"capacity {capacity['rps']} req/s; soaking at {rate:.1f} req/s for {args.soak_s:g} s", flush=True)
    soak = asyncio.run(open_loop(url, images, rate, args.soak_s, memory))
    recovered = recovery_s(url, images[0])
    time.sleep(5)
    after = memory()
    serve.delete("soak")
    twin = json.loads(json.dumps(base))
    twin["detector"]["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
    twin["detector"]["num_cpus"] = 0.25
    serve.run(build_app(twin), name="twin", route_prefix="/twin")
    kill = kill_phase(f"http://127.0.0.1:{port}/twin/v1/ensemble", images, args.kill_s)
    serve.shutdown()
    ray.shutdown()
    mem = soak.pop("memory_mb") + [after]

    def series(role: str) -> dict:
        """Per-replica RSS (the largest replica) at the start, each quarter of the soak and once the
        load has stopped, and how many replicas there were (autoscaling adds routers under load)."""
        largest = [max(m[role], default=0.0) for m in mem]
        at = [min(len(mem) - 2, round(q * (len(mem) - 2))) for q in (0.25, 0.5, 0.75, 1.0)]
        return {"per_replica_start": largest[0], "per_replica_quarters": [largest[i] for i in at],
                "per_replica_after": largest[-1], "replicas_start": len(mem[0][role]),
                "replicas_end": len(mem[-1][role])}

    result = {
        "capacity_rps": capacity["rps"], "offered_rps": round(rate, 1), "soak_s": args.soak_s, **soak,
        "served_rps": round(soak["by_status"].get("200", 0) / args.soak_s, 1),
        "router_mem_mb": series("router"), "model_mem_mb": series("model"),
        "recovery_s": recovered, "replica_kill": kill,
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return result


if __name__ == "__main__":
    main()
