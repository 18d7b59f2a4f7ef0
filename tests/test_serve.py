"""The Serve app on a real local Ray, called over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image, ImageOps

from aigd.dev.demo_data import png_header_bomb
from conftest import SERVE_POLICY
from helpers import free_port as _free_port
from helpers import image_bytes as _bytes
from helpers import photo as _photo
from helpers import pids_by_cmdline
from helpers import post_image as _post
from helpers import serve_config as _config

pytestmark = pytest.mark.timeout(900)


API_KEY = "k3y-0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, adapters, tmp_path_factory):
    """Six apps on one Serve instance: the main one, two with an unloadable member, one tiny-capacity,
    one behind API keys, one with two model replicas (for the replica-loss test)."""
    from ray import serve

    from serve.app import build_app

    keys = tmp_path_factory.mktemp("secrets") / "api-keys"
    keys.write_text(f"another-k3y-9876543210fedcba\n{API_KEY}\n")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    good = {k: adapters[k] for k in ("method1", "method2")}
    with_bad = {"method1": adapters["method1"], "mismatched": adapters["mismatched"]}
    apps = {
        "main": _config(tiny_model, good, ensemble={"weights": {"method1": 3.0, "method2": 1.0}}),
        # explanations here: a 3 s deadline and integrated gradients of 400 single passes, far longer
        "degrade": _config(tiny_model, with_bad, detector={"on_adapter_error": "skip"},
                           ensemble={"on_member_failure": "degrade"},
                           explain={"timeout_s": 3.0, "chunk": 1, "ig_steps": 400, "max_concurrent": 1}),
        "strict": _config(tiny_model, with_bad, detector={"on_adapter_error": "skip"},
                          ensemble={"on_member_failure": "fail"}, explain={"enabled": False},
                          provenance={"enabled": False}),
        "busy": _config(tiny_model, good, detector={"max_batch_size": 1, "max_ongoing_requests": 1,
                                                   "max_queued_requests": 1},
                        router={"max_in_flight": 4}),
        "locked": _config(tiny_model, good, auth={"enabled": True, "keys_file": str(keys)}),
        # provenance: 1 ms once the image is decoded, less than a long metadata block takes to read
        "twin": _config(tiny_model, good, detector={"autoscaling": {"min_replicas": 2, "max_replicas": 2}},
                        request={"timeout_s": 30.0}, provenance={"timeout_s": 0.001}),
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


def _library_p(library, data: bytes, adapter: str) -> float:
    from aigd.config import DecodeLimits

    return float(library.p_fake([library.prepare(data, DecodeLimits())], adapter)[0])


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
        ("png bomb 30000x30000", png_header_bomb(), 422, "image_too_large"),
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
    assert str(adapters["method2"].parent.parent) not in json.dumps(models)  # nor the base's folder
    assert models["ensemble"]["members"] == ["method1", "method2"]
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


# --------------------------------------------------------------------------- hostile input


def _stalled_upload(port: int, path: str) -> socket.socket:
    """Headers and 8 bytes of a 100 kB body, then nothing; asks the proxy to disable its timeout and
    its cancel-on-disconnect (the router must not rely on either)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n"
              "x-request-timeout-seconds: 0\r\nx-request-disconnect-disabled: ?1\r\n\r\n".encode() + b"\x89PNG\r\n\x1a\n")
    return s


def test_stalled_uploads_hold_no_slot_and_are_dropped_with_408(server):
    """40 stalled uploads against an app that scores 4 requests at a time: others are still answered,
    and each stalled one gets a JSON 408 once the body deadline passes."""
    port = int(server.rsplit(":", 1)[1])
    stalled = [_stalled_upload(port, "/busy/v1/detect?adapter=method1") for _ in range(40)]
    try:
        data = _bytes(_photo(11))
        answers = [_post(f"{server}/busy/v1/detect?adapter=method1", data) for _ in range(5)]
        assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
        stalled[0].settimeout(30)
        answer = b""
        while b'"request_id"' not in answer and (chunk := stalled[0].recv(4096)):
            answer += chunk
        text = answer.decode(errors="replace")
        assert text.startswith("HTTP/1.1 408") and '"code":"request_timeout"' in text, text
    finally:
        for s in stalled:
            s.close()


