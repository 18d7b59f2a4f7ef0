"""The one scoring front door: which base an adapter needs, the adapter lock, policy from manifests."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from aigd.config import ImagePolicy, ModelConfig, ScoringConfig
from aigd.errors import ManifestMismatch
from aigd.manifest import policy_for
from aigd.scorer import Scorer
from conftest import SERVE_POLICY


def _cfg(model, adapters, **kw) -> ScoringConfig:
    return ScoringConfig(model=ModelConfig(name_or_path=str(model), load_in_4bit=False),
                         adapters={k: str(v) for k, v in adapters.items()}, **kw)


@pytest.fixture(scope="module")
def scorer(tiny_model, adapters):
    return Scorer(_cfg(tiny_model, {k: adapters[k] for k in ("method1", "method2")}))


_HUB_SCRIPT = """
import sys
from pathlib import Path
from conftest import make_adapter
from aigd.config import ModelConfig, ScoringConfig
from aigd.errors import ManifestMismatch
from aigd.scorer import Scorer

adapter = make_adapter("aigd-test/tiny-a", Path(sys.argv[1]), seed=1, temperature=1.0, method="method1")
Scorer(ScoringConfig(model=ModelConfig(name_or_path="aigd-test/tiny-a", load_in_4bit=False),
                     adapters={"m": str(adapter)}))
print("same base: ok")
try:
    Scorer(ScoringConfig(model=ModelConfig(name_or_path="aigd-test/tiny-b", load_in_4bit=False),
                         adapters={"m": str(adapter)}))
except ManifestMismatch as e:
    print("refused:", e)
"""


@pytest.mark.slow  # a model or process group of its own: seconds, not the edit loop
def test_cached_hub_ids_load_offline_and_another_checkpoint_is_refused(tiny_model, tmp_path):
    """Two checkpoints with the same architecture (as Qwen's and Unsloth's 4-bit copy of it are), both
    in the offline Hugging Face cache: an adapter trained on one is refused on the other, both named."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    cache, sha = tmp_path / "hub", "0" * 40
    for name in ("tiny-a", "tiny-b"):
        repo = cache / f"models--aigd-test--{name}"
        shutil.copytree(tiny_model, repo / "snapshots" / sha)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(sha)
    tests = Path(__file__).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, str(tmp_path / "adapter")], env=env, cwd=tests,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "same base: ok" in out.stdout
    refused = out.stdout.split("refused:", 1)[1]
    assert "'aigd-test/tiny-a'" in refused and "'aigd-test/tiny-b'" in refused and "checkpoint differs" in refused


def test_policy_comes_from_the_manifests_unless_pinned(tiny_model, adapters, scorer):
    assert scorer.policy == ImagePolicy(**SERVE_POLICY)
    with pytest.raises(ManifestMismatch, match="different image policies"):
        policy_for(_cfg(tiny_model, {"a": adapters["method1"], "b": adapters["mismatched"]}))
    pinned = ImagePolicy(**{**SERVE_POLICY, "max_pixels": 112 * 112})
    assert policy_for(_cfg(tiny_model, {"a": adapters["method1"]}, image=pinned)) == pinned


def test_concurrent_scoring_never_mixes_adapters(scorer):
    """Two threads score with different adapters at once; each forward runs under the lock with the
    adapter its caller asked for, and the answers equal sequential scoring."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(2)]
    want = {a: scorer.pair_logits(images, a) for a in ("method1", "method2")}
    seen, errors = [], []

    def check(module, args, kwargs):
        seen.append((scorer._lock.locked(), scorer.model.active_adapter))

    hook = scorer.model.base_model.model.register_forward_pre_hook(check, with_kwargs=True)
    try:
        def work(adapter):
            for _ in range(15):
                got = scorer.pair_logits(images, adapter)
                if not np.allclose(got, want[adapter], atol=1e-6):
                    errors.append(adapter)

        threads = [threading.Thread(target=work, args=(a,)) for a in ("method1", "method2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        hook.remove()
    assert not errors and len(seen) == 30 and all(locked for locked, _ in seen)
    assert {a for _, a in seen} == {scorer.members[a].peft_name for a in ("method1", "method2")}
    assert not any(p.requires_grad for p in scorer.model.parameters())  # inference-mode adapters


def test_a_server_scorer_warms_every_version_up_and_drops_one_whose_first_forward_fails(tiny_model, adapters,
                                                                                       monkeypatch):
    """Scorer(warm_up=True) is what a Serve replica builds: each version runs a forward before it can
    serve; one that fails there is unloaded, not left half loaded, and reported like a mismatch."""
    import aigd.scorer as S
    from aigd.errors import AdapterUnavailable

    pair = {k: adapters[k] for k in ("method1", "method2")}
    warm = Scorer(_cfg(tiny_model, pair), warm_up=True)
    assert all(a["warmup_ms"] > 0 for a in warm.describe()["adapters"].values())
    assert Scorer(_cfg(tiny_model, pair)).describe()["adapters"]["method1"]["warmup_ms"] is None  # batch jobs

    real, calls = S.answer_logits, []

    def second_forward_fails(model, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return real(model, batch)

    monkeypatch.setattr(S, "answer_logits", second_forward_fails)
    with pytest.raises(AdapterUnavailable, match="method2 .*first forward failed: CUDA out of memory"):
        Scorer(_cfg(tiny_model, pair), warm_up=True)
    calls.clear()
    survivor = Scorer(_cfg(tiny_model, pair), warm_up=True, on_adapter_error="skip")
    assert list(survivor.members) == ["method1"] and "method2" in survivor.unavailable
    assert list(survivor.model.peft_config) == [survivor.members["method1"].peft_name]  # nothing left behind
