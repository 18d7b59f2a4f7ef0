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
for sub in ("", "jobs"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

def pytest_collection_modifyitems(items):
    """Whatever needs a Ray cluster (directly or through a fixture) is `slow`: `make test-fast` skips it."""
    for item in items:
        if "ray_local" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


def small_zoo():
    """Every generator family, trained for a few steps: the traces of each architecture, in seconds."""
    from aigd.config import ZooConfig

    return ZooConfig(steps=30, width=8, ddim_steps=4)


SMALL_DEMO = dict(rows_per_class=120, tampered_rows=10, small_rows=12, corrupt_rows=5, shards=2, seed=0)


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("aigd-home")
    os.environ["AIGD_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(home) -> Path:
    from aigd.dev.tiny_model import build_tiny_model

    return build_tiny_model(home / "tiny-qwen2.5-vl", seed=0)


@pytest.fixture(scope="session")
def demo_data(home) -> Path:
    from aigd.config import DemoDataConfig
    from aigd.dev.demo_data import write_demo_data

    return write_demo_data(DemoDataConfig(out_dir=str(home / "demo-data"), zoo=small_zoo(), **SMALL_DEMO))


def corrupt_by_split(demo_data: Path) -> dict[str, list[str]]:
    """img_ids of the demo set's undecodable images (the pipeline skips and counts them), per split."""
    import pyarrow.parquet as pq

    from aigd.config import DataConfig
    from aigd.sampling import SPLITS, assign_split, split_key, unit_hash
    from aigd.images import decode

    cfg = DataConfig(min_width=112, split_group_sep="/")
    bad = []
    for r in pq.ParquetDataset(sorted(str(p) for p in (demo_data / "data").glob("*.parquet"))).read().to_pylist():
        try:
            decode(r["image"]["bytes"])
        except Exception:
            bad.append(r["img_id"])
    split_of = assign_split(unit_hash(split_key(bad, "/"), cfg.split_salt), cfg.val_fraction, cfg.test_fraction)
    return {name: [b for b, s in zip(bad, split_of) if s == i] for i, name in enumerate(SPLITS)}


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # Train workers unpickle the recipes' loop functions by module name (jobs/train_method*.py).
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "jobs"), os.environ.get("PYTHONPATH", "")])
    from helpers import free_port

    # The dashboard serves the Serve REST API (promotion) and a metrics port Prometheus text (shadow report).
    metrics_port = free_port()
    ctx = ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=True,
                   dashboard_host="127.0.0.1", dashboard_port=free_port(), _metrics_export_port=metrics_port,
                   log_to_driver=True)
    os.environ["AIGD_DASHBOARD"] = f"http://{ctx.dashboard_url}"
    os.environ["AIGD_TEST_METRICS"] = f"http://127.0.0.1:{metrics_port}/metrics"
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


from aigd.dev.adapters import SMALL_POLICY as SERVE_POLICY  # noqa: E402  (sys.path is set above)
from aigd.dev.adapters import calibration  # noqa: E402,F401
from aigd.dev.adapters import random_adapter as make_adapter  # noqa: E402,F401


@pytest.fixture(scope="session")
def adapters(tiny_model, home) -> dict[str, Path]:
    root = home / "test-adapters"
    return {
        "method1": make_adapter(tiny_model, root / "method1", seed=1, temperature=1.5, method="method1", threshold=0.4),
        "method2": make_adapter(tiny_model, root / "method2", seed=2, temperature=0.8, method="method2", threshold=0.6),
        # exported for a different pixel budget: serving must refuse it
        "mismatched": make_adapter(tiny_model, root / "mismatched", seed=3, temperature=1.0, method="method2",
                                   max_pixels=112 * 112),
    }
