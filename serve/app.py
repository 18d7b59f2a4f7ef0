"""Ray Serve app: one Detector deployment (an aigd.scorer.Scorer: the base model with every adapter)
behind a FastAPI router.

    serve run configs/serve_demo.yaml        # local; Ctrl-C stops it
    serve deploy configs/serve_7b.yaml       # onto a running cluster

Nothing heavy happens at import: `build_app(args)` validates `args` as an `aigd.config.ServeConfig`
and binds the deployments; the model loads inside the Detector replicas.
"""

import asyncio
import base64
import binascii
import json
import logging
import time

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from aigd import __version__
from aigd import config as C
from aigd.decision import ENSEMBLE, ensemble_answer
from aigd.errors import (AdapterUnavailable, AigdError, BadRequest, BodyTooLarge, MemberFailed, Overloaded,
                         UnknownAdapter, UnsupportedMediaType, error_body, http_status)
from aigd.manifest import policy_for
from aigd.prompt import prepare

log = logging.getLogger("ray.serve")

api = FastAPI(title="aigd: AI-generated image detection", version=__version__,
              description="P(fake) for an image from LoRA adapters on Qwen2.5-VL. Send image bytes: "
                          "multipart (field `image`), JSON `{\"image\": \"<base64>\"}` or a raw image body.")

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
UNHEALTHY_AFTER = 3  # consecutive batches where every adapter failed


def error_response(exc: BaseException, retry_after_s: int) -> JSONResponse:
    status = http_status(exc)
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return error_response(BadRequest(where or "invalid request"), 1)


# --------------------------------------------------------------------------- model replica


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


# --------------------------------------------------------------------------- HTTP router


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it (declared or streamed) passes the cap."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _b64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a base64 string")
    try:
        return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None


