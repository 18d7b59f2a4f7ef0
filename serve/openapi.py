"""The API's contract for generated clients: request bodies (three ways to send an image), the
answers' schemas, every error status with the one error shape, and what a deployment's config
adds (its adapters, its auth). Documentation only: the handlers return JSONResponse themselves
and the tests check the answers against these schemas."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from aigd.config import EXPLAIN_METHODS
from aigd.decision import ENSEMBLE
from aigd.errors import HTTP_STATUS


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable name, e.g. unsupported_media_type")
    message: str = Field(description="for people")


class ErrorBody(BaseModel):
    error: ErrorDetail
    request_id: Optional[str] = Field(None, description="this request's id, also in the X-Request-ID header")


class C2pa(BaseModel):
    present: bool
    validation_state: Optional[str] = Field(None, description="c2pa: Valid (signature and hashes check), "
                                                              "Trusted (and the signer chains to a configured "
                                                              "trust anchor) or Invalid")
    validation_failures: list[str] = Field([], description="C2PA failure codes, e.g. assertion.dataHash.mismatch")
    claim_generator: Optional[str] = None
    signer: Optional[str] = Field(None, description="the signing certificate's common name")
    issuer: Optional[str] = Field(None, description="the signing certificate's organization")
    digital_source_type: Optional[str] = Field(None, description="IPTC term, e.g. trainedAlgorithmicMedia")
    actions: list[str] = []


class GeneratorText(BaseModel):
    tool: str
    keys: list[str] = Field(description="where it was found: PNG text keys, or exif")
    text: Optional[dict[str, str]] = Field(None, description="only with provenance.include_generator_text")


class Provenance(BaseModel):
    """What the file itself declares. Never used in p_fake: metadata can be stripped or forged, and
    its absence means nothing."""

    declared: Literal["ai", "edited", "camera", "none"] = Field(description="the strongest declaration any "
                                                                            "source makes")
    evidence: list[str] = Field(description="one line per source that declared something")
    c2pa: C2pa
    xmp_digital_source_type: Optional[str]
    generator_text: Optional[GeneratorText]
    exif: Optional[dict[str, str]] = Field(description="software, make, model")
    error: Optional[str] = Field(description="what could not be read (over a limit, malformed); the image is "
                                             "scored anyway")


class Traced(BaseModel):
    """What lets a caller match an answer to its request, its logs and a re-submission."""

    request_id: str = Field(description="also in the X-Request-ID header; send X-Request-ID to choose it")
    image_sha256: str = Field(description="SHA-256 of the image bytes received")
    provenance: Optional[Provenance] = Field(None, description="absent when provenance.enabled is false")


class Timing(BaseModel):
    decode_ms: float
    model_ms: float
    batch_size: int = Field(description="images in the model batch this one rode in")
    replica: str


Label = Literal["real", "fake", "uncertain"]


class MemberAnswer(BaseModel):
    adapter: str
    label: Label
    p_fake: float = Field(ge=0, le=1, description="calibrated P(fake)")
    p_real: float = Field(ge=0, le=1)
    threshold: float = Field(description="fake at or above it")
    uncertain_band: Optional[list[float]] = Field(description="[lo, hi): answered uncertain inside it")
    temperature: float
    model: dict[str, str] = Field(description="the adapter's version: method, created_at, code_version")


class DetectAnswer(MemberAnswer, Traced):
    timing: Timing


class EnsembleAnswer(Traced):
    adapter: Literal["ensemble"]
    label: Label
    p_fake: float = Field(ge=0, le=1)
    p_real: float = Field(ge=0, le=1)
    threshold: float
    uncertain_band: Optional[list[float]]
    rule: str
    weights: dict[str, float]
    degraded: bool = Field(description="true when a member failed and ensemble.on_member_failure is degrade")
    members_used: list[str]
    members_failed: dict[str, str]
    members: dict[str, MemberAnswer]
    timing: Timing


class RegionBox(BaseModel):
    x: float = Field(ge=0, le=1, description="left edge, a fraction of the image's width")
    y: float = Field(ge=0, le=1, description="top edge, a fraction of the image's height")
    w: float = Field(ge=0, le=1)
    h: float = Field(ge=0, le=1)
    score: float = Field(ge=0, le=1, description="the map's peak inside the box")
    area: float = Field(ge=0, le=1, description="share of the image's tokens in the region")


class Explanation(BaseModel):
    method: Literal[EXPLAIN_METHODS]
    grid: list[list[float]] = Field(description="[row][column] over the model's 28-px tokens, in [0, 1]: the share "
                                                "of the strongest evidence for fake each region carries")
    grid_shape: list[int] = Field(description="[rows, columns]")
    region_boxes: list[RegionBox] = Field(description="connected areas at or above explain.region_threshold, "
                                                      "strongest first")
    peak_logit: dict[str, float] = Field(description="per adapter: the strongest region's share of the "
                                                     "Fake-minus-Real margin, in logits (its map's 1.0; 0: none)")
    overlay_png_base64: str = Field(description="the model's view of the image with the map over it, PNG")


class ExplainAnswer(Traced):
    """The answer /v1/detect (or /v1/ensemble) gives for the image, plus where its evidence is."""

    model_config = ConfigDict(extra="allow")
    adapter: str
    label: Label
    p_fake: float = Field(ge=0, le=1)
    p_real: float = Field(ge=0, le=1)
    threshold: float
    explanation: Explanation
    timing: Timing


class BatchEntry(BaseModel):
    """One image's answer (the fields of DetectAnswer or EnsembleAnswer) or its own error."""

    model_config = ConfigDict(extra="allow")
    index: int
    image_sha256: str
    provenance: Optional[Provenance] = None
    status: Optional[int] = Field(None, description="only on an error entry: the HTTP status it would get alone")
    error: Optional[ErrorDetail] = None


