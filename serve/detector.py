"""The model replica: an aigd.scorer.Scorer (the base model with every adapter) behind Serve's
request batching. Importing this module loads nothing; the model loads in the replica."""

import asyncio
import time

import numpy as np
from ray import serve

from aigd import config as C
from aigd.errors import AdapterUnavailable, AigdError, error_body

BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
UNHEALTHY_AFTER = 3  # consecutive batches where every adapter failed


@serve.deployment
class Detector:
    """Base model + every adapter in one replica; requests are batched, one forward per adapter."""

    def __init__(self, cfg: dict):
        from ray.serve.metrics import Histogram

        from aigd.scorer import Scorer  # here, not at the top: the router replicas never import torch

        self.cfg = C.from_dict(C.ServeConfig, cfg)
        d = self.cfg.detector
        self.scorer = Scorer(self.cfg, on_adapter_error=d.on_adapter_error)
        self._score.set_max_batch_size(d.max_batch_size)
        self._score.set_batch_wait_timeout_s(d.batch_wait_timeout_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.failed_batches = 0
        self.batch_sizes = Histogram("aigd_batch_size", description="images per model batch",
                                     boundaries=BATCH_SIZES)

    async def score(self, image: np.ndarray, adapters: tuple[str, ...]) -> dict:
        t0 = time.perf_counter()
        members, batch_size = await self._score((image, tuple(adapters)))
        return {"members": members, "replica": self.replica, "batch_size": batch_size,
                "score_ms": round((time.perf_counter() - t0) * 1000, 2)}

    @serve.batch
    async def _score(self, items: list[tuple[np.ndarray, tuple[str, ...]]]) -> list:
        self.batch_sizes.observe(len(items))
        # A worker thread, so health checks and /v1/models stay answered during a forward pass.
        results = await asyncio.to_thread(self.scorer.score_requests, [a for a, _ in items],
                                          [names for _, names in items])
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

    def info(self) -> dict:
        return {**self.scorer.describe(), "replica": self.replica}

    def check_health(self) -> None:
        if self.failed_batches >= UNHEALTHY_AFTER:
            raise RuntimeError(f"every adapter failed on the last {self.failed_batches} batches")
