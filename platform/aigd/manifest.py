"""Self-describing adapter folders: adapter weights + adapter_config.json + manifest.json.

Serving refuses an adapter whose manifest does not match the base model it would be loaded on or
the prompt/pixel policy it would be scored with, since either mismatch silently degrades accuracy.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from aigd import __version__
from aigd.config import ImagePolicy
from aigd.errors import ManifestMismatch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "depth", "num_heads", "out_hidden_size", "patch_size")


def base_fingerprint(config) -> str:
    """Hash of the architecture's shape, so a copy of the same base in another folder still matches."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def pick(node):
        return {k: node[k] for k in _FINGERPRINT_KEYS if k in node}

    shape = {"top": pick(d), "text": pick(d.get("text_config", {})), "vision": pick(d.get("vision_config", {}))}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def policy_dict(policy: ImagePolicy) -> dict:
    return {"prompt": policy.prompt, "prompt_version": policy.prompt_version,
            "max_pixels": policy.max_pixels, "min_pixels": policy.min_pixels}


def write_adapter(src_adapter_dir: Path, out_dir: Path, manifest: dict) -> Path:
    """Copy a peft adapter folder (safetensors only) and write its manifest next to it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(src_adapter_dir / name, out_dir / name)
    manifest = {"format_version": FORMAT_VERSION, "created_at": datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"), "code_version": code_version(), **manifest}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out_dir


def read_manifest(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise ManifestMismatch(f"{adapter_dir}: no adapter_model.safetensors (only safetensors adapters are loaded)")
    path = adapter_dir / MANIFEST
    if not path.exists():
        raise ManifestMismatch(f"{adapter_dir}: no {MANIFEST}; export adapters with the training jobs")
    return json.loads(path.read_text())


def check_compatible(manifest: dict, fingerprint: str, policy: ImagePolicy, where: str = "adapter") -> None:
    problems = []
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    if manifest.get("base_fingerprint") != fingerprint:
        problems.append(f"trained on base {manifest.get('base_model')!r} (fingerprint "
                        f"{manifest.get('base_fingerprint')}), serving base has fingerprint {fingerprint}")
    want = policy_dict(policy)
    got = manifest.get("image_policy", {})
    for k, v in want.items():
        if got.get(k) != v:
            problems.append(f"image_policy.{k}: adapter has {got.get(k)!r}, server uses {v!r}")
    if problems:
        raise ManifestMismatch(f"{where} does not match this server: " + "; ".join(problems))
