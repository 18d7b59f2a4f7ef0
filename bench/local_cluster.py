"""A Ray cluster of real processes on one machine, as a RayService runs it: Debian's redis-server with
deploy/kuberay/redis.yaml's arguments, a head that hosts nothing (GCS, dashboard, Serve controller, a
proxy) on RAY_REDIS_ADDRESS, two worker nodes with a proxy each on its own port, every node a
`ray start --block` as in a pod. Watched through the dashboard's REST API, never ray.init(): a driver
dies with the GCS it is connected to. Used by bench/head_faults.py and tests/test_head_faults.py.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_load import free_port  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
APP = "aigd"
# Each node its own loopback address (Ray replaces 127.0.0.1 itself by the machine's outward address).
NODE_IPS = {"head": "127.0.0.2", "a": "127.0.0.3", "b": "127.0.0.4"}


@dataclass
class Node:
    """One `ray start --block` process: its children are the node's Ray processes, as in a pod."""
    name: str
    proc: subprocess.Popen
    log: Path

    def pids(self, needle: str) -> list[int]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in kids:
            try:
                if needle in " ".join(p.cmdline()):
                    out.append(p.pid)
            except psutil.Error:
                continue
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class LocalCluster:
    """Redis (or none), a head without resources and two worker nodes ("a", "b"), each on its own
    loopback address; every port picked free here; each node's processes descend from its own
    `ray start --block`."""
    root: Path
    redis: bool = True
    worker_cpus: int = 2
    # KubeRay gives worker pods 600 s when GCS fault tolerance is on (Ray's default is 60).
    reconnect_s: int = 600
    nodes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.gcs_port, self.dashboard_port, self.http_port = free_port(), free_port(), free_port()
        self.worker_http = {"a": free_port(), "b": free_port()}
        self.redis_port, self.password = free_port(), secrets.token_hex(16)
        self.namespace = f"aigd-{secrets.token_hex(4)}"
        self.redis_proc = None
        self.head_starts = 0
        self.agent_ports: dict[str, int] = {}

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.worker_http[node] if node in self.worker_http else self.http_port}"

    def _env(self, tmp: str, **extra) -> dict:
        """Each node its own RAY_TMPDIR, as each pod its own /tmp: `ray start --head` refuses to start
        where the address file of a previous head names a GCS that a local raylet still points at."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        (self.root / tmp).mkdir(exist_ok=True)
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the Makefile's, for a one-node cluster on loopback) refuses
        # worker nodes; here every node has its own loopback address instead.
        env.update(RAY_TMPDIR=str(self.root / tmp), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), **extra)
        return env

    def start(self) -> None:
        if self.redis:
            self._start_redis()
        self.start_head()
        # One at a time: each `ray start` picks its raylet's free ports by probing, and two at once on one
        # machine can pick the same one.
        for n, name in enumerate(("a", "b"), start=2):
            self._start_worker(name)
            self.wait_nodes(n)

    def _start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found: `apt-get install redis-server` (Debian's; .ci/run does it)")
        with open(self.root / "redis.log", "ab") as out:
            self.redis_proc = subprocess.Popen([binary, *redis_args(self.password, self.redis_port, self.root)],
                                               stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ping = subprocess.run(["redis-cli", "-p", str(self.redis_port), "--no-auth-warning", "-a", self.password,
                                   "ping"], capture_output=True, text=True)
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.2)
        raise RuntimeError("redis-server did not answer PING within 20 s")

    def _launch(self, name: str, args: list[str], env: dict) -> Node:
        log = self.root / f"node-{name}.log"
        agent_port = free_port()
        # Every port given: a port Ray is left to pick, its process binds and then reports in a file the
        # raylet waits for, and under this machine's load that wait can pass its limit (the raylet aborts).
        ports = {flag: free_port() for flag in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                                "dashboard-agent-grpc-port", "runtime-env-agent-port")}
        common = ["--block", f"--node-ip-address={NODE_IPS[name]}", "--disable-usage-stats",
                  f"--dashboard-agent-listen-port={agent_port}", "--min-worker-port=0", "--max-worker-port=0",
                  f"--object-store-memory={256 * 1024**2}", *(f"--{k}={v}" for k, v in ports.items())]
        with open(log, "ab") as out:  # the child keeps its own copy of the handle
            proc = subprocess.Popen([RAY, "start", *common, *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes[name] = Node(name, proc, log)
        self.agent_ports[name] = agent_port
        return self.nodes[name]

    def start_head(self) -> Node:
        """The head, as KubeRay starts it: RAY_REDIS_ADDRESS and the storage namespace in its env,
        the password on the command line; nothing schedulable on it."""
        self.head_starts += 1
        env = self._env(f"h{self.head_starts}", RAY_external_storage_namespace=self.namespace)
        args = ["--head", f"--port={self.gcs_port}", "--num-cpus=0", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}"]
        if self.redis:
            env["RAY_REDIS_ADDRESS"] = f"127.0.0.1:{self.redis_port}"
            args.append(f"--redis-password={self.password}")
        launched = time.time()
        node = self._launch("head", args, env)

        def up() -> bool:
            """This head's raylet registered (the GCS lists the dead head ALIVE until its health checks fail)."""
            if not node.alive():
                raise RuntimeError(f"the head exited while starting: see {node.log}")
            body = get_json(f"{self.dashboard}/nodes?view=summary")
            return body is not None and any(
                n["raylet"].get("isHeadNode") and n["raylet"]["state"] == "ALIVE"
                and int(n["raylet"].get("startTimeMs", 0)) / 1000 >= launched - 1 for n in body["data"]["summary"])

        wait_for(up, 120, "the head node")
        return node

    def restart_head(self, attempts: int = 3) -> int:
        """A new head on the same ports and Redis; one that dies starting is started again, as Kubernetes
        restarts a head container. Returns the attempts it took."""
        for attempt in range(1, attempts):
            try:
                self.start_head()
                return attempt
            except RuntimeError as e:
                print(f"  head start {attempt} failed ({e}); starting it again", flush=True)
                self._stop_node(self.nodes["head"])  # one that timed out may still hold the head's ports
        self.start_head()
        return attempts

    def _start_worker(self, name: str) -> Node:
        env = self._env(name, RAY_SERVE_WORKER_PROXY_HTTP_PORT=str(self.worker_http[name]))
        if self.redis:  # as KubeRay sets it with GCS fault tolerance; without, Ray's default (60 s)
            env["RAY_gcs_rpc_server_reconnect_timeout_s"] = str(self.reconnect_s)
        args = [f"--address={NODE_IPS['head']}:{self.gcs_port}", f"--num-cpus={self.worker_cpus}"]
        return self._launch(name, args, env)

    def alive_nodes(self) -> int | None:
        body = get_json(f"{self.dashboard}/nodes?view=summary")
        if body is None:
            return None
        return sum(n["raylet"]["state"] == "ALIVE" for n in body["data"]["summary"])

    def wait_nodes(self, n: int, timeout_s: float = 90) -> None:
        def ready() -> bool:
            dead = [name for name, node in self.nodes.items() if not node.alive()]
            if dead:
                raise RuntimeError(f"node {dead[0]} exited while starting: see {self.nodes[dead[0]].log}")
            return (self.alive_nodes() or 0) >= n

        wait_for(ready, timeout_s, f"{n} alive nodes")

    def kill(self, node: str, process: str) -> None:
        """SIGKILL one Ray process of `node` (`gcs_server`, `raylet`); its `ray start --block` then
        takes the rest of the node down, as a pod's container exits."""
        pids = self.nodes[node].pids(process)
        if not pids:
            raise RuntimeError(f"no {process} process on node {node}")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        self.nodes[node].proc.wait(timeout=60)

    @staticmethod
    def _stop_node(node: Node) -> None:
        """SIGKILL a node's `ray start` and everything under it."""
        try:
            kids = psutil.Process(node.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        for p in [*kids, node.proc]:
            try:
                p.kill()
            except (psutil.Error, ProcessLookupError):
                pass
        try:
            node.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        for node in self.nodes.values():
            self._stop_node(node)
        # Workers whose raylet died before them re-parent to init: find them by the RAY_TMPDIR they inherited.
        for p in psutil.process_iter():
            try:
                if p.environ().get("RAY_TMPDIR", "").startswith(f"{self.root}/"):
                    p.kill()
            except psutil.Error:
                pass
        if self.redis_proc is not None:
            self.redis_proc.kill()
            self.redis_proc.wait(timeout=30)

    # ---- Serve, through the dashboard (as KubeRay sends serveConfigV2)

    def deploy(self, args: dict) -> None:
        config = {"proxy_location": "EveryNode",
                  "http_options": {"host": "127.0.0.1", "port": self.http_port, "request_timeout_s": 70},
                  "applications": [{"name": APP, "route_prefix": "/", "import_path": "serve.app:build_app",
                                    "deployments": [{"name": "Detector"}], "args": args}]}
        r = requests.put(f"{self.dashboard}/api/serve/applications/", json=config, timeout=60)
        r.raise_for_status()

    def serve_state(self) -> dict | None:
        return get_json(f"{self.dashboard}/api/serve/applications/")

    def replicas(self, deployment: str) -> list[dict]:
        """The RUNNING replicas of `deployment` (each with node_id and pid), per the Serve controller."""
        state = self.serve_state() or {}
        app = (state.get("applications") or {}).get(APP) or {}
        dep = (app.get("deployments") or {}).get(deployment) or {}
        return [r for r in dep.get("replicas", []) if r.get("state") == "RUNNING"]

    def app_running(self, routers: int, detectors: int) -> bool:
        state = self.serve_state() or {}
        app = (state.get("applications") or {}).get(APP) or {}
        return (app.get("status") == "RUNNING" and len(self.replicas("Router")) >= routers
                and len(self.replicas("Detector")) >= detectors)

    def node_id(self, node: str) -> str:
        """The Ray node id of `node`, from its raylet's command line."""
        for pid in self.nodes[node].pids("raylet"):
            for arg in psutil.Process(pid).cmdline():
                if arg.startswith("--node_id="):
                    return arg.split("=", 1)[1]
        raise RuntimeError(f"no raylet on node {node}")


def redis_args(password: str, port: int, data_dir: Path) -> list[str]:
    """deploy/kuberay/redis.yaml's container args (persistence included), with this password, a
    loopback port and a local data directory."""
    import yaml

    docs = yaml.safe_load_all((REPO / "deploy" / "kuberay" / "redis.yaml").read_text())
    (container,) = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
    args = [a.replace("$(REDIS_PASSWORD)", password) for a in container["args"]]
    args[args.index("--dir") + 1] = str(data_dir)  # redis-server changes into each --dir it is given
    return [*args, "--port", str(port), "--bind", "127.0.0.1"]


def get_json(url: str) -> dict | None:
    try:
        r = requests.get(url, timeout=5)
        return r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def wait_for(ready, timeout_s: float, what: str) -> float:
    """Seconds until `ready()` held; RuntimeError naming `what` past `timeout_s`."""
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.5)
    return round(time.monotonic() - t0, 1)
