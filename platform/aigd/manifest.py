"""Self-describing adapter versions: adapter weights + adapter_config.json + manifest.json, published
into the registry (aigd.registry) and never edited after.

The manifest's schema is written here and nowhere else (`new_manifest`, `recalibrated`).
Scoring refuses an adapter whose manifest does not match the base it would be loaded on (shape,
checkpoint, quantization) or the prompt/pixel policy it would be scored with, since either
mismatch silently degrades accuracy.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from pathlib import Path

from aigd import __version__
from aigd import registry
from aigd.config import ImagePolicy, ScoringConfig
from aigd.errors import AigdError, ManifestMismatch

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: versioned registry layout (2: one unversioned folder per adapter)
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "depth", "num_heads", "out_hidden_size", "patch_size")
_CALIBRATION_KEYS = ("temperature", "threshold", "threshold_rule", "target_fpr", "threshold_at_target_fpr",
                     "uncertain_band", "band_precision", "ece_before", "ece_after", "n")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def base_fingerprint(config) -> str:
    """Hash of the architecture's shape, so a copy of the same base in another folder still matches."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def pick(node):
        return {k: node[k] for k in _FINGERPRINT_KEYS if k in node}

    shape = {"top": pick(d), "text": pick(d.get("text_config", {})), "vision": pick(d.get("vision_config", {}))}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def weights_layout(model) -> str:
    """Hash of every base tensor's name, dtype and shape: tells a 4-bit NF4 base from a dynamically
    quantized one (other modules kept 16-bit) or from an unquantized one, where the shape cannot."""
    items = sorted((n, str(t.dtype), tuple(t.shape)) for n, t in model.state_dict().items() if "lora_" not in n)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


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


def policy_of(manifest: dict) -> ImagePolicy:
    return ImagePolicy(**manifest["image_policy"])


def new_manifest(*, method: str, base: dict, policy: ImagePolicy, lora: dict, training: dict, data: dict,
                 val_metrics: dict, calibration: dict) -> dict:
    """The schema. `base` comes from `aigd.model.base_info`, `calibration` from `metrics.fit_calibration`."""
    return {"format_version": FORMAT_VERSION, "created_at": _now(), "code_version": code_version(),
            "method": method, "base": base, "image_policy": policy_dict(policy),
            "label_words": ["Real", "Fake"], "lora": lora, "training": training, "data": data,
            "val_metrics": val_metrics, "calibration": _calibration(calibration, "export (training job)")}


def _calibration(fitted: dict, fitted_by: str) -> dict:
    missing = [k for k in _CALIBRATION_KEYS if k not in fitted]
    if missing:
        raise ValueError(f"calibration lacks {missing}")
    return {**{k: fitted[k] for k in _CALIBRATION_KEYS}, "fitted_by": fitted_by, "fitted_at": _now()}


def write_adapter(src_adapter_dir: Path, entry: str, manifest: dict) -> registry.Version:
    """Publish a peft adapter folder (safetensors only) with its manifest as a new version of `entry`."""
    return registry.publish(entry, {n: (Path(src_adapter_dir) / n).read_bytes() for n in registry.FILES}, manifest)


def recalibrated(version: registry.Version, fitted: dict, fitted_by: str) -> registry.Version:
    """A new version: the same weights with a new calibration (temperature, thresholds). The
    version being served is never edited; promoting the new one is what changes the answers."""
    manifest = read_manifest(version.uri)
    manifest["calibration"] = _calibration(fitted, fitted_by)
    manifest["created_at"] = _now()  # this version's; the weights' training is in `training` and `parent`
    manifest.pop("adapter")
    return registry.publish(version.entry, registry.files_of(version.uri), manifest, parent=version.version)


def upgrade(old: dict) -> dict:
    """A format-2 manifest (unversioned layout) in this format: `aigd adapters migrate`."""
    if old.get("format_version") != 2:
        raise ManifestMismatch(f"manifest format_version {old.get('format_version')}: only format 2 migrates")
    return {**old, "format_version": FORMAT_VERSION}


def read_manifest(ref: str | Path) -> dict:
    """The manifest of a version folder, or of a name folder's newest version."""
    version = ref if isinstance(ref, registry.Version) else registry.resolve(str(ref))
    manifest = registry.read_manifest(version)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestMismatch(f"{version.uri}: manifest format_version {manifest.get('format_version')}, this "
                               f"version of aigd reads {FORMAT_VERSION}; re-export the adapter")
    return manifest


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.isabs(name) and not name.startswith(".") and name.count("/") == 1 \
        and not Path(name).exists()


def check_compatible(manifest: dict, base: dict, policy: ImagePolicy, where: str = "adapter") -> None:
    """Refuse an adapter trained on another base (shape, checkpoint, quantization) or policy."""
    problems = []
    trained = manifest.get("base", {})
    trained_name = f"{trained.get('checkpoint')!r} ({trained.get('backend')}, quantization " \
                   f"{json.dumps(trained.get('quantization'))})"
    here_name = f"{base.get('checkpoint')!r} ({base.get('backend')}, quantization {json.dumps(base.get('quantization'))})"
    if trained.get("fingerprint") != base.get("fingerprint"):
        problems.append(f"architecture differs (fingerprint {trained.get('fingerprint')} vs {base.get('fingerprint')})")
    if trained.get("quantization") != base.get("quantization") or trained.get("layout") != base.get("layout"):
        problems.append("weights are quantized or stored differently (layout "
                        f"{trained.get('layout')} vs {base.get('layout')})")
    hub = _is_hub_id(trained.get("checkpoint")) and _is_hub_id(base.get("checkpoint"))
    # hub ids ignore case (unsloth before 2026.10 lower-cased the names it mapped to)
    if hub and trained["checkpoint"].lower() != base["checkpoint"].lower():
        problems.append("checkpoint differs")
    elif trained.get("commit") and base.get("commit"):  # the snapshots really read (hub cache or its folders)
        if trained["commit"] != base["commit"]:
            problems.append(f"snapshot differs (commit {trained['commit'][:12]} vs {base['commit'][:12]})")
    elif hub and trained.get("revision") != base.get("revision"):
        problems.append("revision differs")
    if problems:
        problems.insert(0, f"trained on base {trained_name}, this base is {here_name}")
    want, got = policy_dict(policy), manifest.get("image_policy", {})
    for k, v in want.items():
        if got.get(k) != v:
            problems.append(f"image_policy.{k}: adapter has {got.get(k)!r}, this scorer uses {v!r}")
    if problems:
        raise ManifestMismatch(f"{where} does not match: " + "; ".join(problems))


def policy_for(cfg: ScoringConfig) -> ImagePolicy:
    """The configured policy, or the one the adapters were trained with (they must agree)."""
    if cfg.image is not None:
        return cfg.image
    policies = {}
    for name, path in cfg.adapters.items():
        try:
            policies[name] = policy_of(read_manifest(path))
        except AigdError:
            continue  # refused (with its reason) when the adapter itself is loaded
    if len(set(policies.values())) > 1:
        raise ManifestMismatch(f"adapters were trained with different image policies: {policies}; "
                               "score them with separate scorers, or set `image` to one of them")
    if not policies:
        raise ManifestMismatch(f"no readable adapter manifest among {sorted(cfg.adapters)}")
    return next(iter(policies.values()))
