"""The forward pass: [Real, Fake] logits at the answer position, for training and scoring alike.

Not `generate()` (the seed decoded text, then read a softmax over the whole vocabulary): the answer
is one token, so P(fake) is the two-way softmax of these logits (`aigd.decision.p_fake`).
"""

from __future__ import annotations

import torch

from aigd.batching import normalize_pixels

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
