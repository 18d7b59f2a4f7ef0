"""Serving that survives its head: the demo app on a 3-node local Ray cluster under faults, real HTTP.

    make train-demo && .venv/bin/python bench/head_faults.py --json      # ~10 minutes on 2 CPUs
    .venv/bin/python bench/head_faults.py --faults gcs --no-baseline     # the head kill alone

The cluster is what deploy/kuberay/rayservice.yaml runs, on loopback (bench/local_cluster.py): Redis,
a head that hosts nothing, two worker nodes with a proxy each, every node a `ray start --block` as in
a pod, so that a dead Ray process takes its node down; two Router and two Detector replicas spread
over the worker nodes. 8 clients in a closed loop post to worker A's proxy throughout; each fault
counts the requests answered from its start until the app is whole again plus --observe-s:

  gcs         SIGKILL the head's GCS: `ray start --block` takes the head down; after --head-down-s a
              new head starts on the same Redis. ready_s: from the restart until the controller
              lists the app RUNNING; then a changed config (a third Router) must be deployed
  router      SIGKILL a Router replica on worker A (the proxy's own node)
  controller  SIGKILL the Serve controller (it restarts on the head)
  node        SIGKILL worker B's raylet: B goes with its replicas; Serve puts them on A
  baseline    (a fresh cluster without Redis) the same head kill: what the option is for

A request fails when its answer is neither a 200 nor a JSON 503/429 with Retry-After (that is a
refusal a client can act on), or when it takes past the app's deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.local_cluster import NODE_IPS, LocalCluster, wait_for  # noqa: E402
from bench.serve_load import demo_args, require_adapters, sample_images  # noqa: E402
from bench.serve_soak import acceptable  # noqa: E402

FAULTS = ("gcs", "router", "controller", "node")


# --------------------------------------------------------------------------- the load


class Load:
    """`clients` threads posting images to `url` in a closed loop; every answer kept with its times."""

    def __init__(self, url: str, images: list[bytes], clients: int, deadline_s: float):
        self.url, self.images, self.deadline_s = url, images, deadline_s
        self.records: list[tuple[float, float, str, bool]] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def _client(self, k: int) -> None:
        # On a real cluster the clients run elsewhere; here they share 2 cores with it, so they yield to
        # its own processes (a head starting under full load can otherwise miss its agents' start-up limit).
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        session, i = requests.Session(), k
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                r = session.post(self.url, files={"image": ("x.png", self.images[i % len(self.images)])},
                                 timeout=self.deadline_s + 10)
                status, ok = str(r.status_code), acceptable(r.status_code, r.headers, r.content)
            except requests.RequestException as e:
                status, ok = type(e).__name__, False
                session = requests.Session()
                time.sleep(0.2)  # as a client would before it tries again; no spin on a refused connection
            t1 = time.monotonic()
            self.records.append((t0, t1, status, ok and t1 - t0 <= self.deadline_s))
            i += len(self.threads)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=self.deadline_s + 20)

    def window(self, start: float, end: float) -> dict:
        """The requests answered in [start, end) (one in flight when a fault struck counts for that
        fault): how many, how many failed, which answers, the slowest, and how many of the failures
        were sent more than a second after `start`, when a fault's first effects are past."""
        rows = [r for r in list(self.records) if start <= r[1] < end]
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r[2]] = statuses.get(r[2], 0) + 1
        failed = sum(not r[3] for r in rows)
        return {"requests": len(rows), "failed": failed, "failed_share": round(failed / max(1, len(rows)), 5),
                "failed_sent_later": sum(not r[3] and r[0] >= start + 1.0 for r in rows),
                "last_200_at_s": round(max((r[1] for r in rows if r[2] == "200"), default=start) - start, 1),
                "statuses": statuses, "slowest_s": round(max((r[1] - r[0] for r in rows), default=0.0), 2)}


# --------------------------------------------------------------------------- the faults


def serve_args(base: dict, routers: int) -> dict:
    """The app's args for this cluster: two Detector replicas (one per worker node under Serve's
    spreading), `routers` Router replicas, fixed counts so that 'whole again' is well defined."""
    args = json.loads(json.dumps(base))
    args["detector"] = {**args.get("detector", {}), "num_cpus": 0.5,
                        "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    args["router"] = {**args.get("router", {}), "num_cpus": 0.1,
                      "autoscaling": {"min_replicas": routers, "max_replicas": routers}}
    return args


