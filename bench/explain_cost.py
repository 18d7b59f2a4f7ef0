"""What an explanation costs: its latency next to one detect call, and what explanations in flight
do to /v1/detect's p99 on a real Serve app.

    python bench/explain_cost.py                  # both parts (about 2 minutes on 2 CPUs)
    python bench/explain_cost.py --json --runs 3  # the table, then one JSON line per run and part

Part 1, in this process (the tiny model, two random adapters, CPU): for each of --images photos,
one /v1/detect-sized scoring call (one image, one adapter) and one explanation per method, timed
--reps times; the figure is median explanation / median detect (goal <= 5 for input_x_gradient).

Part 2, on a local Ray: the app from a config, --clients closed-loop clients on
/v1/detect?adapter=method1 for --seconds alone, then as long again with one client asking
/v1/explain (occlusion, the default) back to back: detect p99 with / without (goal <= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for key, value in {"AIGD_HOME": str(REPO / ".aigd"), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)


def adapters(root: Path) -> tuple[Path, dict]:
    from aigd.dev.adapters import random_adapter
    from aigd.dev.tiny_model import build_tiny_model

    tiny = Path(os.environ["AIGD_HOME"]) / "tiny-qwen2.5-vl"
    if not (tiny / "config.json").exists():
        build_tiny_model(tiny, seed=0)
    return tiny, {f"method{i}": random_adapter(tiny, root / f"method{i}", seed=i, temperature=1.0, method=f"method{i}")
                  for i in (1, 2)}


def in_process(tiny: Path, found: dict, n_images: int, reps: int) -> dict:
    from aigd import config as C
    from aigd.dev.adapters import SMALL_POLICY
    from aigd.explain import attribute
    from aigd.scorer import Scorer
    from tests.helpers import image_bytes, photo

    scorer = Scorer(C.ScoringConfig(model=C.ModelConfig(name_or_path=str(tiny), load_in_4bit=False),
                                    image=C.ImagePolicy(**SMALL_POLICY), adapters={k: str(v) for k, v in found.items()}))
    cfg = C.ExplainConfig()
    images = [scorer.prepare(image_bytes(photo(i, size=(150, 120))), C.DecodeLimits()) for i in range(n_images)]

    def median_s(fn) -> float:
        fn()  # warm
        times = []
        for _ in range(reps):
            for img in images:
                t0 = time.perf_counter()
                fn(img)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    detect = median_s(lambda img=images[0]: scorer.p_fake([img], "method1"))
    out = {"detect_ms": round(detect * 1000, 1), "tokens": images[0].shape[0] // 28 * (images[0].shape[1] // 28)}
    for method in C.EXPLAIN_METHODS:
        t = median_s(lambda img=images[0], m=method: attribute(scorer, img, "method1", m, cfg))
        out[f"{method}_ms"] = round(t * 1000, 1)
        out[f"{method}_x_detect"] = round(t / detect, 2)
    return out


def served(tiny: Path, found: dict, clients: int, seconds: float, chunk: int | None) -> dict:
    import ray
    import requests
    from ray import serve

    from aigd.dev.adapters import SMALL_POLICY
    from aigd.dev.load import ClosedLoop, deploy, p99_ms
    from bench.promote_load import free_port
    from tests.helpers import image_bytes, photo

    ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=free_port(), log_to_driver=False)
    try:
        url = deploy(f"http://{ctx.dashboard_url}", free_port(), {
            "model": {"name_or_path": str(tiny), "load_in_4bit": False}, "image": SMALL_POLICY,
            "adapters": {k: str(v) for k, v in found.items()}, "limits": {"min_side": 28, "max_aspect": 50.0},
            "detector": {"num_cpus": 0.1, "max_batch_size": 8}, "router": {"num_cpus": 0.05},
            "explain": {} if chunk is None else {"chunk": chunk}})
        data = image_bytes(photo(1))
        stop, explained = threading.Event(), []

        def explain_loop():
            while not stop.is_set():
                t0 = time.perf_counter()
                r = requests.post(f"{url}/v1/explain?adapter=method1", files={"image": ("x.png", data)}, timeout=120)
                explained.append((r.status_code, time.perf_counter() - t0))

        with ClosedLoop(f"{url}/v1/detect?adapter=method1", data, clients=clients) as load:
            time.sleep(seconds)
            t0 = time.monotonic()
            worker = threading.Thread(target=explain_loop)
            worker.start()
            time.sleep(seconds)
            stop.set()
            worker.join()
            t1 = time.monotonic()
        alone, beside = load.between(0, t0), load.between(t0, t1)
        return {"clients": clients, "chunk": chunk or "default", "detect_alone": len(alone), "detect_beside": len(beside),
                "failed": sum(a.status != 200 for a in load.answers) + sum(s != 200 for s, _ in explained),
                "explanations": len(explained),
                "explain_median_ms": round(statistics.median(t for _, t in explained) * 1000, 1) if explained else None,
                "p99_alone_ms": round(p99_ms(alone), 1), "p99_beside_ms": round(p99_ms(beside), 1),
                "p99_ratio": round(p99_ms(beside) / p99_ms(alone), 2)}
    finally:
        serve.shutdown()
        ray.shutdown()


def _table(title: str, rows: list[dict], goals: dict) -> None:
    print(f"\n{title}\n{'figure':28s} " + " ".join(f"{'run ' + str(i + 1):>10s}" for i in range(len(rows))) + "  goal")
    for k in rows[0]:
        print(f"{k:28s} " + " ".join(f"{r[k]!s:>10s}" for r in rows) + f"  {goals.get(k, '')}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=None, help="part 2: the app's explain.chunk (default: the config's)")
    ap.add_argument("--skip-serve", action="store_true", help="part 1 only")
    ap.add_argument("--skip-cost", action="store_true", help="part 2 only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        tiny, found = adapters(Path(tmp) / "adapters")
        cost = [] if args.skip_cost else [in_process(tiny, found, args.images, args.reps) for _ in range(args.runs)]
        load = [] if args.skip_serve else [served(tiny, found, args.clients, args.seconds, args.chunk)
                                           for _ in range(args.runs)]
    if cost:
        _table("Explanation latency, one image (tiny model, CPU)", cost, {"input_x_gradient_x_detect": "<= 5"})
    if load:
        _table("/v1/detect with explanations in flight (local Serve app)", load, {"failed": "0", "p99_ratio": "<= 2"})
    if args.json:
        for part, rows in (("cost", cost), ("served", load)):
            for r in rows:
                print(json.dumps({"part": part, **r}))


if __name__ == "__main__":
    main()
