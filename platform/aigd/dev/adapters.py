"""Random but real adapter versions on the tiny model: peft safetensors with non-zero LoRA weights,
a manifest, published into a registry entry. For tests and bench/promote_load.py, where what an
adapter scores matters less than that it loads, answers and names its version."""

from __future__ import annotations

from pathlib import Path

# A small pixel budget: the tiny model scores an image in milliseconds.
SMALL_POLICY = dict(max_pixels=140 * 140, min_pixels=56 * 56, prompt="Real/Fake?", prompt_version="v1")


def calibration(temperature: float, threshold: float) -> dict:
    return {"temperature": temperature, "threshold": threshold, "threshold_rule": "test", "target_fpr": 0.05,
            "threshold_at_target_fpr": threshold, "uncertain_band": None, "band_precision": 0.95,
            "ece_before": 0.0, "ece_after": 0.0, "n": 0}


def random_adapter(tiny_model: Path, entry: Path, seed: int, temperature: float, method: str,
                   threshold: float = 0.5, **policy_changes) -> Path:
    """Publish a new version under the registry entry `entry`; returns the version folder."""
    import torch

    from aigd.config import ImagePolicy, LoraConfig, ModelConfig
    from aigd.manifest import new_manifest, write_adapter
    from aigd.model import load_for_training

    model, _, base = load_for_training(ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False,
                                                   gradient_checkpointing=False), LoraConfig(seed=seed),
                                       torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    raw = entry.parent / f"{entry.name}-peft-{seed}"
    model.save_pretrained(raw)
    manifest = new_manifest(method=method, base=base, policy=ImagePolicy(**{**SMALL_POLICY, **policy_changes}),
                            lora={}, training={}, data={}, val_metrics={},
                            calibration=calibration(temperature, threshold))
    return Path(write_adapter(raw, str(entry), manifest).uri)
