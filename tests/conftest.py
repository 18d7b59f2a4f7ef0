"""Shared fixtures: one tiny model, one small demo dataset and one local Ray per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for sub in ("jobs", "serve"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

SMALL_DEMO = dict(rows_per_class=120, tampered_rows=10, small_rows=12, corrupt_rows=2, shards=2, seed=0)


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("aigd-home")
    os.environ["AIGD_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(home) -> Path:
    from aigd.tiny_model import build_tiny_model

    return build_tiny_model(home / "tiny-qwen2.5-vl", seed=0)


@pytest.fixture(scope="session")
def demo_data(home) -> Path:
    from aigd.config import DemoDataConfig
    from aigd.demo_data import write_demo_data

    return write_demo_data(DemoDataConfig(out_dir=str(home / "demo-data"), **SMALL_DEMO))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # Train workers unpickle the recipes' loop functions by module name (jobs/train_method*.py).
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "jobs"), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)
