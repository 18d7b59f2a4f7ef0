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
# PyPI's torch 2.14.1 is a CUDA 13 build that xformers' wheel cannot load
GPU_INSTALL = ("install the gpu extra as deploy/Dockerfile does (torch from PyTorch's cu126 index first, then "
               "pip install -e '.[gpu]')")


def resolve_backend(cfg: ModelConfig) -> str:
    has_cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if cfg.backend == "auto":
        return "unsloth" if has_cuda and has_unsloth else "hf"
    if cfg.backend == "unsloth":
        if not has_cuda:
            raise BackendUnavailable("backend 'unsloth' needs a CUDA GPU (Unsloth refuses vision models on CPU); use model.backend=hf")
        if not has_unsloth:
            raise BackendUnavailable(f"backend 'unsloth' needs the unsloth package: {GPU_INSTALL}")
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
        # unsloth_zoo reads it once, at import (relative to the working directory by default): a folder
        # per rank, unless the cluster sets one, so two ranks on one node never write the same module.
        rank = os.environ.get("RANK", "0")
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION",
                              str(Path(tempfile.gettempdir()) / f"aigd-unsloth-cache-rank{rank}"))
        import unsloth  # noqa: F401  (the import is the point: it patches transformers)
    return backend


def check_available(cfg: ModelConfig, backend: str = "hf") -> str:
    """The repo or folder the backend's loader will read the weights from (`loaded_repo`). Offline,
    it and the processor's (cfg.name_or_path) must already be in the HF cache, or the error names
    what to download."""
    path = cfg.name_or_path
    if cfg.build_tiny:
        # The dev fixture loads only when a config asks for it: production never imports aigd.dev.
        from aigd.dev.tiny_model import ensure_tiny_model

        ensure_tiny_model(path)
        return path
    repo = loaded_repo(cfg, backend)
    for name in dict.fromkeys([repo, path]):
        if os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(name).exists() and not _cached(name, cfg.revision):
            raise BackendUnavailable(
                f"model {name!r} (revision {cfg.revision or 'main'}) is neither a local folder nor in the Hugging "
                f"Face cache and HF_HUB_OFFLINE=1: download it first (hf download {name}"
                f"{' --revision ' + cfg.revision if cfg.revision else ''}), or into a folder (--local-dir DIR) on "
                f"storage every node mounts and set model.name_or_path=DIR"
                + (f"; the unsloth backend loads {repo}, its 4-bit copy of {path}, and the processor from {path}"
                   if repo != path else ""))
    return repo


def loaded_repo(cfg: ModelConfig, backend: str) -> str:
    """The repo the backend's loader reads for cfg.name_or_path; refuses a revision it would drop."""
    path = cfg.name_or_path
    repo = unsloth_checkpoint(path, cfg.load_in_4bit, unsloth_tables()) if backend == "unsloth" else path
    if cfg.revision and repo != path:
        raise BackendUnavailable(
            f"model.revision={cfg.revision} cannot be honoured: Unsloth loads {repo} instead of {path} and drops the "
            f"revision. Download the snapshot you want into a folder (hf download {path} --revision "
            f"{cfg.revision} --local-dir DIR) and set model.name_or_path=DIR, or unset model.revision, or use "
            f"model.backend=hf")
    return repo


def unsloth_tables() -> dict:
    """Unsloth's name tables (unsloth/models/mapper.py), read as data: importing the unsloth package
    patches transformers, and mapper.py itself imports nothing."""
    spec = importlib.util.find_spec("unsloth")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(spec.submodule_search_locations[0]) / "models" / "mapper.py"
    mapper_spec = importlib.util.spec_from_file_location("aigd_unsloth_mapper", path)
    module = importlib.util.module_from_spec(mapper_spec)
    mapper_spec.loader.exec_module(module)
    return {k: getattr(module, k, {}) for k in ("INT_TO_FLOAT_MAPPER", "FLOAT_TO_INT_MAPPER", "MAP_TO_UNSLOTH_16bit")}