def gcs_fault(cluster: LocalCluster, opts, base: dict) -> tuple[dict, dict]:
    """The head down for head_down_s, then a new one on the same Redis; a changed config afterwards."""
    t0 = time.monotonic()
    cluster.kill("head", "gcs_server")
    probes = probe_while(cluster, "a", t0 + opts.head_down_s)
    restart = time.monotonic()
    facts = {"head_down_s": round(restart - t0, 1), "probes_while_down": probes,
             "head_starts": cluster.restart_head()}

    def back() -> bool:
        if cluster.app_running(2, 2):
            return True
        if time.monotonic() - restart > 20 and cluster.alive_nodes() == 1:
            raise RuntimeError("the worker nodes are gone: the new head did not know them")
        return False

    try:
        wait_for(back, opts.ready_timeout_s, "the app RUNNING again")
    except RuntimeError as e:
        facts.update(ready_s=None, error=str(e), nodes_alive=cluster.alive_nodes())
        time.sleep(opts.observe_s)
        end = time.monotonic()
        return facts, {"while_down": (t0, restart), "after_return": (restart, end), "overall": (t0, end)}
    facts.update(ready_s=round(time.monotonic() - restart, 1), nodes_alive=cluster.alive_nodes())
    time.sleep(opts.observe_s)
    # A changed config must reach the new controller and become replicas: a third Router.
    cluster.deploy(serve_args(base, routers=3))
    try:
        facts["redeploy_s"] = wait_for(lambda: cluster.app_running(3, 2), opts.ready_timeout_s, "a third Router")
    except RuntimeError as e:
        facts.update(redeploy_s=None, error=str(e))
    end = time.monotonic()
    return facts, {"while_down": (t0, restart), "after_return": (restart, end), "overall": (t0, end)}


def probe_while(cluster: LocalCluster, node: str, until: float) -> dict:
    """Until `until`, once a second: does `node`'s proxy pass its health check (a RayService's readiness
    probe on worker pods) and its raylet (their liveness probe)? Per probe: answers OK, and the longest
    run of failures in a row (a Kubernetes probe acts on a run of failures, not on one)."""
    urls = {"proxy_healthz": f"{cluster.url(node)}/-/healthz",
            "raylet_healthz": f"http://{NODE_IPS[node]}:{cluster.agent_ports[node]}/api/local_raylet_healthz"}
    out = {"asked": 0, **{f"{k}_ok": 0 for k in urls}, **{f"{k}_failed_in_a_row": 0 for k in urls}}
    run = dict.fromkeys(urls, 0)
    while time.monotonic() < until:
        out["asked"] += 1
        for key, url in urls.items():
            ok = ok_get(url)
            out[f"{key}_ok"] += ok
            run[key] = 0 if ok else run[key] + 1
            out[f"{key}_failed_in_a_row"] = max(out[f"{key}_failed_in_a_row"], run[key])
        time.sleep(max(0.0, min(1.0, until - time.monotonic())))
    return out


