"""A client of the detector's HTTP API, shared by the web page (aigd.ui) and `aigd score --api`.

It imports only `requests`: the web page's environment has neither torch nor Ray.
"""

from __future__ import annotations

import requests

# The client's key; the server reads its accepted keys from AIGD_API_KEYS (auth.keys_env).
API_KEY_ENV = "AIGD_API_KEY"


class ApiError(Exception):
    """The API's own error (status, code, message), or why it could not be reached (status None)."""

    def __init__(self, message: str, status: int | None = None, code: str = "unreachable"):
        super().__init__(f"API error {status} {code}: {message}" if status else message)
        self.status, self.code, self.message = status, code, message


class Client:
    def __init__(self, api: str, api_key: str | None = None, timeout_s: float = 60.0):
        self.api, self.timeout_s = api.rstrip("/"), timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = requests.request(method, f"{self.api}{path}", headers=self.headers, timeout=self.timeout_s, **kw)
        except requests.RequestException as e:
            raise ApiError(f"cannot reach the API at {self.api}: {type(e).__name__}") from None
        try:
            body = r.json()
        except ValueError:
            raise ApiError(f"not JSON; is {self.api} the detector API?", r.status_code,
                           f"http_{r.status_code}") from None
        if r.status_code != 200:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise ApiError(err.get("message", ""), r.status_code, err.get("code", f"http_{r.status_code}"))
        return body

    def _post(self, path: str, files: list[tuple[str, bytes]], params: dict | None = None) -> dict:
        return self._call("POST", path, files=[("image", f) for f in files], params=params)

    def score(self, name: str, data: bytes, adapter: str | None = None) -> dict:
        """One image's answer from one adapter, or from the API's ensemble when adapter is None."""
        if adapter is None:
            return self._post("/v1/ensemble", [(name, data)])
        return self._post("/v1/detect", [(name, data)], {"adapter": adapter})

    def explain(self, name: str, data: bytes, adapter: str | None = None, method: str | None = None) -> dict:
        """The answer plus its map (`explanation`), from one adapter or the ensemble (None)."""
        params = {"adapter": adapter or "ensemble", **({"method": method} if method else {})}
        return self._post("/v1/explain", [(name, data)], params)

    def batch(self, items: list[tuple[str, bytes]]) -> dict:
        """The ensemble's answer per image, each image its own answer or error."""
        return self._post("/v1/detect/batch", items, {"adapter": "ensemble"})

    def models(self) -> dict:
        return self._call("GET", "/v1/models")

    def max_batch_images(self) -> int:
        """Images one batch request may carry: the deployment's limit, from its OpenAPI document."""
        doc = self._call("GET", "/openapi.json")
        body = doc["paths"]["/v1/detect/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
        return int(body["schema"]["properties"]["image"]["maxItems"])
