"""Build an offline tiny Qwen2.5-VL: the real architecture, processor and chat template, random weights.

CI machines and laptops cannot download the 7B checkpoint, so every code path (training, serving,
evaluation) runs end-to-end on this folder instead. It is deterministic for a given seed and needs
no network: the byte-level BPE tokenizer is trained here on a small corpus that makes "Real" and
"Fake" single tokens, as they are in Qwen's own vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from aigd.batching import model_batch
from aigd.config import ImagePolicy
from aigd.image_view import PATCH
from aigd.prompt import label_token_ids
from aigd.forward import answer_logits

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL-7B-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split pattern.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = [
    "system\nYou are a helpful assistant.",
    "user\nReal/Fake?",
    "assistant\nReal",
    "assistant\nFake",
    "Real Fake real fake Real/Fake? Is this image real or AI-generated?",
    "Picture 1: Video 1: The image is a photograph. The image was generated.",
]

TINY_DIMS = dict(
    text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_ffn=128,
    vision_hidden=64, vision_depth=2, vision_heads=4, vision_ffn=128,
)
# Qwen2.5-VL-7B's widths with 2 of its 28 text layers and 2 of its 32 vision blocks: the GPU check
# exercises real kernel shapes and 4-bit layouts without downloading 16 GB.
SEVEN_B_WIDTHS = dict(
    text_hidden=3584, text_layers=2, text_heads=28, text_kv_heads=4, text_ffn=18944,
    vision_hidden=1280, vision_depth=2, vision_heads=16, vision_ffn=3420,
    vocab=151936,  # Qwen's embedding rows (the tiny tokenizer uses the first few): honest memory
)


def _train_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 50, trainer=trainer)
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    return tok


def format_tune(model, processor, steps: int, seed: int) -> float:
    """Teach a random base the answer FORMAT and nothing else, as Qwen's instruct model already knows
    it: only lm_head trains, with full-vocabulary cross-entropy on random noise images with RANDOM
    Real/Fake labels. Afterwards nearly all probability at the answer sits on the two label tokens,
    split about evenly whatever the image, so Method 1's loss starts near ln 2 (not ln |vocab|) and
    the base knows nothing about which answer is right. Returns the last loss."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(label_token_ids(processor.tokenizer))
    policy = ImagePolicy(max_pixels=4 * PATCH * 4 * PATCH, min_pixels=2 * PATCH * 2 * PATCH)
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.lm_head.weight
    head.requires_grad_(True)
    opt = torch.optim.Adam([head], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    loss = torch.zeros(())
    for _ in range(steps):
        sides = rng.integers(2, 5, size=2) * PATCH
        images = [rng.integers(0, 256, (sides[1], sides[0], 3), dtype=np.uint8) for _ in range(16)]
        labels = torch.randint(0, 2, (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(answer_logits(model, model_batch(processor, images, policy)),
                                                 ids[labels])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    head.requires_grad_(False)
    return float(loss.detach())


def build_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 400, dims: dict = TINY_DIMS,
                     dtype: str = "float32", format_steps: int = 200) -> Path:
    """Write a complete Hugging Face folder (config, safetensors, tokenizer, processor);
    `format_steps` of `format_tune` first (0: purely random weights)."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=32768,
        padding_side="right",
    )
    for word in ("Real", "Fake"):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"tiny tokenizer splits {word!r} into {ids}")
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=512 * 512)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    d = dims
    half_head = d["text_hidden"] // d["text_heads"] // 2  # Qwen splits rotary dims 1/4 : 3/8 : 3/8 (t, h, w)
    mrope = [half_head // 4, half_head * 3 // 8, half_head - half_head // 4 - half_head * 3 // 8]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=max(len(tokenizer), d.get("vocab", 0)),
            hidden_size=d["text_hidden"],
            intermediate_size=d["text_ffn"],
            num_hidden_layers=d["text_layers"],
            num_attention_heads=d["text_heads"],
            num_key_value_heads=d["text_kv_heads"],
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=d["vision_depth"],
            hidden_size=d["vision_hidden"],
            intermediate_size=d["vision_ffn"],
            num_heads=d["vision_heads"],
            out_hidden_size=d["text_hidden"],
            fullatt_block_indexes=[d["vision_depth"] - 1],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    format_loss = format_tune(model, processor, format_steps, seed) if format_steps else None
    model = model.to(getattr(torch, dtype))
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "TINY_MODEL.json").write_text(json.dumps({
        "seed": seed, "dims": d, "format_steps": format_steps, "format_loss": format_loss,
        "note": "random weights; lm_head format-tuned on random labels (answers Real/Fake, knows neither)"}))
    return out


def ensure_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model at `path` unless a complete one is already there."""
    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "TINY_MODEL.json").exists():
        return path
    return build_tiny_model(path, seed=seed)
