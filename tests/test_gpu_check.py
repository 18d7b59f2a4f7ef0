"""The GPU check's every stage runs on CPU with the tiny model (`--cpu-smoke`), so it cannot rot
between the rare runs on a lent GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_passes_every_stage(tmp_path):
    env = {**os.environ, "AIGD_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--cpu-smoke", "--json"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stages = result["stages"]
    assert set(stages) == {"backend_hf", "train_method2", "train_method1", "score"}
    assert all(s["ok"] for s in stages.values()), stages
    assert stages["train_method2"]["workers"] == 2 and stages["train_method2"]["global_step"] == 4
    assert stages["score"]["trained_on"] == stages["score"]["served_on"]
