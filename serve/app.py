"""Ray Serve app: one Detector deployment (serve/detector.py) behind a FastAPI router.

    serve run configs/serve_demo.yaml        # local; Ctrl-C stops it
    serve deploy configs/serve_7b.yaml       # onto a running cluster

Nothing heavy happens at import: `build_app(args)` validates `args` as an `aigd.config.ServeConfig`
and binds the deployments; the model loads inside the Detector replicas.
"""

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from aigd import config as C
from aigd import provenance, registry
from aigd.decision import ENSEMBLE, ensemble_answer
from aigd.errors import (AdapterUnavailable, AigdError, DeadlineExceeded, MemberFailed, NotFound, Overloaded,
                         ReplicaLost, UnknownAdapter, error_body, from_body, http_status)
from aigd.image_view import prepare
from aigd.manifest import policy_for
from serve.auth import api_keys, check_api_key
from serve.detector import Detector
from serve.http_api import error_response, image_payloads, new_api, read_body, request_id
from serve.openapi import ROUTES, describe_deployment

log = logging.getLogger("ray.serve")

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]


@serve.deployment
@serve.ingress()
class Router:
    """The HTTP front: access, body limits, admission and errors, then the Detector's answers.

    serve.ingress() takes no app: each instance builds its own in __serve_build_asgi_app__, so the
    OpenAPI document names this deployment's adapters and auth even beside another app's Router in
    one process."""

    def __init__(self, detector: DeploymentHandle, cfg: dict):
        from ray.serve.metrics import Counter, Histogram

        self.detector = detector
        self.cfg = C.from_dict(C.ServeConfig, cfg)
        self.policy = policy_for(self.cfg)
        self.keys = api_keys(self.cfg.auth) if self.cfg.auth.enabled else []
        self.ensemble_members = list(self.cfg.ensemble.members or self.cfg.adapters)
        self.in_flight = 0
        # The replica's CPU budget for request work (JSON/base64 parsing, image decoding): a few
        # threads, so the event loop keeps answering, memory stays bounded, and work a cancelled
        # request (client gone, deadline passed) had queued is dropped before it starts.
        self.cpu_pool = ThreadPoolExecutor(self.cfg.router.decode_concurrency, thread_name_prefix="decode")
        # Provenance reads in their own threads: a slow or hostile metadata block never delays a decode.
        self.metadata_pool = ThreadPoolExecutor(self.cfg.router.decode_concurrency, thread_name_prefix="provenance")
        self.requests = Counter("aigd_requests_total", description="HTTP requests",
                                tag_keys=("endpoint", "adapter", "status"))
        self.verdicts = Counter("aigd_verdicts_total", description="answers by label",
                                tag_keys=("adapter", "label"))
        self.latency = Histogram("aigd_request_latency_ms", description="request latency",
                                 boundaries=LATENCY_MS, tag_keys=("endpoint",))
        self.declared = Counter("aigd_provenance_declared_total", description="images by what their metadata "
                                "declares (aigd.provenance)", tag_keys=("declared",))

    # ---- plumbing: access, body, admission, errors, metrics

    async def _answer(self, request: Request, endpoint: str, adapter: str, work, body: bool = True,
                      timeout_s: float | None = None) -> JSONResponse:
        """Key check, then the whole body (before admission: a slow upload holds no slot), then
        admission and `work(body)` under the request deadline; every failure a JSON error. A full
        replica refuses before reading the body, which keeps overload cheap."""
        t0 = time.perf_counter()
        try:
            if self.cfg.auth.enabled:
                check_api_key(request, self.keys)
            self._check_capacity()  # full already: refuse before pulling the body through the proxy
            data = await read_body(request, self.cfg.request) if body else b""
            answer = await self._admitted(work, data, timeout_s or self.cfg.request.timeout_s)
            response = JSONResponse({**answer, "request_id": request_id()})
        except AigdError as e:
            response = error_response(e, self.cfg.retry_after_s)
        except Exception as e:  # never a traceback, never a dead replica; the log keeps the details
            log.exception("%s failed", endpoint)
            response = error_response(e, self.cfg.retry_after_s)
        # A label per configured name only: a client cannot grow the metrics with made-up names.
        label = adapter if adapter in self.cfg.adapters or adapter in (ENSEMBLE, "") else "unknown"
        self.requests.inc(tags={"endpoint": endpoint, "adapter": label, "status": str(response.status_code)})
        self.latency.observe((time.perf_counter() - t0) * 1000, tags={"endpoint": endpoint})
        return response

    async def _cpu(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, functools.partial(fn, *args))

    def _check_capacity(self) -> None:
        if self.in_flight >= self.cfg.router.max_in_flight:
            raise Overloaded("server busy; retry later")

    async def _admitted(self, work, data: bytes, timeout_s: float):
        self._check_capacity()
        self.in_flight += 1
        try:
            async with asyncio.timeout(timeout_s):
                return await work(data)
        except TimeoutError:
            raise DeadlineExceeded(f"not answered within {timeout_s:g} s; retry later") from None
        finally:
            self.in_flight -= 1

    async def _prepare(self, data: bytes) -> tuple[np.ndarray, dict]:
        """The model's view of the image, and what traces it: the SHA-256 of the bytes received (in the
        decode's job) and the provenance block, read from those bytes beside the decode. Once the
        decode is done the block gets provenance.timeout_s more; then the answer goes without it."""
        cfg = self.cfg.provenance
        loop = asyncio.get_running_loop()
        reading = loop.run_in_executor(self.metadata_pool, provenance.read, data, cfg) if cfg.enabled else None
        try:
            pixels, sha = await self._cpu(self._decode, data)
        except BaseException:
            if reading is not None:
                reading.cancel()
            raise
        traced = {"image_sha256": sha}
        if reading is not None:
            try:
                traced["provenance"] = await asyncio.wait_for(reading, cfg.timeout_s)
            except TimeoutError:
                traced["provenance"] = provenance.empty(f"not read within provenance.timeout_s = {cfg.timeout_s:g} s")
            except Exception:  # read() reports what it cannot read; anything else must not cost the answer
                log.exception("provenance read failed")
                traced["provenance"] = provenance.empty("unreadable")
            self.declared.inc(tags={"declared": traced["provenance"]["declared"]})
        return pixels, traced

    def _decode(self, data: bytes) -> tuple[np.ndarray, str]:
        return prepare(data, self.cfg.limits, self.policy), provenance.sha256(data)

    async def _score(self, data: bytes, adapters: tuple[str, ...]) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        pixels, origin = await self._prepare(data)
        t1 = time.perf_counter()
        out = await self._replica("score", pixels, adapters)
        timing = {"decode_ms": round((t1 - t0) * 1000, 2), "model_ms": round((time.perf_counter() - t1) * 1000, 2),
                  "batch_size": out["batch_size"], "replica": out["replica"]}
        return out["members"], {**origin, "timing": timing}

    async def _replica(self, method: str, *args) -> dict:
        """A model replica's answer (`score`, `explain`). Neither has side effects, so a request whose
        replica died under it (SIGKILL, OOM, node loss) is sent once more; Serve routes it to a live replica."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(2):
            try:
                return await getattr(self.detector, method).remote(*args)
            except BackPressureError:
                raise Overloaded("model replicas are at capacity; retry later") from None
            except RayActorError:
                log.warning("model replica died under a request (attempt %d of 2)", attempt + 1)
        raise ReplicaLost("the model replica was lost twice; retry later")

    def _check_adapter(self, adapter: str) -> None:
        if adapter not in self.cfg.adapters:
            raise UnknownAdapter(f"unknown adapter {adapter!r}; configured: {sorted(self.cfg.adapters)}")

    async def _detect_one(self, data: bytes, adapter: str) -> dict:
        members, traced = await self._score(data, (adapter,))
        m = members[adapter]
        if "error" in m:
            raise AdapterUnavailable(m["error"]["message"])
        self.verdicts.inc(tags={"adapter": adapter, "label": m["label"]})
        return {**m, **traced}

    async def _ensemble_one(self, data: bytes) -> dict:
        members, traced = await self._score(data, tuple(self.ensemble_members))
        ok = {n: m for n, m in members.items() if "error" not in m}
        failed = {n: m["error"]["message"] for n, m in members.items() if "error" in m}
        if failed and (self.cfg.ensemble.on_member_failure == "fail" or not ok):
            raise MemberFailed("ensemble member(s) failed: " + "; ".join(f"{n}: {r}" for n, r in failed.items()))
        answer = ensemble_answer(ok, failed, self.cfg.ensemble)
        self.verdicts.inc(tags={"adapter": ENSEMBLE, "label": answer["label"]})
        return {**answer, **traced}

    # ---- the app: this instance's routes (paths and docs: serve/openapi.py) and OpenAPI document

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = new_api()
        for name, (method, path, docs) in ROUTES.items():
            hidden = name == "explain" and not self.cfg.explain.enabled  # answers a JSON 404 saying so
            api.add_api_route(path, getattr(self, name), methods=[method], **docs, include_in_schema=not hidden)
        # FastAPI serves the document it cached on this app, which no other Router shares.
        describe_deployment(api.openapi(), sorted(self.cfg.adapters), self.cfg.auth.enabled,
                            self.cfg.request.max_batch_images)
        return api

    # ---- endpoints

    async def detect(self, request: Request, adapter: str = Query(..., description="adapter name, e.g. method1")):
        async def work(body: bytes):
            self._check_adapter(adapter)
            return await self._detect_one((await image_payloads(request, body, 1, self._cpu))[0], adapter)

        return await self._answer(request, "detect", adapter, work)

    async def ensemble(self, request: Request):
        async def work(body: bytes):
            return await self._ensemble_one((await image_payloads(request, body, 1, self._cpu))[0])

        return await self._answer(request, "ensemble", ENSEMBLE, work)

    async def detect_batch(self, request: Request, adapter: str = Query("ensemble")):
        async def one(data: bytes) -> dict:
            """An image's answer or its own error: one bad image never fails the others."""
            try:
                if adapter == ENSEMBLE:
                    return await self._ensemble_one(data)
                return await self._detect_one(data, adapter)
            except Exception as e:
                if not isinstance(e, AigdError):
                    log.exception("detect_batch: one image failed")
                sha = await self._cpu(provenance.sha256, data)
                return {**error_body(e), "status": http_status(e), "image_sha256": sha}

        async def work(body: bytes):
            if adapter != ENSEMBLE:
                self._check_adapter(adapter)
            images = await image_payloads(request, body, self.cfg.request.max_batch_images, self._cpu)
            results = await asyncio.gather(*(one(d) for d in images))
            return {"adapter": adapter, "results": [{"index": i, **r} for i, r in enumerate(results)]}

        return await self._answer(request, "detect_batch", adapter, work)

    async def explain(self, request: Request,
                      adapter: str = Query(ENSEMBLE, description="adapter name, or ensemble (its members' maps, "
                                                                 "weighted by ensemble.weights)"),
                      method: Optional[Literal[C.EXPLAIN_METHODS]] = Query(None, description="default: explain.method")):
        if not self.cfg.explain.enabled:  # before the body is read
            async def off(_: bytes):
                raise NotFound("explanations are turned off in this deployment (explain.enabled: false)")

            return await self._answer(request, "explain", adapter, off, body=False)

        async def work(body: bytes):
            t0 = time.perf_counter()
            if adapter != ENSEMBLE:
                self._check_adapter(adapter)
            data = (await image_payloads(request, body, 1, self._cpu))[0]
            pixels, origin = await self._prepare(data)
            t1 = time.perf_counter()
            deadline = time.time() + self.cfg.explain.timeout_s - (t1 - t0)  # wall-clock: the replica's too
            out = await self._replica("explain", pixels, adapter, method, deadline)
            if "error" in out:
                raise from_body(out)
            self.verdicts.inc(tags={"adapter": adapter, "label": out["answer"]["label"]})
            return {**out["answer"], **origin, "timing": {"decode_ms": round((t1 - t0) * 1000, 2), "model_ms": out["explain_ms"],
                                                "batch_size": 1, "replica": out["replica"]}}

        return await self._answer(request, "explain", adapter, work, timeout_s=self.cfg.explain.timeout_s)

    async def models(self, request: Request):
        async def work(_: bytes):
            info = await self.detector.info.remote()
            return {**info, "ensemble": {**C.to_dict(self.cfg.ensemble), "members": self.ensemble_members}}

        return await self._answer(request, "models", "", work, body=False)

    async def healthz(self):
        return {"status": "ok"}

    async def readyz(self):
        try:
            info = await asyncio.wait_for(self.detector.info.remote(), timeout=5)
        except Exception as e:
            return error_response(AdapterUnavailable(f"model replica not ready: {type(e).__name__}"),
                                  self.cfg.retry_after_s)
        return {"ready": True, "adapters": sorted(info["adapters"]), "unavailable": info["unavailable"],
                "replica": info["replica"]}


