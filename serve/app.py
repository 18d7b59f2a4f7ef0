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
import functools
import hashlib
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from aigd import __version__
from aigd import config as C
from aigd.decision import ENSEMBLE, ensemble_answer
from aigd.errors import (AdapterUnavailable, AigdError, BadRequest, BodyTooLarge, DeadlineExceeded, Forbidden,
                         MemberFailed, MethodNotAllowed, NotFound, Overloaded, ReplicaLost, RequestTimeout,
                         Unauthorized, UnknownAdapter, UnsupportedMediaType, error_body, http_status)
from aigd.manifest import policy_for
from aigd.prompt import prepare
from serve.openapi import BatchAnswer, DetectAnswer, EnsembleAnswer, error_responses, image_body

log = logging.getLogger("ray.serve")

# redirect_slashes off: `/v1/detect/` is a JSON 404 like any unknown path, not a redirect.
# FastAPIOffline: /docs and /redoc with Swagger UI and ReDoc served from the package, not a CDN.
DOCS_PATHS = ("/docs", "/redoc")
api = FastAPIOffline(title="aigd: AI-generated image detection", version=__version__, redirect_slashes=False,
                     docs_url=DOCS_PATHS[0], redoc_url=DOCS_PATHS[1],
                     description="P(fake) for an image from LoRA adapters on Qwen2.5-VL. Send image bytes: "
                                 "multipart (field `image`), JSON `{\"image\": \"<base64>\"}` or a raw image body. "
                                 "Every error is `{\"error\": {\"code\", \"message\"}}`.")
ERRORS = error_responses()

# The docs pages may load only what this server serves: ReDoc's bundle adds a logo from its CDN
# after rendering, which an air-gapped or privacy-minded deployment must not request.
DOCS_CSP = (b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            b"img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")


class DocsContentSecurityPolicy:
    """ASGI middleware: a Content-Security-Policy header on /docs and /redoc, nothing else touched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in DOCS_PATHS:
            return await self.app(scope, receive, send)

        async def with_csp(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"content-security-policy", DOCS_CSP)]
            await send(message)

        await self.app(scope, receive, with_csp)


api.add_middleware(DocsContentSecurityPolicy)

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
UNHEALTHY_AFTER = 3  # consecutive batches where every adapter failed


def error_response(exc: BaseException, retry_after_s: int) -> JSONResponse:
    status = http_status(exc)
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return error_response(BadRequest(where or "invalid request"), 1)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in the same JSON shape as every other error."""
    if exc.status_code == 404:
        return error_response(NotFound(f"no endpoint {request.url.path}; see /docs"), 1)
    if exc.status_code == 405:
        response = error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}"), 1)
        response.headers.update(exc.headers or {})
        return response
    return JSONResponse({"error": {"code": f"http_{exc.status_code}", "message": str(exc.detail)}},
                        status_code=exc.status_code, headers=exc.headers)


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


async def read_body(request: Request, limits: C.RequestLimits) -> bytes:
    """The body, under the size cap (413) and the deadlines (408): total time, the longest gap
    between chunks and, after that first window, a minimum average rate, so a stalled or trickling
    upload is dropped instead of held."""
    max_bytes = int(limits.max_body_mb * 2**20)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes}")
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + limits.body_timeout_s
    chunks, size, stream = [], 0, request.stream()
    while True:
        wait = min(limits.body_idle_timeout_s, deadline - loop.time())
        elapsed = loop.time() - start
        try:
            if wait <= 0 or (elapsed > limits.body_idle_timeout_s and size / elapsed < limits.body_min_kbps * 1000):
                raise TimeoutError
            chunk = await asyncio.wait_for(anext(stream), wait)
        except StopAsyncIteration:
            return b"".join(chunks)
        except TimeoutError:
            raise RequestTimeout(f"request body not received in time ({size} bytes after {loop.time() - start:.1f} s; "
                                 f"limits: {limits.body_timeout_s:g} s in all, {limits.body_idle_timeout_s:g} s "
                                 f"between chunks, {limits.body_min_kbps:g} kB/s on average)") from None
        except ClientDisconnect:
            raise BadRequest("client disconnected before the body was complete") from None
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)


def _b64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a base64 string")
    try:
        return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None


