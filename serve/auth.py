"""API keys: read once per router replica (from an environment variable and/or a file), kept only
as SHA-256 digests, checked on every /v1/ request."""

import hashlib
import hmac
import os
from pathlib import Path

from starlette.requests import Request

from aigd import config as C
from aigd.errors import Forbidden, Unauthorized


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