class BatchAnswer(BaseModel):
    adapter: str
    request_id: str
    results: list[BatchEntry]


class BaseModelInfo(BaseModel):
    checkpoint: str = Field(description="the base's name (a local folder's name only)")
    backend: str
    dtype: str
    quantization: Optional[str]
    fingerprint: str


class AdapterInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    temperature: float
    threshold: float
    uncertain_band: Optional[list[float]]
    name: str
    version: str = Field(description="the registry version serving")
    method: Optional[str]
    created_at: Optional[str]
    code_version: Optional[str]
    warmup_ms: Optional[float] = Field(description="its first forward, run before the replica reported ready")


class ImagePolicyInfo(BaseModel):
    prompt: str
    prompt_version: str
    max_pixels: int
    min_pixels: int


class ModelsAnswer(BaseModel):
    model_config = ConfigDict(extra="allow")
    base: BaseModelInfo
    device: str
    image_policy: ImagePolicyInfo = Field(description="what every image becomes before the model sees it")
    adapters: dict[str, AdapterInfo] = Field(description="the loaded adapters by name")
    shadows: dict[str, str] = Field(description="adapter -> the version scored in shadow")
    unavailable: list[str] = Field(description="configured adapters not loaded right now")
    replica: str
    refused_versions: dict[str, dict] = Field(description="adapter -> the version a reconfigure could not "
                                                          "load, and why")
    explanations_running: int
    ensemble: dict = Field(description="the ensemble's rule, weights and members")


_BINARY = {"type": "string", "format": "binary", "minLength": 1}
# base64 (a data: URL prefix allowed): what the router decodes, so a schema-valid string never gets a 400
_BASE64 = {"type": "string", "format": "byte",
           "pattern": "^(data:[^,]*,)?(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"}
_RAW_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "application/octet-stream")


