"""One loader for every environment: Unsloth 4-bit on CUDA, transformers + peft elsewhere.

`backend: auto` picks Unsloth only where CUDA and the unsloth package are both present. Unsloth
is imported inside these functions, never at module import, because importing it patches
transformers globally (and on CPU it refuses vision models outright); on its branch it must be
imported before transformers (`import_backend_first`), or it patches less and runs slower.

Unsloth loads its own pre-quantized checkpoint for Qwen/Qwen2.5-VL-7B-Instruct (vision merger and
lm_head kept 16-bit). `base_info` records what was really loaded (checkpoint, quantization, tensor
layout) into every adapter's manifest, and scoring refuses a base that differs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from aigd.config import LoraConfig, ModelConfig
from aigd.errors import BackendUnavailable
from aigd.manifest import base_fingerprint, weights_layout

VISION_BLOCKS = r"(?:.*\.)?visual\.blocks\.\d+\."
LANGUAGE_LAYERS = r"(?:.*\.)?language_model\.layers\.\d+\."
PATCH_EMBED = r"(?:.*\.)?visual\.patch_embed\.proj"


def resolve_backend(cfg: ModelConfig) -> str:
    has_cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if cfg.backend == "auto":
        return "unsloth" if has_cuda and has_unsloth else "hf"
    if cfg.backend == "unsloth":
        if not has_cuda:
            raise BackendUnavailable("backend 'unsloth' needs a CUDA GPU (Unsloth refuses vision models on CPU); use model.backend=hf")
        if not has_unsloth:
            raise BackendUnavailable("backend 'unsloth' needs the unsloth package: pip install -e '.[gpu]'")
    return cfg.backend


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def lora_target_regex(lora: LoraConfig) -> str:
    """The seed's targets: vision qkv/proj/MLP and language q/k/v/o/MLP; merger and lm_head untouched."""
    parts = []
    if lora.vision:
        names = (["attn\\.qkv", "attn\\.proj"] if lora.attention else []) + (
            ["mlp\\.gate_proj", "mlp\\.up_proj", "mlp\\.down_proj"] if lora.mlp else [])
        if names:
            parts.append(VISION_BLOCKS + "(?:" + "|".join(names) + ")")
        if lora.patch_embed:
            parts.append(PATCH_EMBED)
    if lora.language:
        names = (["self_attn\\.[qkvo]_proj"] if lora.attention else []) + (
            ["mlp\\.gate_proj", "mlp\\.up_proj", "mlp\\.down_proj"] if lora.mlp else [])
        if names:
            parts.append(LANGUAGE_LAYERS + "(?:" + "|".join(names) + ")")
    if not parts:
        raise ValueError("LoRA config selects no modules")
    return "|".join(f"(?:{p})" for p in parts)


def import_backend_first(cfg: ModelConfig) -> str:
    """Call at the top of a worker before anything imports transformers; returns the backend."""
    backend = resolve_backend(cfg)
    if backend == "unsloth":
        # Read once at import: a per-rank folder unless the cluster names shared storage for it, so
        # two ranks on one node never write the same generated module at once.
        rank = os.environ.get("RANK", "0")
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION",
                              str(Path(tempfile.gettempdir()) / f"aigd-unsloth-cache-rank{rank}"))
        import unsloth  # noqa: F401  (the import is the point: it patches transformers)
    return backend


def check_available(cfg: ModelConfig) -> str:
    """The base's local folder or cached hub id; offline, a hub id must already be in the HF cache."""
    path = cfg.name_or_path
    if cfg.build_tiny:
        # The dev fixture loads only when a config asks for it: production never imports aigd.dev.
        from aigd.dev.tiny_model import ensure_tiny_model

        ensure_tiny_model(path)
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(path).exists() and not _cached(path, cfg.revision):
        raise BackendUnavailable(
            f"model {path!r} (revision {cfg.revision or 'main'}) is neither a local folder nor in the Hugging Face "
            f"cache and HF_HUB_OFFLINE=1: download it first (huggingface-cli download {path} --local-dir DIR) and "
            f"set model.name_or_path=DIR, on storage every node mounts")
    return path


