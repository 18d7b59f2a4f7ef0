"""The one prompt and the one image policy, imported by training, evaluation and serving alike.

The seed put the question before the image in training and after it at inference, and trained at
512 px while serving at ~1024 px. Both mismatches are impossible here: there is one builder.
The answer is a single token, so the model input is the same in training and serving and the
decision is read at the last prompt position (left padding keeps it at index -1).
"""

from __future__ import annotations

import math
from functools import lru_cache

from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn

from aigd.config import ImagePolicy

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


def prepare_image(img: Image.Image, policy: ImagePolicy) -> Image.Image:
    """RGB image at the policy's size; a no-op for images already on the 28-px grid within budget."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    size = target_size(img.width, img.height, policy)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    return img


@lru_cache(maxsize=8)
def _cached_prompt(processor, policy: ImagePolicy) -> str:
    return prompt_text(processor, policy)


def encode(processor, images: list[Image.Image], policy: ImagePolicy) -> dict:
    """Processor outputs for prepared images, one prompt each (unpadded lists per row).

    Returns a dict of per-row numpy arrays: input_ids, mm_token_type_ids, pixel_values (patches x
    1176, uint8), image_grid_thw (3,). Rows are padded later by `collate` so this can run in Ray Data.
    Patches stay 8-bit until the forward pass (`normalize_pixels`): a quarter of the float32 bytes
    through Ray's object store, the network and host-to-GPU copies, and the result equals the
    processor's own float output to 1e-6.
    """
    import numpy as np

    text = _cached_prompt(processor, policy)
    prepared = [prepare_image(im, policy) for im in images]
    enc = processor(text=[text] * len(prepared), images=prepared, return_tensors="np", padding=False,
                    do_rescale=False, do_normalize=False)
    grid = np.asarray(enc["image_grid_thw"])
    counts = grid.prod(axis=1)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    pixels = np.asarray(enc["pixel_values"])
    if pixels.dtype != np.uint8:
        raise ValueError(f"processor returned {pixels.dtype} patches with rescale/normalize off; expected uint8")
    return {
        "input_ids": [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]],
        "mm_token_type_ids": [np.asarray(x, dtype=np.int64) for x in enc["mm_token_type_ids"]],
        "pixel_values": [pixels[bounds[i]:bounds[i + 1]] for i in range(len(prepared))],
        "image_grid_thw": [grid[i].astype(np.int64) for i in range(len(prepared))],
    }


def pixel_affine(processor):
    """(2, 3) float32 [scale / std; -mean / std] per channel: the image processor's rescale + normalise."""
    import numpy as np

    ip = processor.image_processor
    std = np.asarray(ip.image_std, dtype=np.float64)
    return np.stack([ip.rescale_factor / std, -np.asarray(ip.image_mean, dtype=np.float64) / std]).astype(np.float32)


def normalize_pixels(patches, affine):
    """uint8 (n, 3 * t * p * p) channel-major patches -> float32, on whatever device they are on.

    Runs next to the model (on the GPU in training), so the data path moves 8-bit patches only.
    """
    import torch

    x = patches.to(torch.float32).reshape(patches.shape[0], 3, -1)
    affine = affine.to(device=x.device, dtype=torch.float32)
    return torch.addcmul(affine[1][None, :, None], x, affine[0][None, :, None]).reshape(patches.shape[0], -1)


class Collate(NumpyBatchCollateFn):
    """Picklable collate for Ray Data's iter_torch_batches: pads only, no decoding or float maths."""

    def __init__(self, pad_id: int, affine):
        super().__init__()
        self.pad_id = pad_id
        self.affine = affine

    @classmethod
    def of(cls, processor) -> "Collate":
        return cls(processor.tokenizer.pad_token_id, pixel_affine(processor))

    def __call__(self, rows: dict) -> dict:
        return collate(rows, self.pad_id, self.affine)


def collate(rows: dict, pad_id: int, affine) -> dict:
    """Left-pad per-row arrays into model tensors; the answer position is then index -1.

    pixel_values stay uint8; `pixel_affine` travels with them and the forward pass normalises.
    """
    import numpy as np
    import torch

    ids = list(rows["input_ids"])
    n = max(len(x) for x in ids)
    input_ids = np.full((len(ids), n), pad_id, dtype=np.int64)
    attention = np.zeros((len(ids), n), dtype=np.int64)
    mm = np.zeros((len(ids), n), dtype=np.int64)
    for i, (x, t) in enumerate(zip(ids, rows["mm_token_type_ids"])):
        input_ids[i, n - len(x):] = x
        attention[i, n - len(x):] = 1
        mm[i, n - len(x):] = t
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "mm_token_type_ids": torch.from_numpy(mm),
        "pixel_values": torch.from_numpy(np.concatenate([np.asarray(p, np.uint8) for p in rows["pixel_values"]])),
        "pixel_affine": torch.from_numpy(np.asarray(affine, np.float32)),
        "image_grid_thw": torch.from_numpy(np.stack([np.asarray(g, np.int64) for g in rows["image_grid_thw"]])),
    }
    if "label" in rows:
        batch["label"] = torch.tensor(np.asarray(rows["label"], dtype=np.int64))
    return batch


def model_batch(processor, images: list[Image.Image], policy: ImagePolicy) -> dict:
    """Images straight to model tensors: what serving and evaluation call, through the same steps."""
    return Collate.of(processor)(encode(processor, images, policy))
