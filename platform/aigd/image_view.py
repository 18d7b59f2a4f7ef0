"""The one image policy: bytes -> the model's view of an image, for training, evaluation and serving.

The seed trained at 512 px while serving at ~1024 px; here every path goes through `prepare`
(decode sized to the policy, upright, RGB, on Qwen2.5-VL's 28-px grid).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

from aigd.config import DecodeLimits, ImagePolicy
from aigd.images import decode

PATCH = 28  # Qwen2.5-VL: 14-px patches merged 2x2


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


Transform = Callable[[Image.Image], Image.Image]


def prepare(data: bytes, limits: DecodeLimits, policy: ImagePolicy, transform: Transform | None = None) -> np.ndarray:
    """Bytes -> the model's view of the image: decoded, upright, RGB, at the policy's size. The one
    image path of every scorer, of training and of evaluation.

    transform=None is the serving path: the decode is sized to the policy (a JPEG decodes at a
    reduced DCT scale), so memory follows the model's input. A transform (training augmentation, an
    evaluation perturbation) sees the upright image at full size and its output is then resized."""
    return views(data, limits, policy, {"": transform})[""]


def views(data: bytes, limits: DecodeLimits, policy: ImagePolicy,
          transforms: dict[str, Transform | None]) -> dict[str, np.ndarray]:
    """`prepare` under several transforms, decoding at most twice: at the policy's size for the
    untransformed view, in full once for every transformed one (transforms must not edit their input)."""
    out, full = {}, None
    for name, transform in transforms.items():
        if transform is None:
            out[name] = prepare_image(decode(data, limits, model_size=lambda w, h: target_size(w, h, policy)), policy)
            continue
        full = decode(data, limits) if full is None else full
        out[name] = prepare_image(transform(full), policy)
    return out
