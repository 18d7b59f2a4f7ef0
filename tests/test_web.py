"""The web page, the docs page and the API contract, in a real browser (Debian's chromium driven by
Playwright) against the Serve app on a local Ray, with every request off 127.0.0.1 blocked."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from helpers import free_port as _free_port
from helpers import image_bytes as _bytes
from helpers import photo as _photo
from helpers import serve_config as _config

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
UI_PYTHON = ROOT / ".venv-ui" / "bin" / "python"

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def api(ray_local, tiny_model, adapters):
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    good = {k: adapters[k] for k in ("method1", "method2")}
    # 5 images per batch request: the page must learn the limit from the API (its OpenAPI document)
    serve.run(build_app(_config(tiny_model, good, request={"max_batch_images": 5})), name="web", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def ui_dirs(tmp_path_factory):
    """The page's examples, and the temporary folders it writes to (its own, Gradio's cache)."""
    root = tmp_path_factory.mktemp("ui")
    examples = root / "examples"
    examples.mkdir()
    (examples / "real-sample.png").write_bytes(_bytes(_photo(50)))
    (examples / "fake-sample.jpg").write_bytes(_bytes(_photo(51), "JPEG", quality=90))
    for name in ("tmp", "gradio"):
        (root / name).mkdir()
    return root


@pytest.fixture(scope="module")
def ui(api, ui_dirs):
    if not UI_PYTHON.exists():
        pytest.skip(f"{UI_PYTHON} missing: `make setup` builds the UI environment")
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(ui_dirs / "tmp"),
           "GRADIO_TEMP_DIR": str(ui_dirs / "gradio")}
    env.pop("AIGD_API_KEY", None)
    proc = subprocess.Popen([str(UI_PYTHON), "-m", "aigd.ui", "--api", api, "--port", str(port),
                             "--examples", str(ui_dirs / "examples")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if requests.get(url, timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            pytest.fail(f"the UI exited: {proc.stdout.read()}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it with apt-get)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _offline_page(browser, width=1300, height=1000):
    """A page that can reach 127.0.0.1 only: what renders here renders without internet."""
    page = browser.new_page(viewport={"width": width, "height": height})
    blocked = []

    def route(r):
        host = re.match(r"^[a-z]+://([^/:]+)", r.request.url)
        if host and host.group(1) not in ("127.0.0.1", "localhost"):
            blocked.append(r.request.url)
            return r.abort()
        return r.continue_()

    page.route("**/*", route)
    return page, blocked


def _cells(table_text: str) -> list[str]:
    """A rendered table's cells in reading order."""
    return [c.strip() for c in table_text.split("\n") if c.strip()]


def _float(text: str) -> float:
    return float(re.search(r"[0-9]*\.[0-9]+", text).group(0))


def _score_in_page(page, ui: str, image: Path, expect: str) -> str:
    """Upload `image` on the Score tab, press Score, wait for `expect` in the verdict; its text."""
    page.goto(ui, wait_until="domcontentloaded")
    page.locator("#score-image input[type=file]").set_input_files(str(image))
    page.locator("#score-image img").wait_for(timeout=30_000)
    page.click("#score-button")
    page.wait_for_selector(f"#score-verdict :text('{expect}')", timeout=60_000)
    return page.inner_text("#score-verdict")


def test_score_tab_draws_the_apis_evidence_map_beside_the_verdict(ui, api, browser, tmp_path):
    """With the toggle on, the page shows the API's overlay PNG itself (pixel for pixel) and the verdict
    of the same answer."""
    import io

    import numpy as np
    from PIL import Image

    image = tmp_path / "photo.png"
    image.write_bytes(_bytes(_photo(35)))
    truth = requests.post(f"{api}/v1/explain", files={"image": ("photo.png", image.read_bytes())}, timeout=120).json()
    page, blocked = _offline_page(browser)
    page.goto(ui, wait_until="domcontentloaded")
    page.locator("#score-image input[type=file]").set_input_files(str(image))
    page.locator("#score-image img").wait_for(timeout=30_000)
    page.locator("#score-explain input[type=checkbox]").check()
    page.click("#score-button")
    page.wait_for_selector("#score-verdict :text('Evidence')", timeout=120_000)
    verdict = page.inner_text("#score-verdict")
    assert f"Verdict: {truth['label'].upper()}" in verdict
    assert _float(verdict.split("P(fake)")[1]) == pytest.approx(truth["p_fake"], abs=5e-4)
    shown = page.locator("#score-overlay img")
    shown.wait_for(timeout=30_000)
    png = page.request.get(requests.compat.urljoin(ui + "/", shown.get_attribute("src"))).body()
    expected = Image.open(io.BytesIO(base64.b64decode(truth["explanation"]["overlay_png_base64"])))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(expected.convert("RGB")))
    page.screenshot(path=str(tmp_path / "ui-explain.png"), full_page=True)
    assert not blocked, blocked


