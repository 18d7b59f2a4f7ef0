"""Error types of the platform, and the one table that maps them to HTTP status codes."""

from __future__ import annotations


class AigdError(Exception):
    """Base class: `code` is a stable machine-readable name, the message is for people."""

    code = "error"


class BadRequest(AigdError):
    code = "bad_request"


class BodyTooLarge(AigdError):
    code = "body_too_large"


class UnsupportedMediaType(AigdError):
    code = "unsupported_media_type"


class CorruptImage(AigdError):
    code = "corrupt_image"


class ImageTooLarge(AigdError):
    code = "image_too_large"


class ImageRejected(AigdError):
    """Decodable, but outside the accepted geometry (too small, extreme aspect ratio)."""

    code = "image_rejected"


class RequestTimeout(AigdError):
    """The body did not arrive in time (a slow or stalled upload)."""

    code = "request_timeout"


class Unauthorized(AigdError):
    code = "unauthorized"


class Forbidden(AigdError):
    code = "forbidden"


class NotFound(AigdError):
    code = "not_found"


class MethodNotAllowed(AigdError):
    code = "method_not_allowed"


class UnknownAdapter(AigdError):
    code = "unknown_adapter"


class AdapterUnavailable(AigdError):
    """Configured, but not loaded or failing right now."""

    code = "adapter_unavailable"


class ReplicaLost(AdapterUnavailable):
    """The model replica died under the request (and again on the one retry)."""

    code = "replica_lost"


class ManifestMismatch(AigdError):
    code = "manifest_mismatch"


class Overloaded(AigdError):
    code = "overloaded"


class DeadlineExceeded(Overloaded):
    """Admitted, but decode + model did not finish within request.timeout_s."""

    code = "deadline_exceeded"


class MemberFailed(AigdError):
    code = "ensemble_member_failed"


class BackendUnavailable(AigdError):
    code = "backend_unavailable"


HTTP_STATUS: dict[type, int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    UnknownAdapter: 404,
    MethodNotAllowed: 405,
    RequestTimeout: 408,
    BodyTooLarge: 413,
    UnsupportedMediaType: 415,
    CorruptImage: 422,
    ImageTooLarge: 422,
    ImageRejected: 422,
    Overloaded: 503,
    AdapterUnavailable: 503,
    MemberFailed: 503,
    ManifestMismatch: 500,
    BackendUnavailable: 500,
}


def http_status(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_body(exc: BaseException) -> dict:
    if isinstance(exc, AigdError):
        return {"error": {"code": exc.code, "message": str(exc)}}
    return {"error": {"code": "internal", "message": "internal error"}}


def from_body(body: dict) -> AigdError:
    """The error an error body names, to raise again where it was carried (a model replica's
    answer read by the router): same code, same message, so the same status."""
    err = body["error"]
    known = [AigdError]
    for cls in known:
        known += [c for c in cls.__subclasses__() if c not in known]
    cls = next((c for c in known if c.code == err["code"]), AigdError)
    return cls(err["message"])
