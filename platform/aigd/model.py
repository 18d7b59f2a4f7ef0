"""One loader for every environment: Unsloth 4-bit on CUDA, transformers + peft elsewhere.

`backend: auto` picks Unsloth only where CUDA and the unsloth package are both present. Unsloth
is imported inside these functions, never at module import, because importing it patches
transformers globally (and on CPU it refuses vision models outright).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from aigd.config import LoraConfig, ModelConfig
from aigd.errors import BackendUnavailable

VISION_BLOCKS = r"(?:.*\.)?visual\.blocks\.\d+\."
LANGUAGE_LAYERS = r"(?:.*\.)?language_model\.layers\.\d+\."


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
    if lora.language:
        names = (["self_attn\\.[qkvo]_proj"] if lora.attention else []) + (
            ["mlp\\.gate_proj", "mlp\\.up_proj", "mlp\\.down_proj"] if lora.mlp else [])
        if names:
            parts.append(LANGUAGE_LAYERS + "(?:" + "|".join(names) + ")")
    if not parts:
        raise ValueError("LoRA config selects no modules")
    return "|".join(f"(?:{p})" for p in parts)


def _check_local(cfg: ModelConfig) -> str:
    path = cfg.name_or_path
    if cfg.build_tiny:
        from aigd.tiny_model import ensure_tiny_model

        ensure_tiny_model(path)
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(path).exists():
        raise BackendUnavailable(
            f"model {path!r} is not a local folder and HF_HUB_OFFLINE=1: download it first "
            f"(huggingface-cli download {path} --local-dir DIR) and set model.name_or_path=DIR")
    return path


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
    path = _check_local(cfg)
    backend = resolve_backend(cfg)
    dtype = resolve_dtype(cfg, device)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, revision=cfg.revision)
    if backend == "unsloth":
        from unsloth import FastVisionModel  # noqa: import here on purpose (global patching)

        # Unsloth's own device map uses the global rank; pin to this worker's local device.
        model, _ = FastVisionModel.from_pretrained(
            path, revision=cfg.revision, load_in_4bit=cfg.load_in_4bit, dtype=dtype,
            use_gradient_checkpointing="unsloth" if (training and cfg.gradient_checkpointing) else False,
            device_map={"": device.index or 0})
    else:
        from transformers import AutoModelForImageTextToText

        quant = _quantization(cfg, device, dtype)
        model = AutoModelForImageTextToText.from_pretrained(
            path, revision=cfg.revision, dtype=dtype, quantization_config=quant,
            device_map={"": device} if quant is not None else None)
        if quant is None:
            model.to(device)
        if training and quant is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        elif training and cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, processor, backend


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
    model, processor, backend = load_base(cfg, device, training=True)
    return add_lora(model, lora, backend), processor, backend
