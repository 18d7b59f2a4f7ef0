"""Prepared images to model tensors: processor encoding, left-padded collation, pixel normalisation.

Shared by training (inside Ray Data and the trainer's collate), evaluation and serving; it imports
neither Ray nor the model.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch

from aigd.config import ImagePolicy
from aigd.image_view import check_prepared
from aigd.prompt import prompt_text
from aigd.sampling import unit_hash


@lru_cache(maxsize=8)
def _cached_prompt(processor, policy: ImagePolicy) -> str:
    return prompt_text(processor, policy)


def encode(processor, images: list[np.ndarray], policy: ImagePolicy) -> dict:
    """Processor outputs for prepared images (`prompt.prepare_image`), one prompt each, unpadded.

    Returns a dict of per-row numpy arrays: input_ids, mm_token_type_ids, pixel_values (patches x
    1176, uint8), image_grid_thw (3,). Rows are padded later by `collate` so this can run in Ray Data.
    Patches stay 8-bit until the forward pass (`normalize_pixels`): a quarter of the float32 bytes
    through Ray's object store, the network and host-to-GPU copies, and the result equals the
    processor's own float output to 1e-6.
    """
    for pixels in images:
        check_prepared(pixels, policy)
    text = _cached_prompt(processor, policy)
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; the processor only reads
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        enc = processor(text=[text] * len(images), images=list(images), return_tensors="np", padding=False,
                        do_rescale=False, do_normalize=False)
    grid = np.asarray(enc["image_grid_thw"])
    bounds = np.concatenate([[0], np.cumsum(grid.prod(axis=1))])
    pixels = np.asarray(enc["pixel_values"])
    if pixels.dtype != np.uint8:
        raise ValueError(f"processor returned {pixels.dtype} patches with rescale/normalize off; expected uint8")
    return {
        "input_ids": [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]],
        "mm_token_type_ids": [np.asarray(x, dtype=np.int64) for x in enc["mm_token_type_ids"]],
        "pixel_values": [pixels[bounds[i]:bounds[i + 1]] for i in range(len(images))],
        "image_grid_thw": [grid[i].astype(np.int64) for i in range(len(images))],
    }


def pixel_affine(processor) -> np.ndarray:
    """(2, 3) float32 [scale / std; -mean / std] per channel: the image processor's rescale + normalise."""
    ip = processor.image_processor
    std = np.asarray(ip.image_std, dtype=np.float64)
    return np.stack([ip.rescale_factor / std, -np.asarray(ip.image_mean, dtype=np.float64) / std]).astype(np.float32)


def normalize_pixels(patches: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3 * t * p * p) channel-major patches -> float32, on whatever device they are on.

    Runs next to the model (on the GPU in training), so the data path moves 8-bit patches only.
    """
    x = patches.to(torch.float32).reshape(patches.shape[0], 3, -1)
    affine = affine.to(device=x.device, dtype=torch.float32)
    return torch.addcmul(affine[1][None, :, None], x, affine[0][None, :, None]).reshape(patches.shape[0], -1)


def collate(rows: dict, pad_id: int, affine: np.ndarray) -> dict:
    """Left-pad per-row arrays into model tensors; the answer position is then index -1.

    pixel_values stay uint8; `pixel_affine` travels with them and the forward pass normalises.
    """
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
    if "img_id" in rows:  # validation orders gathered scores by it, whichever rank scored a row
        batch["row_key"] = torch.from_numpy(unit_hash([str(i) for i in rows["img_id"]], "row-key"))
    return batch


def model_batch(processor, images: list[np.ndarray], policy: ImagePolicy) -> dict:
    """Prepared images straight to model tensors: what scoring calls, through the training steps."""
    return collate(encode(processor, images, policy), processor.tokenizer.pad_token_id, pixel_affine(processor))