def test_score_tab_shows_the_apis_answer_and_its_errors(ui, api, browser, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(_bytes(_photo(31)))
    truth = requests.post(f"{api}/v1/ensemble", files={"image": ("photo.png", image.read_bytes())}, timeout=60).json()
    page, _ = _offline_page(browser)
    verdict = _score_in_page(page, ui, image, "Verdict")
    assert f"Verdict: {truth['label'].upper()}" in verdict
    assert _float(verdict.split("P(fake)")[1]) == pytest.approx(truth["p_fake"], abs=5e-4)
    cells = _cells(page.inner_text("#score-members"))
    shown = {name: float(cells[cells.index(name) + 1]) for name in truth["members"]}  # adapter, then P(fake)
    assert shown == pytest.approx({n: m["p_fake"] for n, m in truth["members"].items()}, abs=5e-4)
    page.screenshot(path=str(tmp_path / "ui-score.png"), full_page=True)
    # an image the API refuses: the API's status and message, not a traceback
    small = tmp_path / "small.png"
    small.write_bytes(_bytes(_photo(32, size=(12, 12))))
    error = _score_in_page(page, ui, small, "API error")
    assert "422 image_rejected" in error and "minimum side" in error and "Traceback" not in error
    page.screenshot(path=str(tmp_path / "ui-error.png"), full_page=True)
    assert (tmp_path / "ui-score.png").stat().st_size > 10_000
    print(f"\nscreenshots: {tmp_path}")


def _rgba_png() -> bytes:
    import numpy as np
    from PIL import Image

    rgba = np.dstack([np.asarray(_photo(60, size=(196, 168))), np.linspace(0, 255, 196 * 168).reshape(168, 196)])
    return _bytes(Image.fromarray(rgba.astype(np.uint8), "RGBA"))


def _exif_rotated_jpeg() -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the API turns it upright, as any viewer does
    return _bytes(_photo(62, size=(224, 168)), "JPEG", quality=92, exif=exif)


def test_the_page_scores_exactly_the_uploaded_bytes(ui, api, browser, tmp_path):
    """Files Gradio would convert and re-save by default (alpha, CMYK, EXIF rotation) get the P(fake)
    curl gets for the same file: the page sends the user's bytes."""
    files = {"rgba.png": _rgba_png(), "cmyk.jpg": _bytes(_photo(61, size=(224, 196)).convert("CMYK"), "JPEG", quality=90),
             "rotated.jpg": _exif_rotated_jpeg()}
    page, blocked = _offline_page(browser)
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        out = subprocess.run(["curl", "-s", "-F", f"image=@{path}", f"{api}/v1/ensemble"], capture_output=True,
                             text=True, timeout=60)
        truth = __import__("json").loads(out.stdout)
        verdict = _score_in_page(page, ui, path, "Verdict")
        assert _float(verdict.split("P(fake)")[1]) == pytest.approx(truth["p_fake"], abs=5e-4), name
    assert not blocked, blocked


def test_examples_provenance_and_plain_words(ui, api, browser, ui_dirs, tmp_path):
    """A held-out sample is one click; the file's provenance is shown apart from the verdict."""
    from aigd.dev import provenance_files as P

    page, _ = _offline_page(browser, height=1400)
    page.goto(ui, wait_until="domcontentloaded")
    page.locator("#score-examples").get_by_role("button").nth(1).click()
    page.locator("#score-image img").wait_for(timeout=30_000)
    page.click("#score-button")
    page.wait_for_selector("#score-verdict :text('Verdict')", timeout=60_000)
    verdict = page.inner_text("#score-verdict")
    example = sorted((ui_dirs / "examples").iterdir())[1]
    truth = requests.post(f"{api}/v1/ensemble", files={"image": ("x", example.read_bytes())}, timeout=60).json()
    assert _float(verdict.split("P(fake)")[1]) == pytest.approx(truth["p_fake"], abs=5e-4)
    declared = tmp_path / "generated.png"
    declared.write_bytes(P.png_with_text(_photo(63), {"parameters": P.A1111_PARAMETERS}))
    _score_in_page(page, ui, declared, "Verdict")
    page.wait_for_selector("#score-provenance :text('made by AI')", timeout=30_000)
    assert "Stable Diffusion web UI" in page.inner_text("#score-provenance")
    page.screenshot(path=str(tmp_path / "ui-provenance.png"), full_page=True)


def test_the_pages_words_for_degraded_and_uncertain_answers():
    from aigd.ui import verdict_markdown

    base = {"label": "uncertain", "p_fake": 0.5, "threshold": 0.5, "uncertain_band": [0.4, 0.6],
            "members_used": ["method1"], "members_failed": {"method2": "replica lost"}, "degraded": True,
            "timing": {"model_ms": 10, "decode_ms": 1}, "request_id": "r1"}
    text = verdict_markdown(base, 12.0)
    assert "Degraded answer" in text and "method2 could not answer" in text
    assert "cannot tell" in text and "not as real" in text
    calm = verdict_markdown({**base, "label": "fake", "degraded": False, "members_failed": {}}, 12.0)
    assert "Degraded" not in calm and "cannot tell" not in calm


def test_the_page_refuses_to_share_an_api_key_without_a_login():
    if not UI_PYTHON.exists():
        pytest.skip(f"{UI_PYTHON} missing")
    env = {**os.environ, "AIGD_API_KEY": "secret", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("AIGD_UI_AUTH", None)
    out = subprocess.run([str(UI_PYTHON), "-m", "aigd.ui", "--host", "0.0.0.0", "--api", "http://127.0.0.1:9"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "refusing to serve on 0.0.0.0" in out.stderr


def test_stability_and_batch_tabs(ui, api, browser, ui_dirs, tmp_path):
    image = tmp_path / "photo.jpg"
    image.write_bytes(_bytes(_photo(33, size=(280, 224)), "JPEG", quality=95))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all" * 10)
    more = []
    for i in range(5):  # seven files: two batch requests at the API's limit of 5
        more.append(tmp_path / f"more-{i}.png")
        more[-1].write_bytes(_bytes(_photo(70 + i)))
    page, _ = _offline_page(browser, height=1400)
    page.goto(ui, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Stability").click()
    page.locator("#stab-image input[type=file]").set_input_files(str(image))
    page.locator("#stab-image img").wait_for(timeout=30_000)
    page.click("#stab-button")
    page.wait_for_selector("#stab-note :text('verdict')", timeout=60_000)
    cells = _cells(page.inner_text("#stab-table"))
    assert [c for c in cells if c in ("original", "JPEG q95", "JPEG q75", "JPEG q50", "JPEG q30", "downscaled 1/2")] \
        == ["original", "JPEG q95", "JPEG q75", "JPEG q50", "JPEG q30", "downscaled 1/2"]
    page.screenshot(path=str(tmp_path / "ui-stability.png"), full_page=True)
    page.get_by_role("tab", name="Batch").click()
    page.locator("#batch-files input[type=file]").set_input_files([str(image), str(junk), *map(str, more)])
    page.click("#batch-button")
    page.wait_for_selector("#batch-note :text('7 files scored.')", timeout=90_000)
    table = page.inner_text("#batch-table")
    assert "photo.jpg" in table and "junk.png" in table and "415" in table and "more-4.png" in table
    truth = requests.post(f"{api}/v1/ensemble", files={"image": ("p", image.read_bytes())}, timeout=60).json()
    assert f"{truth['p_fake']:.4f}".rstrip("0") in table
    # the page's own CSV folder is gone once Gradio has its copy (which delete_cache sweeps, with the uploads)
    assert [p for p in (ui_dirs / "tmp").iterdir() if p.name.startswith("aigd-ui-")] == []
    assert any(p.name == "aigd-batch.csv" for p in (ui_dirs / "gradio").rglob("*"))


def test_docs_render_offline(api, browser, tmp_path):
    page, blocked = _offline_page(browser)
    page.goto(f"{api}/docs", wait_until="domcontentloaded")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "aigd" in page.inner_text(".swagger-ui .info .title")
    page.get_by_text("/v1/ensemble", exact=True).first.wait_for(timeout=30_000)
    page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
    response = page.goto(f"{api}/redoc", wait_until="domcontentloaded")
    page.get_by_text("/v1/detect/batch").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1000)  # ReDoc adds its CDN logo after rendering
    assert "img-src 'self' data:" in response.headers["content-security-policy"]
    assert not blocked, blocked  # the policy keeps the browser from even asking for the logo


def test_openapi_declares_bodies_answers_and_errors(api):
    doc = requests.get(f"{api}/openapi.json", timeout=30).json()
    detect = doc["paths"]["/v1/detect"]["post"]
    assert {"multipart/form-data", "application/json", "image/jpeg"} <= set(detect["requestBody"]["content"])
    assert {"200", "400", "404", "413", "415", "422", "503"} <= set(detect["responses"])
    adapter = next(p for p in detect["parameters"] if p["name"] == "adapter")
    assert adapter["schema"]["enum"] == ["method1", "method2"]
    batch = doc["paths"]["/v1/detect/batch"]["post"]["requestBody"]["content"]
    assert batch["multipart/form-data"]["schema"]["properties"]["image"]["maxItems"] == 5  # request.max_batch_images
    assert batch["application/json"]["schema"]["properties"]["images"]["maxItems"] == 5
    models = doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models["$ref"].endswith("/ModelsAnswer")
    err = detect["responses"]["415"]["content"]["application/json"]["schema"]["$ref"]
    assert err.endswith("/ErrorBody")
    # the JSON-base64 way a generated client would send it
    body = {"image": base64.b64encode(_bytes(_photo(34))).decode()}
    assert requests.post(f"{api}/v1/detect?adapter=method1", json=body, timeout=60).status_code == 200


def test_schemathesis_finds_nothing(api):
    """`st run --checks all` against the running app (schemathesis.toml: image content rules are 415/422)."""
    st = Path(sys.executable).parent / "st"
    out = subprocess.run([str(st), "run", f"{api}/openapi.json", "--checks", "all", "--max-examples", "40",
                          "--seed", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]
    assert re.search(r"\d+ generated, \d+ passed", out.stdout), out.stdout[-2000:]


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_api_examples_run(api, tmp_path):
    """The README's curl lines and Python client, run as written against the app (URL and file swapped)."""
    section = _readme_section("Calling the API")
    photo, other = tmp_path / "photo.jpg", tmp_path / "b.png"
    photo.write_bytes(_bytes(_photo(35), "JPEG", quality=92))
    other.write_bytes(_bytes(_photo(36)))
    curls = [line for line in section.split("```bash", 1)[1].split("```", 1)[0].splitlines() if line.startswith("curl")]
    assert len(curls) >= 4
    for line in curls:
        cmd = line.replace("http://127.0.0.1:8000", api).replace("@a.jpg", f"@{photo}").replace("@b.png", f"@{other}") \
            .replace("@photo.jpg", f"@{photo}")
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
        body = __import__("json").loads(out.stdout)
        assert "p_fake" in body or len(body["results"]) == 2, (line, out.stdout[:300])
    evidence = _readme_section("Where the evidence is").split("```bash", 1)[1].split("```", 1)[0]
    for line in [x for x in evidence.splitlines() if x.startswith("curl")]:
        cmd = line.split("  #")[0].replace("http://127.0.0.1:8000", api).replace("@photo.jpg", f"@{photo}")
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        body = __import__("json").loads(out.stdout)
        assert body["explanation"]["grid"] and 0 <= body["p_fake"] <= 1, (line, out.stdout[:300])
    code = section.split("<!-- example:python -->\n```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"http://127.0.0.1:8000"', repr(api)).replace('"photo.jpg"', repr(str(photo)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first, *members = out.stdout.strip().splitlines()
    assert first.split()[0] in ("real", "fake", "uncertain") and len(members) == 2, out.stdout
