"""The HTTP side of the router, apart from its endpoints: the FastAPI app every Router replica
builds for itself (offline docs under a Content-Security-Policy, one JSON shape for every error)
and reading a request's body and images under the configured limits.

Named http_api, not http: `python serve/try_samples.py` puts this folder first on sys.path, where
an http.py would hide the standard library's http package from urllib."""

import asyncio
import base64
import binascii
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from aigd import __version__
from aigd import config as C
from aigd.errors import (BadRequest, BodyTooLarge, MethodNotAllowed, NotFound, RequestTimeout, UnsupportedMediaType,
                         error_body, http_status)

DOCS_PATHS = ("/docs", "/redoc")

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


def request_id() -> str:
    """This request's id: the caller's X-Request-ID, or the one Serve made up. The proxy puts it in
    the response's X-Request-ID header; answers and error bodies repeat it."""
    from ray.serve.context import _get_serve_request_context  # the id's only accessor in Ray 2.60

    return _get_serve_request_context().request_id


def error_response(exc: BaseException, retry_after_s: int) -> JSONResponse:
    status = http_status(exc)
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({**error_body(exc), "request_id": request_id()}, status_code=status, headers=headers)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return error_response(BadRequest(where or "invalid request"), 1)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in the same JSON shape as every other error."""
    if exc.status_code == 404:
        return error_response(NotFound(f"no endpoint {request.url.path}; see /docs"), 1)
    if exc.status_code == 405:
        response = error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}"), 1)
        response.headers.update(exc.headers or {})
        return response
    return JSONResponse({"error": {"code": f"http_{exc.status_code}", "message": str(exc.detail)},
                         "request_id": request_id()}, status_code=exc.status_code, headers=exc.headers)


def new_api() -> FastAPI:
    """An app with the docs pages and the JSON error handlers, and no endpoints yet."""
    # redirect_slashes off: `/v1/detect/` is a JSON 404 like any unknown path, not a redirect.
    # FastAPIOffline: /docs and /redoc with Swagger UI and ReDoc served from the package, not a CDN.
    api = FastAPIOffline(title="aigd: AI-generated image detection", version=__version__, redirect_slashes=False,
                         docs_url=DOCS_PATHS[0], redoc_url=DOCS_PATHS[1],
                         description="P(fake) for an image from LoRA adapters on Qwen2.5-VL. Send image bytes: "
                                     "multipart (field `image`), JSON `{\"image\": \"<base64>\"}` or a raw image "
                                     "body. Every error is `{\"error\": {\"code\", \"message\"}}`.")
    api.add_middleware(DocsContentSecurityPolicy)
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    return api


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
