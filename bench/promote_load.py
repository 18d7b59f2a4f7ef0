"""Promotion and rollback of an adapter version under steady load, on a real Serve app.

    python bench/promote_load.py                 # table (about 2 minutes on 2 CPUs)
    python bench/promote_load.py --json          # table, then one JSON line per run
    python bench/promote_load.py --replicas 1 2 --runs 2 --doc docs/lifecycle.md   # the table in the docs

Builds the tiny model (if absent) and a registry with two random method2 versions, deploys the app
from a config through the Serve REST API (as `serve deploy` does) on a local Ray, then drives
`--clients` closed-loop clients against /v1/detect?adapter=method2 while `aigd.lifecycle.promote`
switches to the new version and `rollback` switches back. The gate is off here: the two random
versions have no evaluation; tests/test_lifecycle.py covers the gate.

  failed              answers other than 200 (connection errors included), whole run
  order_ok            every answer names old or new, and on each replica none from the old version
                      answers a request sent after that replica's first answer from the new one
  overlap_s           how long both versions answered (first new answer to last old one): 0 with one
                      replica; Serve reconfigures several replicas one at a time
  steady_p99_ms       p99 latency of requests sent before the promotion
  switch_p99_ms       p99 latency of requests sent while promote() / rollback() ran
  switch_over_steady  switch_p99_ms / steady_p99_ms (goal <= 2)
  promote_s / rollback_s   how long each call took, checks and Serve's rollout included
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for key, value in {"AIGD_HOME": str(REPO / ".aigd"), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry_with_two_versions(root: Path) -> tuple:
    from aigd.dev.adapters import random_adapter
    from aigd.dev.tiny_model import build_tiny_model

    tiny = Path(os.environ["AIGD_HOME"]) / "tiny-qwen2.5-vl"
    if not (tiny / "config.json").exists():
        build_tiny_model(tiny, seed=0)
    m1 = random_adapter(tiny, root / "method1", seed=1, temperature=1.5, method="method1")
    old = random_adapter(tiny, root / "method2", seed=2, temperature=0.8, method="method2")
    new = random_adapter(tiny, root / "method2", seed=5, temperature=1.0, method="method2")
    return tiny, m1, old, new


def deploy(dashboard: str, port: int, tiny: Path, m1: Path, old: Path, replicas: int) -> str:
    from aigd.dev.adapters import SMALL_POLICY
    from aigd.dev.load import deploy as serve_app

    args = {"model": {"name_or_path": str(tiny), "load_in_4bit": False}, "image": SMALL_POLICY,
            "adapters": {"method1": str(m1), "method2": str(old)},
            "limits": {"min_side": 28, "max_aspect": 50.0},
            "detector": {"num_cpus": 0.1, "max_batch_size": 8, "autoscaling": {"min_replicas": replicas,
                                                                              "max_replicas": replicas}},
            "router": {"num_cpus": 0.05}}
    return serve_app(dashboard, port, args)


def measure(url: str, cfg, old: str, new: str, clients: int, seconds: float) -> dict:
    from aigd.dev.load import ClosedLoop, overlap_s, p99_ms, switch_order_ok
    from aigd.lifecycle import promote, rollback
    from tests.helpers import image_bytes, photo

    quiet = lambda *_: None  # noqa: E731
    with ClosedLoop(f"{url}/v1/detect?adapter=method2", image_bytes(photo(1)), clients=clients) as load:
        time.sleep(seconds)
        t0 = time.monotonic()
        promote(cfg, "method2", new, url, gate_on=False, log=quiet)
        t1 = time.monotonic()
        time.sleep(seconds)
        t2 = time.monotonic()
        rollback(cfg, "method2", url, log=quiet)
        t3 = time.monotonic()
        time.sleep(seconds / 2)
    steady, switching = load.between(0, t0), load.between(t0, t1) + load.between(t2, t3)
    res = {"requests": len(load.answers), "failed": sum(a.status != 200 for a in load.answers),
           "order_ok": switch_order_ok(load.between(t0, t2), old, new) and
           switch_order_ok(load.between(t2, float("inf")), new, old),
           "overlap_s": round(max(overlap_s(load.between(t0, t2), old, new),
                                  overlap_s(load.between(t2, float("inf")), new, old)), 2),
           "steady_p99_ms": round(p99_ms(steady), 1), "switch_p99_ms": round(p99_ms(switching), 1),
           "switch_requests": len(switching), "promote_s": round(t1 - t0, 2), "rollback_s": round(t3 - t2, 2)}
    res["switch_over_steady"] = round(res["switch_p99_ms"] / res["steady_p99_ms"], 2)
    return res


MARK = ("<!-- promote-bench -->", "<!-- /promote-bench -->")
COLUMNS = ("replicas", "requests", "failed", "order_ok", "overlap_s", "steady_p99_ms", "switch_p99_ms", "switch_over_steady",
           "promote_s", "rollback_s")


def write_doc(path: Path, rows: list[dict], command: str) -> None:
    """Replace the table between the markers of `path` with these runs."""
    text = path.read_text()
    head, rest = text.split(MARK[0], 1)
    _, tail = rest.split(MARK[1], 1)
    table = [f"`{command}` (tiny model, 2 CPUs, {rows[0]['clients']} closed-loop clients on 127.0.0.1",
             "against `/v1/detect?adapter=method2`, promote then roll back):", "",
             "| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    table += [f"| {i + 1} | " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for i, r in enumerate(rows)]
    path.write_text(head + MARK[0] + "\n" + "\n".join(table) + "\n" + MARK[1] + tail)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=6.0, help="steady load before, between and after the switches")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1],
                    help="Detector replica counts to measure (Serve reconfigures one replica at a time)")
    ap.add_argument("--runs", type=int, default=1, help="runs per replica count")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--doc", type=Path, help="write the table into this page, between its promote-bench markers")
    args = ap.parse_args(argv)
    import ray
    from ray import serve

    from aigd import config as C
    from aigd import registry

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny, m1, old, new = registry_with_two_versions(Path(tmp) / "adapters")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        os.environ["AIGD_HOME"] = tmp  # the promotion lock and records stay in the temporary folder
        ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=free_port(), log_to_driver=False)
        dashboard = f"http://{ctx.dashboard_url}"
        cfg = C.from_dict(C.PromoteConfig, {"registry": str(Path(tmp) / "adapters"), "dashboard": dashboard})
        versions = registry.resolve(str(old)).version, registry.resolve(str(new)).version
        try:
            for replicas in args.replicas:
                url = deploy(dashboard, free_port(), tiny, m1, old, replicas)
                for _ in range(args.runs):
                    rows.append({"clients": args.clients, "replicas": replicas,
                                 **measure(url, cfg, *versions, args.clients, args.seconds)})
                serve.shutdown()
        finally:
            serve.shutdown()
            ray.shutdown()
    goals = {"failed": "0", "order_ok": "True", "overlap_s": "0 with 1 replica", "switch_over_steady": "<= 2"}
    print(f"\n{'figure':20s} " + " ".join(f"{'run ' + str(i + 1):>10s}" for i in range(len(rows))) + "  goal")
    for k in rows[0]:
        print(f"{k:20s} " + " ".join(f"{r[k]!s:>10s}" for r in rows) + f"  {goals.get(k, '')}")
    if args.json:
        for r in rows:
            print(json.dumps(r))
    if args.doc:
        write_doc(args.doc, rows, "python bench/promote_load.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"wrote the table into {args.doc}")
    return rows


if __name__ == "__main__":
    main()
