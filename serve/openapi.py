"""The API's contract for generated clients: request bodies (three ways to send an image), the
answers' schemas and every error status with the one error shape. Documentation only: the
handlers return JSONResponse themselves and the tests check the answers against these schemas."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from aigd.errors import HTTP_STATUS


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable name, e.g. unsupported_media_type")
    message: str = Field(description="for people")


class ErrorBody(BaseModel):
    error: ErrorDetail


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


class DetectAnswer(MemberAnswer):
    timing: Timing


class EnsembleAnswer(BaseModel):
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


class BatchEntry(BaseModel):
    """One image's answer (the fields of DetectAnswer or EnsembleAnswer) or its own error."""

    model_config = ConfigDict(extra="allow")
    index: int
    status: Optional[int] = Field(None, description="only on an error entry: the HTTP status it would get alone")
    error: Optional[ErrorDetail] = None


class BatchAnswer(BaseModel):
    adapter: str
    results: list[BatchEntry]


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
                                              "minItems": 1, "maxItems": 16,
                                              "description": "repeat the field once per image"}}}
        as_json = {"type": "object", "required": ["images"],
                   "properties": {"images": {"type": "array", "minItems": 1, "maxItems": 16,
                                             "items": _BASE64}}}
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