def test_a_trickling_upload_is_dropped_once_below_the_minimum_rate(server):
    """One byte a second never stalls long enough for the idle deadline; the rate rule drops it."""
    import time

    port = int(server.rsplit(":", 1)[1])
    with _stalled_upload(port, "/main/v1/ensemble") as s:
        s.settimeout(0.5)
        answer, t0 = b"", time.monotonic()
        while b'"request_id"' not in answer and time.monotonic() - t0 < 20:
            try:
                s.sendall(b"\x00")
                answer += s.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
    text = answer.decode(errors="replace")
    assert text.startswith("HTTP/1.1 408") and "kB/s on average" in text, text
    assert time.monotonic() - t0 < 10  # the app's idle window is 2 s, its total deadline 30 s


def test_routing_errors_and_odd_queries_answer_json(server):
    data = _bytes(_photo(12))
    for r, status, code in [
        (requests.get(f"{server}/main/v1/nope", timeout=30), 404, "not_found"),
        (requests.get(f"{server}/main/v1/detect?adapter=method1", timeout=30), 405, "method_not_allowed"),
        (_post(f"{server}/main/v1/ensemble/", data, allow_redirects=False), 404, "not_found"),  # no redirect
        (_post(f"{server}/main/v1/detect?adapter=%C3%A9t%C3%A9%FF", data), 404, "unknown_adapter"),
    ]:
        assert r.status_code == status and r.json()["error"]["code"] == code, (r.status_code, r.text)
    # Raw non-ASCII bytes in the request line never reach the app: the HTTP server refuses them (4xx).
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /main/v1/detect?adapter=\xc3\xa9 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert s.recv(200).startswith(b"HTTP/1.1 400")


def test_json_that_breaks_parsers_is_a_400_and_the_loop_stays_responsive(server):
    deep = requests.post(f"{server}/main/v1/ensemble", data=b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                         headers={"content-type": "application/json"}, timeout=60)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "bad_request"
    many = json.dumps({"images": [""] * 100_000}).encode()  # ~400 kB: the count is refused first
    r = requests.post(f"{server}/main/v1/detect/batch", data=many, headers={"content-type": "application/json"},
                      timeout=60)
    assert r.status_code == 400 and "limit is 16" in r.json()["error"]["message"]
    big = json.dumps({"images": ["A" * 4096] * 200}).encode()  # 0.8 MB of base64: parsed off the loop
    with ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(requests.post, f"{server}/main/v1/detect/batch", data=big,
                              headers={"content-type": "application/json"}, timeout=60) for _ in range(4)]
        health = requests.get(f"{server}/main/healthz", timeout=5)  # answered while the floods parse
        assert health.status_code == 200
        assert all(f.result().status_code == 400 for f in floods)


@pytest.mark.parametrize("name", sorted(__import__("bench.hostile_inputs", fromlist=["CASES"]).CASES))
def test_hostile_images_get_their_documented_status_over_http(server, name):
    from bench.hostile_inputs import CASES

    make, expected = CASES[name]
    data = make()
    # /v1/explain refuses the same way (the accepted cases' explanations are covered elsewhere)
    for endpoint in ("detect?adapter=method1",) + (() if expected == "ok" else ("explain?adapter=method1",)):
        r = requests.post(f"{server}/main/v1/{endpoint}", data=data,
                          headers={"content-type": "application/octet-stream"}, timeout=60)
        if len(data) > 2**20:  # this app's 1 MB body cap comes first
            assert r.status_code == 413, (endpoint, r.text)
        elif expected == "ok":
            assert r.status_code == 200, (endpoint, r.text)
        else:
            assert r.status_code in (415, 422) and r.json()["error"]["code"] == expected, (endpoint, r.text)


def test_one_bad_image_in_a_batch_fails_only_its_own_entry(server):
    from bench.hostile_inputs import jpeg_bad_exif, progressive_jpeg_scans

    files = [("image", ("ok.png", _bytes(_photo(13)))), ("image", ("exif.jpg", jpeg_bad_exif())),
             ("image", ("scans.jpg", progressive_jpeg_scans())), ("image", ("junk.bin", b"junk" * 100))]
    r = requests.post(f"{server}/main/v1/detect/batch?adapter=ensemble", files=files, timeout=60)
    assert r.status_code == 200, r.text
    ok, exif, scans, junk = r.json()["results"]
    assert 0 <= ok["p_fake"] <= 1 and 0 <= exif["p_fake"] <= 1  # a broken EXIF block: scored as stored
    assert (scans["status"], scans["error"]["code"]) == (422, "image_rejected")
    assert (junk["status"], junk["error"]["code"]) == (415, "unsupported_media_type")