def _cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_files_only=True)
        return True
    except Exception:
        return False


def attn_implementation(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"


def autocast(model_cfg: ModelConfig, device: torch.device, backend: str):
    """bf16/fp16 autocast for the hf backend on CUDA: its 16-bit weights compute in half precision,
    LoRA and the loss stay fp32. Unsloth manages precision itself; CPU runs fp32."""
    dtype = resolve_dtype(model_cfg, device)
    if backend == "hf" and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def precision(model_cfg: ModelConfig, device: torch.device, backend: str) -> str:
    dtype = str(resolve_dtype(model_cfg, device)).removeprefix("torch.")
    if backend == "hf" and device.type == "cuda" and dtype in ("bfloat16", "float16"):
        return f"{dtype} autocast"
    return f"{dtype} ({backend})"


def _quantization(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    if not cfg.load_in_4bit or device.type != "cuda":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendUnavailable("model.load_in_4bit needs bitsandbytes: pip install -e '.[gpu]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head"])


def load_base(cfg: ModelConfig, device: torch.device, training: bool):
    """(model, processor, backend) with no adapters; the base weights frozen."""
    backend = import_backend_first(cfg)
    path = check_available(cfg)
    dtype = resolve_dtype(cfg, device)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, revision=cfg.revision)
    attn = attn_implementation(cfg, device)
    if backend == "unsloth":
        from unsloth import FastVisionModel

        # A dict device map: Unsloth's own string map uses the global rank, wrong on multi-node runs.
        model, _ = FastVisionModel.from_pretrained(
            path, revision=cfg.revision, load_in_4bit=cfg.load_in_4bit, dtype=dtype, attn_implementation=attn,
            use_gradient_checkpointing="unsloth" if (training and cfg.gradient_checkpointing) else False,
            device_map={"": device.index or 0})
    else:
        from transformers import AutoModelForImageTextToText

        quant = _quantization(cfg, device, dtype)
        model = AutoModelForImageTextToText.from_pretrained(
            path, revision=cfg.revision, dtype=dtype, quantization_config=quant, attn_implementation=attn,
            device_map={"": device} if quant is not None else None)
        if quant is None:
            model.to(device)
        # Not peft's prepare_model_for_kbit_training: it upcasts every 16-bit weight (embeddings,
        # lm_head) to fp32, and activations would then flow in fp32. Autocast runs them in bf16.
        if training and cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, processor, backend


def base_info(model, cfg: ModelConfig, backend: str) -> dict:
    """What was really loaded, for the manifest and for `manifest.check_compatible`."""
    quant = getattr(model.config, "quantization_config", None)
    if quant is not None:
        q = quant if isinstance(quant, dict) else quant.to_dict()
        quant = {k: str(q[k]) if k == "bnb_4bit_compute_dtype" else q[k] for k in (
            "quant_method", "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype", "llm_int8_skip_modules") if k in q}
    return {"name_or_path": cfg.name_or_path, "revision": cfg.revision,
            "checkpoint": getattr(model.config, "_name_or_path", None) or cfg.name_or_path,
            "backend": backend, "dtype": str(model.dtype).removeprefix("torch."), "quantization": quant,
            "fingerprint": base_fingerprint(model.config), "layout": weights_layout(model)}


def add_lora(model, lora: LoraConfig, backend: str):
    target = lora_target_regex(lora)
    if backend == "unsloth":
        from unsloth import FastVisionModel

        return FastVisionModel.get_peft_model(
            model, target_modules=target, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            bias="none", random_state=lora.seed, use_gradient_checkpointing="unsloth")
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    torch.manual_seed(lora.seed)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                              target_modules=target)
    return get_peft_model(model, peft_cfg)


def load_for_training(cfg: ModelConfig, lora: LoraConfig, device: torch.device):
    """(model with LoRA, processor, base_info of the base it sits on)."""
    model, processor, backend = load_base(cfg, device, training=True)
    base = base_info(model, cfg, backend)
    return add_lora(model, lora, backend), processor, base