# --------------------------------------------------------------------------- app builder


def deployment_options(cfg: C.ServeConfig) -> tuple[dict, dict]:
    d, r = cfg.detector, cfg.router
    detector = dict(
        autoscaling_config=C.to_dict(d.autoscaling), max_ongoing_requests=d.max_ongoing_requests,
        max_queued_requests=d.max_queued_requests,
        ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus})
    router = dict(
        autoscaling_config=C.to_dict(r.autoscaling), max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
        # glibc gives every decode thread its own malloc arena, which kept growing under overload.
        ray_actor_options={"num_cpus": r.num_cpus, "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}}})
    return detector, router


def pinned(cfg: C.ServeConfig) -> C.ServeConfig:
    """Each adapter reference (a registry entry means its newest version) resolved once, here: every
    replica, including those autoscaling adds later, starts from the same versions."""
    out = {}
    for name, ref in cfg.adapters.items():
        try:
            out[name] = registry.resolve(ref).uri
        except registry.VersionError:
            out[name] = ref  # the replica refuses it with this reason (detector.on_adapter_error)
    return C.replace(cfg, adapters=out)


def build_app(args: dict):
    """Serve's application builder: `import_path: serve.app:build_app`, the ServeConfig as `args`."""
    cfg = pinned(C.from_dict(C.ServeConfig, dict(args)))  # ServeConfig.validate: adapters, ensemble members
    raw = C.to_dict(cfg)  # expanded, validated, plain data for the replicas
    det_opts, router_opts = deployment_options(cfg)
    # The deployed versions as the Detector's user_config: a config's `deployments` override (what
    # `aigd promote` writes) replaces it in place, and dropping that override switches back to these.
    det_opts["user_config"] = C.to_dict(C.ServingVersions(versions={
        n: p.rstrip("/").rsplit("/", 1)[-1] for n, p in cfg.adapters.items()
        if registry.VERSION.fullmatch(p.rstrip("/").rsplit("/", 1)[-1])}))
    return Router.options(**router_opts).bind(Detector.options(**det_opts).bind(raw), raw)