def test_api_keys(server):
    data = _bytes(_photo(14))
    url = f"{server}/locked/v1/detect?adapter=method1"
    none = _post(url, data)
    assert none.status_code == 401 and none.json()["error"]["code"] == "unauthorized"
    assert none.headers["www-authenticate"] == "Bearer"
    wrong = _post(url, data, headers={"Authorization": "Bearer not-a-key"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    assert _post(url, data, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert _post(url, data, headers={"X-API-Key": "another-k3y-9876543210fedcba"}).status_code == 200
    assert requests.get(f"{server}/locked/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{server}/locked/healthz", timeout=30).status_code == 200  # probes stay open
    assert requests.get(f"{server}/locked/readyz", timeout=30).status_code == 200


def test_a_router_refuses_to_start_with_a_short_or_placeholder_key(tmp_path, monkeypatch):
    from aigd import config as C
    from serve.auth import api_keys

    keys = tmp_path / "api-keys"
    auth = C.AuthConfig(enabled=True, keys_file=str(keys))
    for bad in ("replace-me-with-a-long-random-key", "short-9f2c", "aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "Your-API-Key-goes-here-0123"):
        keys.write_text(f"{API_KEY}\n\n{bad}\n")
        with pytest.raises(C.ConfigError, match=f"{keys} line 3") as e:
            api_keys(auth)
        assert bad not in str(e.value)  # the message names where the key is, never the key
    monkeypatch.setenv("AIGD_API_KEYS", f"{API_KEY},changeme-changeme-changeme")
    with pytest.raises(C.ConfigError, match="AIGD_API_KEYS entry 2"):
        api_keys(C.AuthConfig(enabled=True))
    keys.write_text(f"{API_KEY}\n")
    monkeypatch.setenv("AIGD_API_KEYS", "9c1d0e6f3b2a4857a6e1f0c9d8b7a6e5")
    assert len(api_keys(auth)) == 2


# --------------------------------------------------------------------------- faults (keep last: kills a replica)


def _replica_pids(app: str) -> list[int]:
    return pids_by_cmdline(f"ServeReplica:{app}:Detector")


def test_sigkill_of_a_model_replica_under_load(server):
    """4 clients send steadily to an app with two model replicas; one replica's process is SIGKILLed.
    Serve replaces it: under 1 % of requests fail (anything but a 200 or a JSON 503 with Retry-After),
    none waits past its timeout, and both replicas serve again."""
    import os
    import signal
    import threading
    import time

    data = [_bytes(_photo(20 + i)) for i in range(4)]
    url = f"{server}/twin/v1/ensemble"
    before = _replica_pids("twin")
    assert len(before) == 2
    results, stop = [], threading.Event()

    def client(k: int):
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = requests.post(url, files={"image": ("x.png", data[k])}, timeout=45)
                ok = r.status_code == 200 or (r.status_code == 503 and "retry-after" in r.headers
                                              and "error" in r.json())
                results.append((ok, r.status_code, time.perf_counter() - t0))
            except requests.RequestException as e:
                results.append((False, type(e).__name__, time.perf_counter() - t0))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    os.kill(before[0], signal.SIGKILL)
    time.sleep(12)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    failed = [r for r in results if not r[0]]
    slowest = max(r[2] for r in results)
    print(f"\nreplica SIGKILL under load: {len(results)} requests, {len(failed)} failed, slowest {slowest:.2f} s")
    assert len(results) > 50 and len(failed) / len(results) < 0.01, failed[:5]
    assert slowest < 45
    deadline = time.time() + 90
    while time.time() < deadline and len(_replica_pids("twin")) < 2:
        time.sleep(1)
    assert len(_replica_pids("twin")) == 2 and before[0] not in _replica_pids("twin")
    assert requests.get(f"{server}/twin/readyz", timeout=30).status_code == 200


# --------------------------------------------------------------------------- /v1/explain


def test_explain_answers_what_detect_answers_with_the_librarys_map(server, library):
    from aigd.config import DecodeLimits, EnsembleConfig, ExplainConfig
    from aigd.explain import explain

    data = _bytes(_photo(41))
    image = library.prepare(data, DecodeLimits())
    detect = _post(f"{server}/main/v1/detect?adapter=method1", data).json()
    got = _post(f"{server}/main/v1/explain?adapter=method1", data)
    assert got.status_code == 200, got.text
    got = got.json()
    assert got["p_fake"] == pytest.approx(detect["p_fake"], abs=1e-5) and got["label"] == detect["label"]
    assert got["model"] == detect["model"]
    mine = explain(library, image, "method1", ["method1"], EnsembleConfig(), ExplainConfig())
    np.testing.assert_allclose(got["explanation"]["grid"], mine["explanation"]["grid"], atol=2e-3)
    assert got["explanation"]["method"] == "occlusion" and got["timing"]["model_ms"] > 0
    ens = _post(f"{server}/main/v1/ensemble", data).json()
    both = _post(f"{server}/main/v1/explain?method=input_x_gradient", data).json()  # adapter: ensemble
    assert both["adapter"] == "ensemble" and both["p_fake"] == pytest.approx(ens["p_fake"], abs=1e-5)
    assert both["explanation"]["method"] == "input_x_gradient" and set(both["explanation"]["peak_logit"]) == {
        "method1", "method2"}
    overlay = Image.open(io.BytesIO(base64.b64decode(both["explanation"]["overlay_png_base64"])))
    assert overlay.format == "PNG"
    doc = requests.get(f"{server}/main/openapi.json", timeout=30).json()
    params = {p["name"]: p for p in doc["paths"]["/v1/explain"]["post"]["parameters"]}
    assert params["adapter"]["schema"]["enum"] == ["method1", "method2", "ensemble"]


def test_explain_refuses_what_detect_refuses_and_can_be_turned_off(server):
    jpeg = _bytes(_photo(2), "JPEG", quality=90)
    for data in (jpeg[: len(jpeg) // 2], b"\x00" * 300, _bytes(_photo(4, size=(12, 12)))):
        a = _post(f"{server}/main/v1/detect?adapter=method1", data)
        b = _post(f"{server}/main/v1/explain?adapter=method1", data)
        assert (a.status_code, a.json()["error"]["code"]) == (b.status_code, b.json()["error"]["code"])
    for query, status, code in (("adapter=nope", 404, "unknown_adapter"), ("method=saliency", 400, "bad_request")):
        r = _post(f"{server}/main/v1/explain?{query}", jpeg)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    off = _post(f"{server}/strict/v1/explain?adapter=method1", jpeg)
    assert off.status_code == 404 and off.json()["error"]["code"] == "not_found"
    assert "turned off" in off.json()["error"]["message"]
    assert "/v1/explain" not in requests.get(f"{server}/strict/openapi.json", timeout=30).json()["paths"]


def test_explain_deadline_and_concurrency_never_block_scoring(server):
    """An explanation past its deadline is a 503 and stops; one more than explain.max_concurrent is a
    503 at once; /v1/detect answers all along, and the replica explains again afterwards."""
    import time

    data = _bytes(_photo(42))
    url = f"{server}/degrade/v1/explain?adapter=method1&method=integrated_gradients"
    ready = requests.get(f"{server}/degrade/readyz", timeout=30).json()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, url, data)
        time.sleep(0.8)
        second = pool.submit(_post, url, data)
        detects = []
        while not (first.done() and second.done()):
            t0 = time.perf_counter()
            r = _post(f"{server}/degrade/v1/detect?adapter=method1", data)
            detects.append((r.status_code, time.perf_counter() - t0))
        answers = [first.result(), second.result()]
    assert sorted((r.status_code, r.json()["error"]["code"]) for r in answers) == [
        (503, "deadline_exceeded"), (503, "overloaded")], [r.text for r in answers]
    assert all(r.headers["Retry-After"] == "1" for r in answers)
    assert len(detects) >= 3 and all(s == 200 for s, _ in detects), detects
    assert max(t for _, t in detects) < 2.5, detects  # never waited out the 3 s explanation
    for _ in range(50):  # the thread stops at its next pass and frees its slot
        again = _post(f"{server}/degrade/v1/explain?adapter=method1&method=input_x_gradient", data)
        if again.status_code != 503:
            break
        time.sleep(0.2)
    assert again.status_code == 200, again.text
    info = requests.get(f"{server}/degrade/v1/models", timeout=30).json()
    assert info["explanations_running"] == 0 and info["replica"] == ready["replica"]


def test_explain_of_the_ensemble_follows_its_member_failure_policy(server):
    data = _bytes(_photo(43))
    ens = _post(f"{server}/degrade/v1/ensemble", data).json()
    got = _post(f"{server}/degrade/v1/explain?method=input_x_gradient", data)
    assert got.status_code == 200, got.text
    got = got.json()
    assert got["adapter"] == "ensemble" and got["degraded"] and got["members_failed"].keys() == {"mismatched"}
    assert got["p_fake"] == pytest.approx(ens["p_fake"], abs=1e-5) and got["members_used"] == ens["members_used"]


def test_answers_are_traceable_and_say_what_the_file_declares(server):
    """request_id (the caller's X-Request-ID, echoed in the header too) and image_sha256 in every answer
    and error; the provenance block beside the score, which it never changes."""
    import hashlib

    from aigd.dev import provenance_files as P

    img = _photo(40, size=(168, 140))
    plain, declared = _bytes(img), P.png_with_text(img, {"parameters": P.A1111_PARAMETERS})
    r = _post(f"{server}/main/v1/detect?adapter=method1", declared, headers={"X-Request-ID": "trace-0042"})
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"] == "trace-0042"
    assert body["image_sha256"] == hashlib.sha256(declared).hexdigest()
    assert body["provenance"]["declared"] == "ai" and body["provenance"]["generator_text"]["keys"] == ["parameters"]
    assert body["p_fake"] == _post(f"{server}/main/v1/detect?adapter=method1", plain).json()["p_fake"]
    signed = P.c2pa_signed(P.encode(img, "JPEG", quality=90))
    ens = _post(f"{server}/main/v1/ensemble", signed).json()
    assert ens["provenance"]["c2pa"]["validation_state"] == "Valid" and ens["request_id"]
    files = [("image", ("a.png", plain)), ("image", ("b.jpg", signed)), ("image", ("c.bin", b"junk" * 50))]
    batch = requests.post(f"{server}/main/v1/detect/batch?adapter=ensemble", files=files, timeout=60).json()
    a, b, c = batch["results"]
    assert batch["request_id"] and a["provenance"]["declared"] == "none" and b["provenance"]["declared"] == "ai"
    assert c["status"] == 415 and c["image_sha256"] == hashlib.sha256(b"junk" * 50).hexdigest()
    explained = _post(f"{server}/main/v1/explain?adapter=method1", signed).json()
    assert explained["provenance"]["declared"] == "ai" and explained["image_sha256"] == b["image_sha256"]
    # errors: the decoder's, the router's, FastAPI's validation
    for url, data in ((f"{server}/main/v1/detect?adapter=method1", b"junk" * 50),
                      (f"{server}/main/v1/nowhere", b""), (f"{server}/main/v1/detect", plain)):
        e = _post(url, data, headers={"X-Request-ID": "trace-err"})
        assert e.status_code in (400, 404, 415) and e.json()["request_id"] == "trace-err" == e.headers["x-request-id"]
    made_up = _post(f"{server}/main/v1/detect?adapter=method1", plain)
    assert made_up.json()["request_id"] == made_up.headers["x-request-id"] != ""


def test_hostile_metadata_costs_the_answer_nothing_but_its_provenance(server):
    from aigd.dev import provenance_files as P

    img = _photo(41, size=(168, 140))
    for name, make in sorted(P.HOSTILE.items()):
        r = _post(f"{server}/main/v1/detect?adapter=method1", make(img))
        assert r.status_code == 200, (name, r.text)
        block = r.json()["provenance"]
        assert (block["error"] is None) == (name == "broken_exif"), (name, block)
        assert 0 <= r.json()["p_fake"] <= 1
    off = _post(f"{server}/strict/v1/detect?adapter=method1", P.with_xmp(img, "JPEG"))
    assert off.status_code == 200 and "provenance" not in off.json()  # provenance.enabled: false there
    late = _post(f"{server}/twin/v1/detect?adapter=method1", P.slow_to_read(img)).json()
    assert "not read within provenance.timeout_s" in late["provenance"]["error"] and 0 <= late["p_fake"] <= 1


def test_the_documented_metric_names_are_exported(server):
    """Every `ray_aigd_*` name the README and docs give for serving is on the metrics endpoint (Ray
    prefixes custom metrics with ray_); the shadow ones are checked where shadow runs (test_lifecycle)."""
    import os
    import time

    from helpers import documented_metrics

    for _ in range(3):
        _post(f"{server}/main/v1/ensemble", _bytes(_photo(42)))
    names = {n for n in documented_metrics() if not n.startswith("ray_aigd_shadow")}
    assert {"ray_aigd_requests_total", "ray_aigd_request_latency_ms", "ray_aigd_provenance_declared_total"} <= names
    missing, deadline = names, time.monotonic() + 60
    while missing and time.monotonic() < deadline:  # Ray exports every few seconds
        text = requests.get(os.environ["AIGD_TEST_METRICS"], timeout=30).text
        missing = {n for n in names if not re.search(rf"^{n}(_bucket|_count|_sum)?{{", text, re.M)}
        time.sleep(2)
    assert not missing, missing