def image_body(batch: bool) -> dict:
    """openapi_extra for an endpoint that takes images (the handler reads the body itself)."""
    if batch:
        multipart = {"type": "object", "required": ["image"],
                     # items without minLength: an empty file is one entry's error, not the request's
                     "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"},
                                              "minItems": 1,
                                              "description": "repeat the field once per image"}}}
        as_json = {"type": "object", "required": ["images"],
                   "properties": {"images": {"type": "array", "minItems": 1, "items": _BASE64}}}
        content = {"multipart/form-data": {"schema": multipart}, "application/json": {"schema": as_json}}
    else:
        multipart = {"type": "object", "required": ["image"], "properties": {"image": _BINARY}}
        as_json = {"type": "object", "required": ["image"],
                   "properties": {"image": {**_BASE64, "description": "the image file, base64 (a data: URL prefix "
                                                                   "is allowed)"}}}
        content = {"multipart/form-data": {"schema": multipart}, "application/json": {"schema": as_json},
                   **{t: {"schema": _BINARY} for t in _RAW_TYPES}}
    return {"requestBody": {"required": True, "content": content,
                            "description": "JPEG, PNG, WebP, BMP or GIF bytes; URLs are not fetched"}}


def error_responses(*statuses: int) -> dict:
    """The error responses of an endpoint: the named statuses, or every one the error table
    (aigd.errors) maps to."""
    described = {400: "bad request", 401: "API key missing", 403: "API key not accepted", 404: "unknown adapter",
                 405: "method not allowed", 408: "body not received in time", 413: "body too large",
                 415: "not an accepted image format", 422: "image refused (corrupt, too large, odd geometry)",
                 503: "overloaded, deadline passed or model unavailable: retry after Retry-After seconds"}
    every = {s for s in HTTP_STATUS.values() if s < 500 and s != 405} | {503}  # 405: the router's, not a route's
    codes = sorted(statuses or every)
    return {c: {"model": ErrorBody, "description": described.get(c, "error")} for c in codes}


def describe_deployment(schema: dict, adapters: list[str], auth: bool, max_batch_images: int) -> None:
    """What only the running config knows, added to one app's OpenAPI document: the adapter names
    (an enum a generated client can offer), the batch size limit and, with API keys on, the
    security schemes."""
    batch = schema["paths"].get("/v1/detect/batch", {}).get("post", {}).get("requestBody", {}).get("content", {})
    for media, field in (("multipart/form-data", "image"), ("application/json", "images")):
        if media in batch:
            batch[media]["schema"]["properties"][field]["maxItems"] = max_batch_images
    for path, names in (("/v1/detect", adapters), ("/v1/detect/batch", [*adapters, ENSEMBLE]),
                        ("/v1/explain", [*adapters, ENSEMBLE])):
        for param in schema["paths"].get(path, {}).get("post", {}).get("parameters", []):
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


_ERRORS = error_responses()
_ANY_JSON = {"content": {"application/json": {"schema": {"type": "object"}}}}

# The Router's endpoints, by method name: (HTTP method, path, what the docs say about it).
ROUTES = {
    "detect": ("POST", "/v1/detect", dict(
        summary="P(fake) from one adapter", responses={200: {"model": DetectAnswer}, **_ERRORS},
        openapi_extra=image_body(batch=False))),
    "ensemble": ("POST", "/v1/ensemble", dict(
        summary="P(fake) from every ensemble member, combined", responses={200: {"model": EnsembleAnswer}, **_ERRORS},
        openapi_extra=image_body(batch=False))),
    "detect_batch": ("POST", "/v1/detect/batch", dict(
        summary="several images; adapter=NAME or ensemble; errors per image",
        responses={200: {"model": BatchAnswer}, **_ERRORS}, openapi_extra=image_body(batch=True))),
    "explain": ("POST", "/v1/explain", dict(
        summary="the answer plus a map of where its evidence is (several passes: its own limit and deadline)",
        responses={200: {"model": ExplainAnswer}, **_ERRORS}, openapi_extra=image_body(batch=False))),
    "models": ("GET", "/v1/models", dict(
        summary="the base, the loaded adapters (versions, thresholds) and the ensemble",
        responses={200: {"model": ModelsAnswer}, **error_responses(401, 403, 503)})),
    "healthz": ("GET", "/healthz", dict(summary="the router is up")),
    "readyz": ("GET", "/readyz", dict(
        summary="a model replica answers and its adapters are loaded",
        responses={200: _ANY_JSON, **error_responses(503)})),
}
