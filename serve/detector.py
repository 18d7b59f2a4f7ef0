"""The model replica: an aigd.scorer.Scorer (the base model with every adapter) behind Serve's
request batching. Importing this module loads nothing; the model loads in the replica.

Its `user_config` (aigd.config.ServingVersions) names the version each adapter serves and the
candidates in shadow; Serve calls `reconfigure` on every running replica when it changes
(`aigd promote`), and the replica keeps answering meanwhile.
"""

import asyncio
import logging
import random
import threading
import time

import numpy as np
from ray import serve

from aigd import config as C
from aigd.errors import AdapterUnavailable, AigdError, Overloaded, error_body
from serve.batcher import Batcher

log = logging.getLogger("ray.serve")

BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
P_DIFF = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
UNHEALTHY_AFTER = 3  # consecutive batches where every adapter failed


@serve.deployment
class Detector:
    """Base model + every adapter in one replica; requests are batched (serve.batcher), one forward per adapter."""

    def __init__(self, cfg: dict):
        from ray.serve.metrics import Histogram

        from aigd.scorer import Scorer  # here, not at the top: the router replicas never import torch

        self.cfg = C.from_dict(C.ServeConfig, cfg)
        d = self.cfg.detector
        # Every version runs a forward before it serves: Serve routes to a replica once __init__ returns.
        self.scorer = Scorer(self.cfg, on_adapter_error=d.on_adapter_error, warm_up=True)
        self.batcher = Batcher(self._score, d.max_batch_size, d.batch_wait_timeout_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.failed_batches = 0
        self.batch_sizes = Histogram("aigd_batch_size", description="images per model batch",
                                     boundaries=BATCH_SIZES)
        self.shadow = ShadowScoring(self.scorer)
        self.refused: dict[str, dict] = {}  # adapter -> the version a reconfigure could not load, and why
        self.ensemble_members = list(self.cfg.ensemble.members or self.cfg.adapters)  # as the router's
        self.explaining = 0  # explanation threads running
        self._explain_slots = threading.Lock()

    async def reconfigure(self, user_config: dict) -> None:
        """Switch adapters to the named versions and set the shadows. A version that fails to load
        is recorded (see /v1/models) and changes nothing: this replica keeps its old version."""
        try:
            want = C.from_dict(C.ServingVersions, user_config or {})
        except Exception as e:  # noqa: BLE001 - a hand-edited user_config: refuse it, keep serving what is loaded
            log.error("user_config refused: %s", e)
            self.refused = {"user_config": {"version": None, "error": str(e)}}
            return
        await asyncio.to_thread(self._apply, want)

    def _apply(self, want: C.ServingVersions) -> None:
        refused = {}
        for name, version in want.versions.items():
            if name in self.scorer.unavailable:  # never loaded (detector.on_adapter_error: skip); see /readyz
                continue
            try:
                self.scorer.switch(name, self._ref(name, version))
            except Exception as e:  # noqa: BLE001 - a bad version must never take the replica down
                log.error("adapter %s: version %s refused: %s", name, version, e)
                refused[name] = {"version": version, "error": str(e)}
        for name in set(self.scorer.shadows) | set(want.shadow):
            shadow = want.shadow.get(name)
            try:
                self.scorer.set_shadow(name, self._ref(name, shadow.version) if shadow else None)
            except Exception as e:  # noqa: BLE001
                log.error("adapter %s: shadow version %s refused: %s", name, shadow and shadow.version, e)
                refused[f"{name} (shadow)"] = {"version": shadow and shadow.version, "error": str(e)}
        self.shadow.shadows = {n: s for n, s in want.shadow.items() if n in self.scorer.shadows}
        self.refused = refused

    def _ref(self, name: str, version: str) -> str:
        return f"{self.scorer.member(name).version.entry}/{version}"

    async def score(self, image: np.ndarray, adapters: tuple[str, ...]) -> dict:
        t0 = time.perf_counter()
        members, batch_size = await self.batcher.submit((image, tuple(adapters)))
        return {"members": members, "replica": self.replica, "batch_size": batch_size,
                "score_ms": round((time.perf_counter() - t0) * 1000, 2)}

    async def _score(self, items: list[tuple[np.ndarray, tuple[str, ...]]]) -> list:
        self.batch_sizes.observe(len(items))
        # A worker thread, so health checks and /v1/models stay answered during a forward pass.
        images, wanted = [a for a, _ in items], [names for _, names in items]
        results = await asyncio.to_thread(self.scorer.score_requests, images, wanted)
        self.shadow.after(images, wanted, results)  # in the background: the answers leave now
        all_failed = all(isinstance(v, Exception) for r in results for v in r.values())
        self.failed_batches = self.failed_batches + 1 if all_failed else 0
        return [({name: self._member(name, v) for name, v in r.items()}, len(items)) for r in results]

    @staticmethod
    def _member(name: str, value) -> dict:
        """A member's answer (aigd.decision.member_answer), or the error body of its failure."""
        if isinstance(value, Exception):
            err = value if isinstance(value, AigdError) else AdapterUnavailable(f"adapter {name} failed")
            return error_body(err)
        return value

    async def explain(self, image: np.ndarray, adapter: str, method: str | None, deadline: float) -> dict:
        """An answer with its map (aigd.explain), or an error body. At most explain.max_concurrent run
        on this replica: a slot is freed when the explanation's thread ends, not when its request
        does, and a cancelled request's thread stops before its next pass. `deadline` is wall-clock
        (time.time()), the router's own."""
        from aigd.explain import Budget, explain

        with self._explain_slots:
            if self.explaining >= self.cfg.explain.max_concurrent:
                return error_body(Overloaded(f"this replica is already making {self.explaining} explanation(s) "
                                             "(explain.max_concurrent); retry later"))
            self.explaining += 1
        budget = Budget(time.monotonic() + (deadline - time.time()))

        def run() -> dict:
            try:
                return explain(self.scorer, image, adapter, self.ensemble_members, self.cfg.ensemble,
                               self.cfg.explain, method, budget)
            finally:
                with self._explain_slots:
                    self.explaining -= 1

        t0 = time.perf_counter()
        try:
            answer = await asyncio.to_thread(run)
        except asyncio.CancelledError:  # the client left or the router's deadline passed
            budget.stop.set()
            raise
        except AigdError as e:
            return error_body(e)
        except Exception:  # noqa: BLE001 - logged here; the client gets a 503, the replica lives on
            log.exception("explanation with %s failed", adapter)
            return error_body(AdapterUnavailable(f"explanation with {adapter} failed"))
        return {"answer": answer, "replica": self.replica, "explain_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def info(self) -> dict:
        return {**self.scorer.describe(), "replica": self.replica, "refused_versions": self.refused,
                "explanations_running": self.explaining}

    def check_health(self) -> None:
        if self.failed_batches >= UNHEALTHY_AFTER:
            raise RuntimeError(f"every adapter failed on the last {self.failed_batches} batches")


class ShadowScoring:
    """Scores a share of live images again with each member's shadow version, after their answers
    have left, and exports how the two agree. At most one shadow forward runs at a time, sized to
    the budget from the measured time per shadow image: a live batch waits behind shadow work for
    about `budget_ms` at most (the scoring lock). Sampled images beyond that are skipped and counted."""

    def __init__(self, scorer):
        from ray.serve.metrics import Counter, Histogram

        self.scorer = scorer
        self.shadows: dict[str, C.ShadowConfig] = {}
        self.ms_per_image: float | None = None  # measured on this replica; None until the first shadow batch
        self.running: asyncio.Task | None = None
        tags = ("adapter", "serving", "candidate")
        self.scored = Counter("aigd_shadow_images_total", description="images scored in shadow", tag_keys=tags)
        self.agreed = Counter("aigd_shadow_agreements_total", description="shadow answers with the serving label",
                              tag_keys=tags)
        self.flips = Counter("aigd_shadow_label_flips_total", description="shadow answers with another label",
                             tag_keys=(*tags, "serving_label", "candidate_label"))
        self.skipped = Counter("aigd_shadow_skipped_total", description="sampled images skipped: shadow busy",
                               tag_keys=("adapter",))
        self.diff = Histogram("aigd_shadow_p_fake_abs_diff", description="|P(fake) candidate - serving|",
                              boundaries=P_DIFF, tag_keys=tags)

    def after(self, images: list, wanted: list, results: list[dict]) -> None:
        for name, shadow in self.shadows.items():
            picked = [i for i, names in enumerate(wanted) if name in names and "error" not in
                      _as_dict(results[i].get(name)) and random.random() < shadow.share]
            busy = self.running is not None and not self.running.done()
            fits = 0 if busy else self._fits(shadow.budget_ms)
            if len(picked) > fits:
                self.skipped.inc(len(picked) - fits, tags={"adapter": name})
                picked = picked[:fits]
            if picked:
                self.running = asyncio.create_task(self._score(name, [images[i] for i in picked],
                                                               [results[i][name] for i in picked]))

    def _fits(self, budget_ms: float) -> int:
        """Images one shadow forward may take within the budget (one until a time is measured)."""
        return 1 if self.ms_per_image is None else max(1, int(budget_ms // max(self.ms_per_image, 1e-3)))

    async def _score(self, name: str, images: list, serving: list[dict]) -> None:
        t0 = time.perf_counter()
        try:
            p, cand = await asyncio.to_thread(self.scorer.member_p_fake, images, name, True)
        except Exception:  # noqa: BLE001 - shadow work never reaches a client
            log.exception("shadow scoring of %s failed", name)
            return
        ms = (time.perf_counter() - t0) * 1000 / len(images)
        self.ms_per_image = ms if self.ms_per_image is None else 0.8 * self.ms_per_image + 0.2 * ms
        for live, pc in zip(serving, p):
            shadow = self.scorer.answer(cand, float(pc))
            tags = {"adapter": name, "serving": live["model"]["version"], "candidate": cand.version.version}
            self.scored.inc(tags=tags)
            self.diff.observe(abs(float(pc) - live["p_fake"]), tags=tags)
            if shadow["label"] == live["label"]:
                self.agreed.inc(tags=tags)
            else:
                self.flips.inc(tags={**tags, "serving_label": live["label"], "candidate_label": shadow["label"]})


def _as_dict(value) -> dict:
    return value if isinstance(value, dict) else {"error": value}