def json_images(body: bytes, max_images: int) -> list[bytes]:
    """Image bytes from a JSON body; runs in a worker thread (parsing and base64 of 20 MB take a
    while). The count is checked before anything is decoded."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's parser goes
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest('JSON body must be an object like {"image": "<base64>"}')
    if "url" in doc or "urls" in doc:
        raise BadRequest("URLs are not fetched; send the image bytes (base64)")
    if "images" in doc:
        if not isinstance(doc["images"], list):
            raise BadRequest("`images` must be a list of base64 strings")
        if len(doc["images"]) > max_images:
            raise BadRequest(f"{len(doc['images'])} images in one request; the limit is {max_images}")
        return [_b64(v, f"images[{i}]") for i, v in enumerate(doc["images"])]
    if "image" in doc:
        return [_b64(doc["image"], "image")]
    raise BadRequest('JSON body needs "image" (base64) or "images" (list of base64)')


async def image_payloads(request: Request, body: bytes, max_images: int, cpu) -> list[bytes]:
    """Image bytes from multipart (`image`/`file` fields), JSON base64 or a raw image body. No URLs.
    `cpu(fn, *args)` runs CPU-heavy parsing off the event loop (the router's bounded pool)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=max_images, max_part_size=len(body) + 1)
        except Exception as e:  # malformed multipart, too many files
            raise BadRequest(f"cannot parse multipart body: {e}") from None
        out = [await v.read() for _, v in form.multi_items() if hasattr(v, "read")]
    elif ctype == "application/json":
        out = await cpu(json_images, body, max_images)
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


def describe_deployment(schema: dict, adapters: list[str], auth: bool) -> None:
    """What only the running config knows, added to the cached OpenAPI document: the adapter names
    (an enum a generated client can offer) and, with API keys on, the security schemes."""
    for path, names in (("/v1/detect", adapters), ("/v1/detect/batch", [*adapters, ENSEMBLE])):
        for param in schema["paths"][path]["post"].get("parameters", []):
            if param["name"] == "adapter":
                param["schema"]["enum"] = names
    if auth:
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        for path, ops in schema["paths"].items():
            if path.startswith("/v1/"):
                for op in ops.values():
                    op["security"] = [{"bearer": []}, {"apiKey": []}]


def api_keys(auth: C.AuthConfig) -> list[bytes]:
    keys = os.environ.get(auth.keys_env, "").split(",")
    if auth.keys_file:
        path = Path(auth.keys_file).expanduser()
        if not path.is_file():
            raise C.ConfigError(f"auth.keys_file {path} does not exist on this node")
        keys += path.read_text().splitlines()
    keys = [hashlib.sha256(k.strip().encode()).digest() for k in keys if k.strip()]
    if auth.enabled and not keys:
        raise C.ConfigError(f"auth.enabled but no API key in ${auth.keys_env}"
                            + (f" or {auth.keys_file}" if auth.keys_file else ""))
    return keys


def check_api_key(request: Request, keys: list[bytes]) -> None:
    """401 without a key, 403 with a wrong one; every configured key is compared (constant time)."""
    given = request.headers.get("x-api-key")
    bearer = request.headers.get("authorization", "")
    if given is None and bearer[:7].lower() == "bearer ":
        given = bearer[7:].strip()
    if not given:
        raise Unauthorized("API key required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    presented = hashlib.sha256(given.encode("utf-8", "replace")).digest()  # equal lengths: no length leak
    accepted = False
    for key in keys:
        accepted |= hmac.compare_digest(presented, key)
    if not accepted:
        raise Forbidden("API key not accepted")


@serve.deployment
@serve.ingress(api)
class Router:
    def __init__(self, detector: DeploymentHandle, cfg: dict):
        from ray.serve.metrics import Counter, Histogram

        self.detector = detector
        self.cfg = C.from_dict(C.ServeConfig, cfg)
        self.policy = policy_for(self.cfg)
        self.keys = api_keys(self.cfg.auth) if self.cfg.auth.enabled else []
        self.ensemble_members = list(self.cfg.ensemble.members or self.cfg.adapters)
        describe_deployment(api.openapi(), sorted(self.cfg.adapters), self.cfg.auth.enabled)
        self.in_flight = 0
        # The replica's CPU budget for request work (JSON/base64 parsing, image decoding): a few
        # threads, so the event loop keeps answering, memory stays bounded, and work a cancelled
        # request (client gone, deadline passed) had queued is dropped before it starts.
        self.cpu_pool = ThreadPoolExecutor(self.cfg.router.decode_concurrency, thread_name_prefix="decode")
        self.requests = Counter("aigd_requests_total", description="HTTP requests",
                                tag_keys=("endpoint", "adapter", "status"))
        self.verdicts = Counter("aigd_verdicts_total", description="answers by label",
                                tag_keys=("adapter", "label"))
        self.latency = Histogram("aigd_request_latency_ms", description="request latency",
                                 boundaries=LATENCY_MS, tag_keys=("endpoint",))

    # ---- plumbing: access, body, admission, errors, metrics

    async def _answer(self, request: Request, endpoint: str, adapter: str, work, body: bool = True) -> JSONResponse:
        """Key check, then the whole body (before admission: a slow upload holds no slot), then
        admission and `work(body)` under the request deadline; every failure a JSON error. A full
        replica refuses before reading the body, which keeps overload cheap."""
        t0 = time.perf_counter()
        try:
            if self.cfg.auth.enabled:
                check_api_key(request, self.keys)
            self._check_capacity()  # full already: refuse before pulling the body through the proxy
            data = await read_body(request, self.cfg.request) if body else b""
            response = JSONResponse(await self._admitted(work, data))
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

    async def _admitted(self, work, data: bytes):
        self._check_capacity()
        self.in_flight += 1
        try:
            async with asyncio.timeout(self.cfg.request.timeout_s):
                return await work(data)
        except TimeoutError:
            raise DeadlineExceeded(f"not answered within {self.cfg.request.timeout_s:g} s; retry later") from None
        finally:
            self.in_flight -= 1

    async def _score(self, data: bytes, adapters: tuple[str, ...]) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        pixels = await self._cpu(prepare, data, self.cfg.limits, self.policy)
        t1 = time.perf_counter()
        out = await self._model(pixels, adapters)
        timing = {"decode_ms": round((t1 - t0) * 1000, 2), "model_ms": round((time.perf_counter() - t1) * 1000, 2),
                  "batch_size": out["batch_size"], "replica": out["replica"]}
        return out["members"], timing

    async def _model(self, pixels: np.ndarray, adapters: tuple[str, ...]) -> dict:
        """The model replica's answer. Scoring has no side effects, so a request whose replica died
        under it (SIGKILL, OOM, node loss) is sent once more; Serve routes it to a live replica."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(2):
            try:
                return await self.detector.score.remote(pixels, adapters)
            except BackPressureError:
                raise Overloaded("model replicas are at capacity; retry later") from None
            except RayActorError:
                log.warning("model replica died under a request (attempt %d of 2)", attempt + 1)
        raise ReplicaLost("the model replica was lost twice; retry later")

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

    @api.post("/v1/detect", summary="P(fake) from one adapter", responses={200: {"model": DetectAnswer}, **ERRORS},
              openapi_extra=image_body(batch=False))
    async def detect(self, request: Request, adapter: str = Query(..., description="adapter name, e.g. method1")):
        async def work(body: bytes):
            self._check_adapter(adapter)
            return await self._detect_one((await image_payloads(request, body, 1, self._cpu))[0], adapter)

        return await self._answer(request, "detect", adapter, work)

    @api.post("/v1/ensemble", summary="P(fake) from every ensemble member, combined",
              responses={200: {"model": EnsembleAnswer}, **ERRORS}, openapi_extra=image_body(batch=False))
    async def ensemble(self, request: Request):
        async def work(body: bytes):
            return await self._ensemble_one((await image_payloads(request, body, 1, self._cpu))[0])

        return await self._answer(request, "ensemble", ENSEMBLE, work)

    @api.post("/v1/detect/batch", summary="several images; adapter=NAME or ensemble; errors per image",
              responses={200: {"model": BatchAnswer}, **ERRORS}, openapi_extra=image_body(batch=True))
    async def detect_batch(self, request: Request, adapter: str = Query("ensemble")):
        async def one(data: bytes) -> dict:
            """An image's answer or its own error: one bad image never fails the others."""
            try:
                if adapter == ENSEMBLE:
                    return await self._ensemble_one(data)
                return await self._detect_one(data, adapter)
            except AigdError as e:
                return {**error_body(e), "status": http_status(e)}
            except Exception as e:
                log.exception("detect_batch: one image failed")
                return {**error_body(e), "status": http_status(e)}

        async def work(body: bytes):
            if adapter != ENSEMBLE:
                self._check_adapter(adapter)
            images = await image_payloads(request, body, self.cfg.request.max_batch_images, self._cpu)
            results = await asyncio.gather(*(one(d) for d in images))
            return {"adapter": adapter, "results": [{"index": i, **r} for i, r in enumerate(results)]}

        return await self._answer(request, "detect_batch", adapter, work)

    @api.get("/v1/models", summary="the base, the loaded adapters (versions, thresholds) and the ensemble",
             responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}},
                        **error_responses(401, 403, 503)})
    async def models(self, request: Request):
        async def work(_: bytes):
            info = await self.detector.info.remote()
            return {**info, "ensemble": {**C.to_dict(self.cfg.ensemble), "members": self.ensemble_members}}

        return await self._answer(request, "models", "", work, body=False)

    @api.get("/healthz", summary="the router is up")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz", summary="a model replica answers and its adapters are loaded",
             responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}},
                        **error_responses(503)})
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
