"""The one prompt and the one image policy, imported by training, evaluation and serving alike.

The seed put the question before the image in training and after it at inference, and trained at
512 px while serving at ~1024 px. Both mismatches are impossible here: there is one builder.
The answer is a single token, so the model input is the same in training and serving and the
decision is read at the last prompt position (left padding keeps it at index -1).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from aigd.config import DecodeLimits, ImagePolicy
from aigd.images import decode

LABEL_WORDS = ("Real", "Fake")  # class 0, class 1
PATCH = 28  # Qwen2.5-VL: 14-px patches merged 2x2


def messages(policy: ImagePolicy) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": policy.prompt}]}]


def prompt_text(processor, policy: ImagePolicy) -> str:
    return processor.apply_chat_template(messages(policy), add_generation_prompt=True, tokenize=False)


def label_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of "Real" and "Fake"; each must be one token or scoring is meaningless."""
    ids = []
    for word in LABEL_WORDS:
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"{word!r} is not a single token in this tokenizer: {enc}")
        ids.append(enc[0])
    return ids[0], ids[1]


def target_size(width: int, height: int, policy: ImagePolicy) -> tuple[int, int]:
    """(w, h): aspect kept, sides multiples of 28, area within [min_pixels, max_pixels]."""
    w = max(PATCH, round(width / PATCH) * PATCH)
    h = max(PATCH, round(height / PATCH) * PATCH)
    if w * h > policy.max_pixels:
        beta = math.sqrt(width * height / policy.max_pixels)
        w = max(PATCH, math.floor(width / beta / PATCH) * PATCH)
        h = max(PATCH, math.floor(height / beta / PATCH) * PATCH)
    elif w * h < policy.min_pixels:
        beta = math.sqrt(policy.min_pixels / (width * height))
        w = math.ceil(width * beta / PATCH) * PATCH
        h = math.ceil(height * beta / PATCH) * PATCH
    return w, h


def prepare_image(img: Image.Image, policy: ImagePolicy) -> np.ndarray:
    """The model's view of an image: (h, w, 3) uint8 RGB at the policy's size. Everything that
    scores or trains goes through this; the array crosses process boundaries as it is."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    size = target_size(img.width, img.height, policy)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img)


def check_prepared(pixels: np.ndarray, policy: ImagePolicy) -> None:
    h, w = pixels.shape[:2]
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or target_size(w, h, policy) != (w, h):
        raise ValueError(f"expected a prepared (h, w, 3) uint8 image on the policy's grid, got {pixels.dtype} "
                         f"{pixels.shape}")


def prepare(data: bytes, limits: DecodeLimits, policy: ImagePolicy) -> np.ndarray:
    """Bytes -> the model's view of the image (decoded, upright, RGB, at the policy's size): the one
    image path of every scorer and of un-augmented training; the HTTP router runs it before handing
    the array to the model. The decode is sized to the policy, so memory follows the model's input."""
    return prepare_image(decode(data, limits, model_size=lambda w, h: target_size(w, h, policy)), policy)