def unsloth_checkpoint(name: str, load_in_4bit: bool, tables: dict) -> str:
    """The repo FastVisionModel.from_pretrained loads for `name` (unsloth 2026.10
    loader_utils.__get_model_name, bitsandbytes branch): a 4-bit load of Qwen/Qwen2.5-VL-7B-Instruct
    reads unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit. A local folder is loaded as it is."""
    low = str(name).lower()
    if Path(name).exists():
        return name
    if not load_in_4bit:
        return tables.get("INT_TO_FLOAT_MAPPER", {}).get(low) or tables.get("MAP_TO_UNSLOTH_16bit", {}).get(low) or name
    if low.endswith("-bnb-4bit"):
        return name
    # Values keep their case since unsloth 2026.10 (a lower-cased id misses a case-sensitive HF cache)
    return tables.get("FLOAT_TO_INT_MAPPER", {}).get(low, name)


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


def autocast(model_cfg: ModelConfig, device: torch.device):
    """bf16/fp16 autocast on CUDA, on both backends: the 16-bit (or 4-bit) base computes in half
    precision while LoRA weights and the loss stay fp32. Unsloth's own trainers run under the same
    autocast (the HF Trainer's, through accelerate; its rewritten LoRA forwards step aside under it);
    this loop is not a Trainer, so it applies it itself. CPU runs fp32."""
    dtype = resolve_dtype(model_cfg, device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def needs_loss_scaling(model_cfg: ModelConfig, device: torch.device) -> bool:
    """fp16 autocast (GPUs without bf16: T4, V100) needs loss scaling, or small gradients underflow
    to zero; bf16 and fp32 need none."""
    return device.type == "cuda" and resolve_dtype(model_cfg, device) == torch.float16


def grad_scaler(model_cfg: ModelConfig, device: torch.device) -> torch.amp.GradScaler:
    """A pass-through unless `needs_loss_scaling`."""
    return torch.amp.GradScaler(device.type, enabled=needs_loss_scaling(model_cfg, device))


def precision(model_cfg: ModelConfig, device: torch.device) -> str:
    dtype = str(resolve_dtype(model_cfg, device)).removeprefix("torch.")
    if device.type == "cuda" and dtype in ("bfloat16", "float16"):
        return f"{dtype} autocast" + (" + loss scaling" if dtype == "float16" else "")
    return dtype


def _quantization(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    if not cfg.load_in_4bit or device.type != "cuda":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendUnavailable(f"model.load_in_4bit needs bitsandbytes: {GPU_INSTALL}")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head"])


def load_base(cfg: ModelConfig, device: torch.device, training: bool):
    """(model, processor, backend) with no adapters; the base weights frozen."""
    backend = import_backend_first(cfg)
    path = check_available(cfg, backend)
    dtype = resolve_dtype(cfg, device)
    from transformers import AutoProcessor

    # The processor of the configured name: Ray Data's preprocessing workers encode with the same one.
    processor = AutoProcessor.from_pretrained(cfg.name_or_path, revision=cfg.revision)
    attn = attn_implementation(cfg, device)
    if backend == "unsloth":
        from unsloth import FastVisionModel

        # use_exact_model_name: Unsloth reads the repo checked above (its own mapping, resolved here), with
        # the revision when it is the configured name. The device Ray Train gave this worker, as a dict map:
        # Unsloth then places nothing itself.
        model, _ = FastVisionModel.from_pretrained(
            path, revision=cfg.revision, load_in_4bit=cfg.load_in_4bit, dtype=dtype, attn_implementation=attn,
            use_gradient_checkpointing="unsloth" if (training and cfg.gradient_checkpointing) else False,
            device_map={"": device.index or 0}, use_exact_model_name=True)
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
            # the snapshot really read (None for a plain folder): two snapshots of one repo are two bases
            "commit": getattr(model.config, "_commit_hash", None),
            "backend": backend, "dtype": str(model.dtype).removeprefix("torch."), "quantization": quant,
            "fingerprint": base_fingerprint(model.config), "layout": weights_layout(model)}


def add_lora(model, lora: LoraConfig, backend: str, gradient_checkpointing: bool):
    target = lora_target_regex(lora)
    if backend == "unsloth":
        from unsloth import FastVisionModel

        return FastVisionModel.get_peft_model(
            model, target_modules=target, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            bias="none", random_state=lora.seed,
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False)
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    torch.manual_seed(lora.seed)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                              target_modules=target)
    return get_peft_model(model, peft_cfg)


def load_for_training(cfg: ModelConfig, lora: LoraConfig, device: torch.device):
    """(model with LoRA, processor, base_info of the base it sits on)."""
    model, processor, backend = load_base(cfg, device, training=True)
    base = base_info(model, cfg, backend)
    return add_lora(model, lora, backend, cfg.gradient_checkpointing), processor, base
