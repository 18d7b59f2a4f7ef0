"""Helpers shared by several test files (and the serve benches), so no test imports another test file.

Tests import them as `from helpers import ...` (tests/ is on sys.path, as for conftest); the benches,
which put the repository root on sys.path, as `from tests.helpers import ...`. Production fixtures
that the demo data generator needs (the PNG header bomb, the JPEG scan bomb) stay in
`aigd.dev.demo_data`; tests import those from there.
"""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
from PIL import Image


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_by_cmdline(needle: str) -> list[int]:
    """Ids of the live processes whose command line (or process title, as Ray sets it: e.g.
    `ray::ServeReplica:<app>:Detector`, `ray::RayTrainWorker`) contains `needle`."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if needle in " ".join(p.info["cmdline"] or ())]


def photo(seed: int, size=(150, 120)) -> Image.Image:
    """A smooth random RGB picture (upsampled noise), the same for the same seed and size."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 10 + 1, size[0] // 10 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def image_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    """The encoded file of `img` (Pillow's save options in `kw`)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def post_image(url: str, data: bytes, **kw):
    """POST `data` as the multipart field `image`, as the web page and most clients send it."""
    import requests

    return requests.post(url, files={"image": ("x.bin", data)}, timeout=60, **kw)


def serve_config(tiny_model, adapters: dict, **changes) -> dict:
    """The Serve app's config for tests: the tiny model, these adapters, small limits and CPU shares;
    each keyword replaces (a dict: updates) that section."""
    from conftest import SERVE_POLICY

    cfg = {
        "model": {"name_or_path": str(tiny_model), "load_in_4bit": False, "gradient_checkpointing": False},
        "image": dict(SERVE_POLICY),
        "adapters": {k: str(v) for k, v in adapters.items()},
        "limits": {"min_side": 28, "max_aspect": 50.0},
        "request": {"max_body_mb": 1.0, "body_idle_timeout_s": 2.0},
        "detector": {"num_cpus": 0.1, "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "router": {"num_cpus": 0.05},
    }
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def documented_metrics() -> set[str]:
    """Every Prometheus metric name of ours the README, deploy/README.md and docs/ give (ray_aigd_*)."""
    import re

    root = Path(__file__).resolve().parents[1]
    texts = [root / "README.md", root / "deploy" / "README.md", *sorted((root / "docs").glob("*.md"))]
    return {m for path in texts for m in re.findall(r"\bray_aigd_[a-z_]+[a-z]", path.read_text())}
