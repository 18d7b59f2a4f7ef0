"""A Serve app deployed from a config, and closed-loop HTTP load with a record of every answer: the
promotion test and bench/promote_load.py drive a running app with it while it switches versions."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import requests


def deploy(dashboard: str, port: int, args: dict, timeout_s: float = 300.0) -> str:
    """Deploy `serve.app:build_app` with these ServeConfig args through the Serve REST API, as
    `serve deploy` does (the Detector named, as configs/serve_*.yaml do); its URL once it is ready."""
    body = {"http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{"name": "aigd", "route_prefix": "/", "import_path": "serve.app:build_app",
                              "args": args, "deployments": [{"name": "Detector"}]}]}
    requests.put(f"{dashboard}/api/serve/applications/", json=body, timeout=60).raise_for_status()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"the app at {url} did not become ready in {timeout_s:g} s")


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() at send
    received: float
    status: int  # 0: no HTTP answer (connection error)
    version: str | None  # the version the answer names
    replica: str | None  # the model replica that gave it


class ClosedLoop:
    """`clients` threads, each sending the next request when its last answer is in."""

    def __init__(self, url: str, image: bytes, clients: int = 8, timeout_s: float = 60.0):
        self.url, self.image, self.clients, self.timeout_s = url, image, clients, timeout_s
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = session.post(self.url, files={"image": ("x.png", self.image)}, timeout=self.timeout_s)
                status, (version, replica) = r.status_code, _version(r)
            except requests.RequestException:
                status, version, replica = 0, None, None
            with self._lock:
                self.answers.append(Answer(t0, time.monotonic(), status, version, replica))

    def __enter__(self) -> "ClosedLoop":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s)

    def between(self, t0: float, t1: float) -> list[Answer]:
        """Answers to requests sent in [t0, t1)."""
        with self._lock:
            return [a for a in self.answers if t0 <= a.sent < t1]


def _version(r: requests.Response) -> tuple[str | None, str | None]:
    try:
        body = r.json()
        return body["model"]["version"], body["timing"]["replica"]
    except (ValueError, KeyError, TypeError):
        return None, None


def p99_ms(answers: list[Answer]) -> float:
    return float(np.percentile([(a.received - a.sent) * 1000 for a in answers], 99)) if answers else float("nan")


def switch_order_ok(answers: list[Answer], old: str, new: str) -> bool:
    """Every answer names `old` or `new`, and on each replica, once an answer from `new` has
    arrived, no request sent after it is answered by `old`: one switch per replica, no flapping.
    (Across replicas Serve rolls the switch out one replica at a time: see `overlap_s`.)"""
    if any(a.version not in (old, new) for a in answers):
        return False
    for replica in {a.replica for a in answers}:
        mine = [a for a in answers if a.replica == replica]
        first_new = min((a.received for a in mine if a.version == new), default=float("inf"))
        if any(a.version == old and a.sent > first_new for a in mine):
            return False
    return True


def overlap_s(answers: list[Answer], old: str, new: str) -> float:
    """How long both versions were answering: from the first answer of `new` to the last of `old`
    (0 when the switch was clean across the whole app)."""
    first_new = min((a.received for a in answers if a.version == new), default=float("inf"))
    last_old = max((a.received for a in answers if a.version == old), default=float("-inf"))
    return max(0.0, last_old - first_new) if first_new != float("inf") else 0.0