def ok_get(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def replica_fault(cluster: LocalCluster, opts, kill, whole) -> tuple[dict, dict]:
    """`kill()`, then load until `whole()` (the app as it was, the dead part replaced) and observe_s more."""
    t0 = time.monotonic()
    kill()
    try:
        facts = {"ready_s": wait_for(whole, opts.ready_timeout_s, "the app whole again")}
    except RuntimeError as e:
        facts = {"ready_s": None, "error": str(e)}
    time.sleep(opts.observe_s)
    return facts, {"overall": (t0, time.monotonic())}


def router_fault(cluster: LocalCluster, opts, routers: int) -> tuple[dict, dict]:
    """SIGKILL a Router replica on worker A, whose proxy the clients use."""
    node_a = cluster.node_id("a")
    victim = next(r for r in cluster.replicas("Router") if r["node_id"] == node_a)

    def whole() -> bool:
        ids = {r["replica_id"] for r in cluster.replicas("Router")}
        return victim["replica_id"] not in ids and len(ids) >= routers and cluster.app_running(routers, 2)

    return replica_fault(cluster, opts, lambda: os.kill(victim["pid"], signal.SIGKILL), whole)


def controller_fault(cluster: LocalCluster, opts, routers: int) -> tuple[dict, dict]:
    (pid,) = cluster.nodes["head"].pids("ServeController")

    def whole() -> bool:
        return cluster.nodes["head"].pids("ServeController") not in ([], [pid]) and cluster.app_running(routers, 2)

    return replica_fault(cluster, opts, lambda: os.kill(pid, signal.SIGKILL), whole)


def node_fault(cluster: LocalCluster, opts, routers: int) -> tuple[dict, dict]:
    """SIGKILL worker B's raylet: the node goes, with its Router and Detector replicas."""
    node_b = cluster.node_id("b")

    def whole() -> bool:
        replicas = cluster.replicas("Router") + cluster.replicas("Detector")
        return all(r["node_id"] != node_b for r in replicas) and cluster.app_running(routers, 2)

    return replica_fault(cluster, opts, lambda: cluster.kill("b", "raylet"), whole)


def run_cluster(root: Path, base: dict, opts, redis: bool, faults: tuple[str, ...]) -> dict:
    cluster = LocalCluster(root, redis=redis)
    images = sample_images(16)
    out: dict = {"redis": redis}
    try:
        t0 = time.monotonic()
        cluster.start()
        cluster.deploy(serve_args(base, routers=2))
        wait_for(lambda: cluster.app_running(2, 2), opts.ready_timeout_s, "the app RUNNING")
        out["start_s"] = round(time.monotonic() - t0, 1)
        names = {cluster.node_id(n): n for n in ("a", "b")}
        out["placement"] = {d: sorted(names.get(r["node_id"], "head") for r in cluster.replicas(d))
                            for d in ("Router", "Detector")}
        deadline = float(base.get("request", {}).get("timeout_s", 30.0))
        with Load(cluster.url("a") + "/v1/ensemble", images, opts.clients, deadline) as load:
            time.sleep(3)
            steady = time.monotonic()
            time.sleep(opts.observe_s)
            windows: dict[str, dict] = {"steady": {"overall": (steady, time.monotonic())}}
            routers = 2
            for fault in faults:
                print(f"[{time.strftime('%H:%M:%S')}] fault {fault} (redis={redis})", flush=True)
                if fault == "gcs":
                    out[fault], windows[fault] = gcs_fault(cluster, opts, base)
                    if out[fault].get("redeploy_s") is None:
                        break  # without the app back, nothing after it means anything
                    routers = 3
                else:
                    fn = {"router": router_fault, "controller": controller_fault, "node": node_fault}[fault]
                    out[fault], windows[fault] = fn(cluster, opts, routers)
        # Every request has its answer now (or its client timeout): each counts for the fault during which
        # it finished, a fault's window running on to the next fault's start (the last one's to the end),
        # so that a request still in flight when a window closed is counted too.
        order = list(windows)
        for i, fault in enumerate(order):
            closes = windows[fault]["overall"][1]
            follows = windows[order[i + 1]]["overall"][0] if i + 1 < len(order) else float("inf")
            for name, (a, b) in windows[fault].items():
                stats = load.window(a, follows if b == closes else b)
                out.setdefault(fault, {}).update(stats if name == "overall" else {name: stats})
        out["steady"]["rps"] = round(out["steady"]["requests"] / opts.observe_s, 1)
    finally:
        cluster.stop()
    return out


def main(argv=None, base: dict | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the head kill on a cluster without Redis")
    ap.add_argument("--head-down-s", type=float, default=30.0)
    ap.add_argument("--observe-s", type=float, default=10.0, help="load after each fault once the app is whole")
    ap.add_argument("--ready-timeout-s", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--work-dir", type=Path, help="keep the clusters' logs here (default: a temporary directory)")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args(argv)
    if base is None:
        base = demo_args()
        require_adapters(base)
    # Short paths: Ray's session sockets live under them (108-byte limit).
    with tempfile.TemporaryDirectory(prefix="aigdf-", dir="/tmp") as tmp:
        work = opts.work_dir or Path(tmp)
        result = {"with_redis": run_cluster(work / "r", base, opts, True, tuple(opts.faults))}
        if opts.baseline:
            print(json.dumps(result), flush=True)  # the baseline is a fresh cluster: keep this whatever it does
            result["without_redis"] = run_cluster(work / "p", base, opts, False, ("gcs",))
    print(json.dumps(result, indent=None if opts.json else 2))
    return result


if __name__ == "__main__":
    # A stopped bench stops its clusters (run_cluster's finally) instead of leaving Ray processes behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
