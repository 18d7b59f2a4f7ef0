"""API keys: read once per router replica (from an environment variable and/or a file), kept only
as SHA-256 digests, checked on every /v1/ request."""

import hashlib
import hmac
import os
import re
from pathlib import Path

from starlette.requests import Request

from aigd import config as C
from aigd.errors import Forbidden, Unauthorized


MIN_KEY_LENGTH = 20  # e.g. `openssl rand -hex 16` gives 32
# Words of keys copied from examples and templates, not generated: an app that accepts one is open.
PLACEHOLDER = re.compile(r"replace|change-?me|example|placeholder|your[-_ ]?(api[-_ ]?)?key|secret|password",
                         re.IGNORECASE)


def api_keys(auth: C.AuthConfig) -> list[bytes]:
    """SHA-256 digests of the configured keys. A replica refuses to start with a key that is short or
    reads like a template's placeholder (naming where it is, never the key)."""
    given = [(f"${auth.keys_env} entry {i + 1}", k.strip())
             for i, k in enumerate(os.environ.get(auth.keys_env, "").split(","))]
    if auth.keys_file:
        path = Path(auth.keys_file).expanduser()
        if not path.is_file():
            raise C.ConfigError(f"auth.keys_file {path} does not exist on this node")
        given += [(f"{path} line {i + 1}", k.strip()) for i, k in enumerate(path.read_text().splitlines())
                  if not k.lstrip().startswith("#")]  # comments: who holds which key
    given = [(where, k) for where, k in given if k]
    for where, key in given:
        if len(key) < MIN_KEY_LENGTH or PLACEHOLDER.search(key) or len(set(key)) < 8:
            kind = "too short" if len(key) < MIN_KEY_LENGTH else "a placeholder"
            raise C.ConfigError(f"the API key at {where} is {kind}: use a random key of at least {MIN_KEY_LENGTH} "
                                "characters (openssl rand -hex 32)")
    if auth.enabled and not given:
        raise C.ConfigError(f"auth.enabled but no API key in ${auth.keys_env}"
                            + (f" or {auth.keys_file}" if auth.keys_file else ""))
    return [hashlib.sha256(k.encode()).digest() for _, k in given]


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
