"""The Serve app on a real local Ray, called over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image, ImageOps

from conftest import SERVE_POLICY

pytestmark = pytest.mark.timeout(900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tiny_model, adapters: dict, **changes) -> dict:
    cfg = {
        "model": {"name_or_path": str(tiny_model), "load_in_4bit": False, "gradient_checkpointing": False},
        "image": dict(SERVE_POLICY),
        "adapters": {k: str(v) for k, v in adapters.items()},
        "limits": {"min_side": 28, "max_aspect": 50.0},
        "request": {"max_body_mb": 1.0},
        "detector": {"num_cpus": 0.25, "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "router": {"num_cpus": 0.05},
    }
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, adapters):
    """Four apps on one Serve instance: the main one, two with an unloadable member, one tiny-capacity."""
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    good = {k: adapters[k] for k in ("method1", "method2")}
    with_bad = {"method1": adapters["method1"], "mismatched": adapters["mismatched"]}
    apps = {
        "main": _config(tiny_model, good, ensemble={"weights": {"method1": 3.0, "method2": 1.0}}),
        "degrade": _config(tiny_model, with_bad, detector={"on_adapter_error": "skip"},
                           ensemble={"on_member_failure": "degrade"}),
        "strict": _config(tiny_model, with_bad, detector={"on_adapter_error": "skip"},
                          ensemble={"on_member_failure": "fail"}),
        "busy": _config(tiny_model, good, detector={"max_batch_size": 1, "max_ongoing_requests": 1,
                                                   "max_queued_requests": 1},
                        router={"max_in_flight": 4}),
    }
    for name, cfg in apps.items():
        serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def library(tiny_model, adapters):
    """The same detector in this process: what the HTTP answers must equal."""
    from aigd.config import ImagePolicy, ModelConfig, ScoringConfig
    from aigd.scorer import Scorer

    return Scorer(ScoringConfig(model=ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False),
                                image=ImagePolicy(**SERVE_POLICY),
                                adapters={k: str(adapters[k]) for k in ("method1", "method2")}))


def _photo(seed: int, size=(150, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 10 + 1, size[0] // 10 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _library_p(library, data: bytes, adapter: str) -> float:
    from aigd.config import DecodeLimits

    return float(library.p_fake([library.prepare(data, DecodeLimits())], adapter)[0])


def _post(url: str, data: bytes, **kw) -> requests.Response:
    return requests.post(url, files={"image": ("x.bin", data)}, timeout=60, **kw)


def test_detect_equals_library_scoring_per_adapter(server, library):
    data = _bytes(_photo(0))
    for adapter in ("method1", "method2"):
        r = _post(f"{server}/main/v1/detect?adapter={adapter}", data)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == adapter
        assert body["p_fake"] == pytest.approx(_library_p(library, data, adapter), abs=1e-4)
        assert body["p_real"] == pytest.approx(1 - body["p_fake"], abs=1e-6)
        assert body["label"] == ("fake" if body["p_fake"] >= body["threshold"] else "real")
        assert body["temperature"] == library.members[adapter].temperature
    # JSON base64 and a raw body give the same answer as multipart
    j = requests.post(f"{server}/main/v1/detect?adapter=method1", json={"image": base64.b64encode(data).decode()},
                      timeout=60).json()
    raw = requests.post(f"{server}/main/v1/detect?adapter=method1", data=data,
                        headers={"content-type": "image/png"}, timeout=60).json()
    assert j["p_fake"] == raw["p_fake"] == _post(f"{server}/main/v1/detect?adapter=method1", data).json()["p_fake"]


def test_ensemble_is_the_configured_weighted_mean(server, library):
    data = _bytes(_photo(1), "JPEG", quality=90)
    body = _post(f"{server}/main/v1/ensemble", data).json()
    p1, p2 = (body["members"][k]["p_fake"] for k in ("method1", "method2"))
    assert p1 == pytest.approx(_library_p(library, data, "method1"), abs=1e-4)
    assert p2 == pytest.approx(_library_p(library, data, "method2"), abs=1e-4)
    assert body["p_fake"] == pytest.approx((3 * p1 + 1 * p2) / 4, abs=1e-5)
    assert body["threshold"] == pytest.approx((3 * 0.4 + 1 * 0.6) / 4)  # members' thresholds, same weights
    assert body["label"] == ("fake" if body["p_fake"] >= body["threshold"] else "real")
    assert [body["members"][k]["threshold"] for k in ("method1", "method2")] == [0.4, 0.6]
    assert body["weights"] == {"method1": 3.0, "method2": 1.0}
    assert body["degraded"] is False and body["members_used"] == ["method1", "method2"]


def test_batched_and_unbatched_answers_agree(server):
    images = [_bytes(_photo(10 + i, size=(120 + 28 * (i % 3), 120))) for i in range(6)]
    single = [_post(f"{server}/main/v1/detect?adapter=method2", d).json()["p_fake"] for d in images]
    with ThreadPoolExecutor(6) as pool:
        concurrent = list(pool.map(lambda d: _post(f"{server}/main/v1/detect?adapter=method2", d).json(), images))
    assert max(c["timing"]["batch_size"] for c in concurrent) > 1, "concurrent requests were never batched"
    assert [c["p_fake"] for c in concurrent] == pytest.approx(single, abs=1e-5)
    files = [("image", (f"{i}.png", d)) for i, d in enumerate(images)]
    batch = requests.post(f"{server}/main/v1/detect/batch?adapter=method2", files=files, timeout=60).json()
    assert [x["p_fake"] for x in batch["results"]] == pytest.approx(single, abs=1e-5)


def _png_bomb(width=30000, height=30000) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096, 9))
            + chunk(b"IEND", b""))


def _exif_rotated() -> tuple[bytes, bytes]:
    img = _photo(5, size=(160, 112))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    data = _bytes(img, "JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return data, _bytes(upright, "PNG")


def _sixteen_bit() -> Image.Image:
    img = Image.fromarray((np.arange(120 * 150, dtype=np.uint16).reshape(120, 150) * 3))
    assert img.mode == "I;16"
    return img


def _gif_two_frames() -> bytes:
    frames = [_photo(6).convert("P"), _photo(7).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def test_input_rules_answer_documented_statuses_with_json_and_keep_the_replica(server, library):
    ready = requests.get(f"{server}/main/readyz", timeout=30).json()
    jpeg = _bytes(_photo(2), "JPEG", quality=90)
    rgba = _photo(3).convert("RGBA")
    rgba.putalpha(128)
    cases = [
        ("png bomb 30000x30000", _png_bomb(), 422, "image_too_large"),
        ("truncated jpeg", jpeg[: len(jpeg) // 2], 422, "corrupt_image"),
        ("random bytes", np.random.default_rng(0).bytes(2000), 415, "unsupported_media_type"),
        ("too small", _bytes(_photo(4, size=(12, 12))), 422, "image_rejected"),
        ("aspect 300:1", _bytes(Image.new("RGB", (3000, 10))), 422, "image_rejected"),
        ("over the body cap", b"\xff\xd8\xff" + bytes(2 * 2**20), 413, "body_too_large"),
        ("cmyk jpeg", _bytes(_photo(8).convert("CMYK"), "JPEG"), 200, None),
        ("16-bit png", _bytes(_sixteen_bit()), 200, None),
        ("rgba png", _bytes(rgba), 200, None),
        ("animated gif", _gif_two_frames(), 200, None),
        ("webp", _bytes(_photo(9), "WEBP"), 200, None),
    ]
    for name, data, status, code in cases:
        r = _post(f"{server}/main/v1/detect?adapter=method1", data)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json"), name
        if code:
            assert r.json()["error"]["code"] == code, (name, r.json())
            assert r.json()["error"]["message"], name
    rotated, upright = _exif_rotated()
    got = _post(f"{server}/main/v1/detect?adapter=method1", rotated).json()["p_fake"]
    assert got == pytest.approx(_library_p(library, upright, "method1"), abs=1e-4)
    # 16-bit values are scaled to 8 bits, not clamped: a 0..54k ramp must not come out all white
    from aigd.images import decode

    sixteen = decode(cases[7][1])
    assert 0 < np.asarray(sixteen).mean() < 250
    requests_cases = [
        (requests.post(f"{server}/main/v1/detect?adapter=nope", files={"image": ("a", jpeg)}, timeout=30),
         404, "unknown_adapter"),
        (requests.post(f"{server}/main/v1/detect?adapter=method1", json={"image": "***"}, timeout=30),
         400, "bad_request"),
        (requests.post(f"{server}/main/v1/detect?adapter=method1", json={"url": "http://x/y.jpg"}, timeout=30),
         400, "bad_request"),
        (requests.post(f"{server}/main/v1/detect?adapter=method1", data=b"hello",
                       headers={"content-type": "text/plain"}, timeout=30), 415, "unsupported_media_type"),
        (requests.post(f"{server}/main/v1/detect", files={"image": ("a", jpeg)}, timeout=30), 400, "bad_request"),
        (requests.post(f"{server}/main/v1/ensemble", data=b"", timeout=30), 400, "bad_request"),
    ]
    for r, status, code in requests_cases:
        assert r.status_code == status and r.json()["error"]["code"] == code, (r.status_code, r.text)
    after = requests.get(f"{server}/main/readyz", timeout=30).json()
    assert after["replica"] == ready["replica"], "the model replica was replaced"


def test_batch_reports_errors_per_image(server):
    files = [("image", ("ok.png", _bytes(_photo(1)))), ("image", ("bad.bin", b"not an image at all"))]
    r = requests.post(f"{server}/main/v1/detect/batch?adapter=ensemble", files=files, timeout=60)
    assert r.status_code == 200
    ok, bad = r.json()["results"]
    assert ok["index"] == 0 and 0 <= ok["p_fake"] <= 1
    assert bad["index"] == 1 and bad["status"] == 415 and bad["error"]["code"] == "unsupported_media_type"


def test_degraded_member_policy(server, library):
    data = _bytes(_photo(3))
    ready = requests.get(f"{server}/degrade/readyz", timeout=30).json()
    assert ready["adapters"] == ["method1"] and ready["unavailable"] == ["mismatched"]
    body = _post(f"{server}/degrade/v1/ensemble", data).json()
    assert body["degraded"] is True and body["members_used"] == ["method1"]
    assert "mismatched" in body["members_failed"]
    assert body["p_fake"] == pytest.approx(_library_p(library, data, "method1"), abs=1e-4)
    strict = _post(f"{server}/strict/v1/ensemble", data)
    assert strict.status_code == 503 and strict.json()["error"]["code"] == "ensemble_member_failed"
    assert strict.headers["retry-after"] == "1"
    one = _post(f"{server}/degrade/v1/detect?adapter=mismatched", data)
    assert one.status_code == 503 and one.json()["error"]["code"] == "adapter_unavailable"


def test_overload_is_answered_503_with_retry_after_not_a_timeout(server):
    data = _bytes(_photo(4))
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: _post(f"{server}/busy/v1/detect?adapter=method1", data), range(48)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes, codes
    for a in answers:
        if a.status_code == 503:
            assert a.json()["error"]["code"] == "overloaded" and a.headers["retry-after"] == "1"


def test_models_docs_and_health(server, adapters):
    models = requests.get(f"{server}/main/v1/models", timeout=30).json()
    assert sorted(models["adapters"]) == ["method1", "method2"]
    assert models["adapters"]["method2"]["method"] == "method2"
    assert str(adapters["method2"]) not in json.dumps(models)  # no server paths in answers
    assert models["ensemble"]["weights"] == {"method1": 3.0, "method2": 1.0}
    assert requests.get(f"{server}/main/healthz", timeout=30).json() == {"status": "ok"}
    assert "/v1/detect" in requests.get(f"{server}/main/openapi.json", timeout=30).json()["paths"]
    assert requests.get(f"{server}/main/docs", timeout=30).status_code == 200


def test_adapter_with_a_mismatching_manifest_is_refused(tiny_model, adapters):
    from aigd.config import ImagePolicy, ModelConfig, ScoringConfig
    from aigd.errors import ManifestMismatch
    from aigd.scorer import Scorer

    with pytest.raises(ManifestMismatch, match="image_policy.max_pixels"):
        Scorer(ScoringConfig(model=ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False),
                             image=ImagePolicy(**SERVE_POLICY), adapters={"mismatched": str(adapters["mismatched"])}))
