"""Scoring is one forward pass: P(fake) = softmax over the two label-token logits at the answer position.

Not `generate()` (the seed decoded text, then read a softmax over the whole vocabulary).
"""

from __future__ import annotations

import torch

from aigd.prompt import normalize_pixels

MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def answer_logits(model, batch: dict) -> torch.Tensor:
    """Full-vocabulary logits (B, V) at the answer position of a left-padded batch."""
    device = next(p for p in model.parameters()).device
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    dtype = getattr(model, "dtype", torch.float32)
    pixels = inputs["pixel_values"]
    if pixels.dtype == torch.uint8:
        pixels = normalize_pixels(pixels, batch["pixel_affine"])
    inputs["pixel_values"] = pixels.to(dtype if dtype.is_floating_point else torch.float32)
    out = model(**inputs, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :].float()


def pair_logits(logits: torch.Tensor, label_ids: tuple[int, int]) -> torch.Tensor:
    """(B, 2) logits of [Real, Fake]."""
    return logits[:, list(label_ids)]


def p_fake(pair: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(pair.float() / temperature, dim=-1)[:, 1]


@torch.no_grad()
def score_batch(model, batch: dict, label_ids: tuple[int, int], temperature: float = 1.0) -> torch.Tensor:
    return p_fake(pair_logits(answer_logits(model, batch), label_ids), temperature)
