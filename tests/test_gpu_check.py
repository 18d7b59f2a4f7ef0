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
    """Every stage but train_method2: its two workers, injected failure and restart through the same
    recipe are tests/test_training.py's (2 minutes of CI saved); the stage's code is train_method1's."""
    env = {**os.environ, "AIGD_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--cpu-smoke", "--json", "--stages",
                          "backend_hf", "train_method1", "score"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stages = result["stages"]
    assert set(stages) == {"prepare", "backend_hf", "train_method1", "score"}
    assert all(s["ok"] for s in stages.values()), stages
    assert stages["train_method1"]["global_step"] == 2 and stages["train_method1"]["val_n"] > 0
    assert stages["train_method1"]["process_group"] == "gloo"  # as the rank reported it: CPU
    assert stages["backend_hf"]["activation_dtypes"] == ["float32"]  # the hook saw the forward
    assert stages["score"]["trained_on"] == stages["score"]["served_on"]
    assert all(ms > 0 for ms in stages["score"]["warmup_ms"].values())


def test_the_stage_caps_fit_inside_the_outer_timeout():
    import re

    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    outer = int(re.search(r"timeout (\d+)", (ROOT / "bench/gpu_check.sh").read_text()).group(1))
    assert gpu_check.BUDGET_S + 30 <= outer <= 600  # 10 minutes on one GPU, the JSON printed before the backstop


def test_a_stage_past_its_cap_or_a_terminated_run_still_reports_what_ran(tmp_path, monkeypatch):
    """A stage's cap kills the stage's whole process group and says so; `timeout`'s SIGTERM to the
    check itself still prints the JSON line, naming the stage it interrupted."""
    import signal
    import time

    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    monkeypatch.setenv("AIGD_HOME", str(tmp_path))
    capped = gpu_check.run_stage("prepare", ["--cpu-smoke"], timeout=5)
    assert (capped["ok"], capped["error"]) == (False, "timed out after 5 s")
    env = {**os.environ, "AIGD_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench/gpu_check.py"), "--cpu-smoke", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # within the prepare stage (building the model and data takes longer)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode != 0 and result["ok"] is False
    assert result["stages"]["prepare"]["error"] == "interrupted"