async def image_payloads(request: Request, body: bytes, max_images: int) -> list[bytes]:
    """Image bytes from multipart (`image`/`file` fields), JSON base64 or a raw image body. No URLs."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=max_images, max_part_size=len(body) + 1)
        except Exception as e:  # malformed multipart
            raise BadRequest(f"cannot parse multipart body: {e}") from None
        out = [await v.read() for _, v in form.multi_items() if hasattr(v, "read")]
    elif ctype == "application/json":
        try:
            doc = json.loads(body)
        except ValueError:
            raise BadRequest("body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise BadRequest('JSON body must be an object like {"image": "<base64>"}')
        if "url" in doc or "urls" in doc:
            raise BadRequest("URLs are not fetched; send the image bytes (base64)")
        if "images" in doc:
            if not isinstance(doc["images"], list):
                raise BadRequest("`images` must be a list of base64 strings")
            out = [_b64(v, f"images[{i}]") for i, v in enumerate(doc["images"])]
        elif "image" in doc:
            out = [_b64(doc["image"], "image")]
        else:
            raise BadRequest('JSON body needs "image" (base64) or "images" (list of base64)')
    elif ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
        out = [body] if body else []
    else:
        raise UnsupportedMediaType(f"content-type {ctype!r}: send multipart/form-data, application/json or "
                                   "the image bytes")
    if not out:
        raise BadRequest("no image in the request")
    if len(out) > max_images:
        raise BadRequest(f"{len(out)} images in one request; the limit is {max_images}")
    return out


@serve.deployment
@serve.ingress(api)
class Router:
    def __init__(self, detector: DeploymentHandle, cfg: dict):
        from ray.serve.metrics import Counter, Histogram

        self.detector = detector
        self.cfg = C.from_dict(C.ServeConfig, cfg)
        self.policy = policy_for(self.cfg)
        self.ensemble_members = list(self.cfg.ensemble.members or self.cfg.adapters)
        self.in_flight = 0
        self.requests = Counter("aigd_requests_total", description="HTTP requests",
                                tag_keys=("endpoint", "adapter", "status"))
        self.verdicts = Counter("aigd_verdicts_total", description="answers by label",
                                tag_keys=("adapter", "label"))
        self.latency = Histogram("aigd_request_latency_ms", description="request latency",
                                 boundaries=LATENCY_MS, tag_keys=("endpoint",))

    # ---- plumbing: admission, errors, metrics

    async def _answer(self, endpoint: str, adapter: str, work) -> JSONResponse:
        t0 = time.perf_counter()
        if self.in_flight >= self.cfg.router.max_in_flight:
            response = error_response(Overloaded("server busy; retry later"), self.cfg.retry_after_s)
        else:
            self.in_flight += 1
            try:
                response = JSONResponse(await work())
            except AigdError as e:
                response = error_response(e, self.cfg.retry_after_s)
            except Exception as e:  # never a traceback, never a dead replica
                log.exception("%s failed", endpoint)
                response = error_response(e, self.cfg.retry_after_s)
            finally:
                self.in_flight -= 1
        self.requests.inc(tags={"endpoint": endpoint, "adapter": adapter, "status": str(response.status_code)})
        self.latency.observe((time.perf_counter() - t0) * 1000, tags={"endpoint": endpoint})
        return response

    async def _images(self, request: Request, max_images: int = 1) -> list[bytes]:
        body = await read_body(request, int(self.cfg.request.max_body_mb * 2**20))
        return await image_payloads(request, body, max_images)

    async def _score(self, data: bytes, adapters: tuple[str, ...]) -> tuple[dict, dict]:
        from ray.serve.exceptions import BackPressureError

        t0 = time.perf_counter()
        pixels = await asyncio.to_thread(prepare, data, self.cfg.limits, self.policy)
        t1 = time.perf_counter()
        try:
            out = await self.detector.score.remote(pixels, adapters)
        except BackPressureError:
            raise Overloaded("model replicas are at capacity; retry later") from None
        timing = {"decode_ms": round((t1 - t0) * 1000, 2), "model_ms": round((time.perf_counter() - t1) * 1000, 2),
                  "batch_size": out["batch_size"], "replica": out["replica"]}
        return out["members"], timing

    def _check_adapter(self, adapter: str) -> None:
        if adapter not in self.cfg.adapters:
            raise UnknownAdapter(f"unknown adapter {adapter!r}; configured: {sorted(self.cfg.adapters)}")

    async def _detect_one(self, data: bytes, adapter: str) -> dict:
        members, timing = await self._score(data, (adapter,))
        m = members[adapter]
        if "error" in m:
            raise AdapterUnavailable(m["error"]["message"])
        self.verdicts.inc(tags={"adapter": adapter, "label": m["label"]})
        return {**m, "timing": timing}

    async def _ensemble_one(self, data: bytes) -> dict:
        members, timing = await self._score(data, tuple(self.ensemble_members))
        ok = {n: m for n, m in members.items() if "error" not in m}
        failed = {n: m["error"]["message"] for n, m in members.items() if "error" in m}
        if failed and (self.cfg.ensemble.on_member_failure == "fail" or not ok):
            raise MemberFailed("ensemble member(s) failed: " + "; ".join(f"{n}: {r}" for n, r in failed.items()))
        answer = ensemble_answer(ok, failed, self.cfg.ensemble)
        self.verdicts.inc(tags={"adapter": ENSEMBLE, "label": answer["label"]})
        return {**answer, "timing": timing}

    # ---- endpoints

    @api.post("/v1/detect", summary="P(fake) from one adapter")
    async def detect(self, request: Request, adapter: str = Query(..., description="adapter name, e.g. method1")):
        async def work():
            self._check_adapter(adapter)
            return await self._detect_one((await self._images(request))[0], adapter)

        return await self._answer("detect", adapter, work)

    @api.post("/v1/ensemble", summary="P(fake) from every ensemble member, combined")
    async def ensemble(self, request: Request):
        async def work():
            return await self._ensemble_one((await self._images(request))[0])

        return await self._answer("ensemble", "ensemble", work)

    @api.post("/v1/detect/batch", summary="several images; adapter=NAME or ensemble")
    async def detect_batch(self, request: Request, adapter: str = Query("ensemble")):
        async def one(data: bytes) -> dict:
            try:
                if adapter == ENSEMBLE:
                    return await self._ensemble_one(data)
                return await self._detect_one(data, adapter)
            except AigdError as e:
                return {**error_body(e), "status": http_status(e)}

        async def work():
            if adapter != ENSEMBLE:
                self._check_adapter(adapter)
            images = await self._images(request, self.cfg.request.max_batch_images)
            results = await asyncio.gather(*(one(d) for d in images))
            return {"adapter": adapter, "results": [{"index": i, **r} for i, r in enumerate(results)]}

        return await self._answer("detect_batch", adapter, work)

    @api.get("/v1/models", summary="loaded adapters and their manifests")
    async def models(self):
        async def work():
            info = await self.detector.info.remote()
            return {**info, "ensemble": {"members": self.ensemble_members, **C.to_dict(self.cfg.ensemble)}}

        return await self._answer("models", "", work)

    @api.get("/healthz", summary="the router is up")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz", summary="a model replica answers and its adapters are loaded")
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
        max_queued_requests=r.max_queued_requests, ray_actor_options={"num_cpus": r.num_cpus})
    return detector, router


def build_app(args: dict):
    """Serve's application builder: `import_path: serve.app:build_app`, the ServeConfig as `args`."""
    cfg = C.from_dict(C.ServeConfig, dict(args))
    if not cfg.adapters:
        raise C.ConfigError("adapters: name at least one exported adapter folder")
    unknown = set(cfg.ensemble.members) - set(cfg.adapters)
    if unknown:
        raise C.ConfigError(f"ensemble.members {sorted(unknown)} are not in adapters")
    raw = C.to_dict(cfg)  # expanded, validated, plain data for the replicas
    det_opts, router_opts = deployment_options(cfg)
    return Router.options(**router_opts).bind(Detector.options(**det_opts).bind(raw), raw)
