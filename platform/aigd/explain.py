"""Where the evidence is: a map over the model's image grid of how much each region drives the
Fake-minus-Real logit margin at the answer position.

The grid is Qwen2.5-VL's merged tokens (28 x 28 px of the model's view, `image_grid_thw` / 2).
Attributions come from Captum over the normalised patches that enter the vision tower:

- occlusion (`FeatureAblation`): regions of tokens replaced by the baseline image (`baseline`:
  blurred, or the mean colour), `chunk` occluded copies per forward pass. Model-agnostic; the reference.
- input_x_gradient / integrated_gradients: gradient x (input - baseline), or its integral from the
  baseline image, summed over each token's pixels: first-order and path versions of the question
  occlusion asks, from the same baseline.

Every forward pass runs through `Scorer.using`, the scoring path's own lock, adapter selection and
version check, one pass at a time: /v1/detect batches interleave between passes, and no pass starts
past the deadline or after its request was cancelled (`Budget`). The gradient methods' backward
passes run after the lock is released, on the graph their forward recorded.
The unaltered image is scored by `Scorer.batch_logits` (what `member_logits` runs), so the answer
beside the map is the one /v1/detect gives for the same image, from the same version.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from aigd.batching import model_batch, normalize_pixels
from aigd.config import EnsembleConfig, ExplainConfig
from aigd.decision import ENSEMBLE, ensemble_answer, p_fake
from aigd.errors import AdapterUnavailable, BadRequest, DeadlineExceeded, MemberFailed
from aigd.forward import answer_logits, pair_logits
from aigd.image_view import PATCH

MERGE = 2  # Qwen2.5-VL merges 2 x 2 patches of 14 px into one token


@dataclass(frozen=True)
class Attribution:
    scores: np.ndarray  # (H, W) per token: logits of Fake-minus-Real margin the region accounts for
    member: object  # the aigd.scorer.Member (version) explained
    logits: np.ndarray  # (2,) [Real, Fake] of the unaltered image
    method: str

    def answer(self, scorer) -> dict:
        """The member's answer for the unaltered image (`Scorer.answer`, as /v1/detect gives it)."""
        return scorer.answer(self.member, float(p_fake(self.logits[None], self.member.temperature)[0]))


def token_shape(image: np.ndarray) -> tuple[int, int]:
    return image.shape[0] // PATCH, image.shape[1] // PATCH


def region_ids(shape: tuple[int, int], max_per_side: int) -> np.ndarray:
    """(H, W) region index of each token: square blocks, at most max_per_side along each side."""
    side = math.ceil(max(shape) / max_per_side)
    rows, cols = np.indices(shape) // side
    return rows * math.ceil(shape[1] / side) + cols


def baseline_image(image: np.ndarray, cfg: ExplainConfig) -> np.ndarray:
    """What a region looks like with its evidence removed, in the model's view: the image's mean
    colour, or the image under a Gaussian blur (scene kept, fine texture gone; a generator's traces
    are mostly fine texture). Occlusion fills regions with it, the gradient methods start from it,
    and the evaluation's deletion curves fill with it too."""
    if cfg.baseline == "mean":
        return np.broadcast_to(image.reshape(-1, 3).mean(axis=0).round().astype(np.uint8), image.shape).copy()
    from PIL import ImageFilter

    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(cfg.blur_sigma)))


@dataclass
class Budget:
    """When an explanation must stop: past a monotonic deadline, or once `stop` is set (its request
    was cancelled). Checked before every pass, and again once the pass holds the scoring lock."""

    deadline: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def check(self, passes: int) -> None:
        if self.stop.is_set():
            raise DeadlineExceeded(f"explanation cancelled after {passes} passes")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"explanation stopped at its deadline after {passes} passes; retry later or ask "
                                   "for a cheaper method")


class Margin:
    """Captum's forward function: (k, patches, 1176) copies of one image, as deviations from its
    baseline image (so every method's baseline, 0, is that image) -> (k,) margins."""

    def __init__(self, scorer, member, batch: dict, offset: torch.Tensor, budget: Budget | None = None):
        self.scorer, self.member, self.offset, self.budget = scorer, member, offset, budget or Budget()
        self.batch = {k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_affine")}
        self.passes = 0

    def __call__(self, deviation: torch.Tensor) -> torch.Tensor:
        x = deviation + self.offset
        self.budget.check(self.passes)
        k = x.shape[0]
        inputs = {name: v.repeat(k, *[1] * (v.dim() - 1)) for name, v in self.batch.items()}
        inputs["pixel_values"] = x.reshape(-1, x.shape[-1])
        with self.scorer.using(self.member) as model:
            self.budget.check(self.passes)  # it may have waited for the lock behind detect batches
            z = pair_logits(answer_logits(model, inputs), self.scorer.label_ids)
        self.passes += 1
        return z[:, 1] - z[:, 0]


def _per_token(values: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """(1, patches, d) attributions -> (H, W): summed over each token's pixels and its 2 x 2 patches
    (the processor lays each token's patches out consecutively)."""
    per_patch = values[0].sum(dim=-1).detach().float().cpu().numpy()
    return per_patch.reshape(-1, MERGE * MERGE).sum(axis=1).reshape(shape)


def attribute(scorer, image: np.ndarray, adapter: str, method: str, cfg: ExplainConfig,
              budget: Budget | None = None) -> Attribution:
    """The unaltered image's logits and one adapter's token map, both from the version serving now."""
    from captum.attr import FeatureAblation, InputXGradient, IntegratedGradients

    batch = model_batch(scorer.processor, [image], scorer.policy)
    logits, member = scorer.batch_logits(batch, adapter)
    device = scorer.device
    x = normalize_pixels(batch["pixel_values"], batch["pixel_affine"]).to(device)[None]
    base = model_batch(scorer.processor, [baseline_image(image, cfg)], scorer.policy)
    offset = normalize_pixels(base["pixel_values"], base["pixel_affine"]).to(device)[None]
    x = x - offset
    shape = tuple(int(v) // MERGE for v in batch["image_grid_thw"][0, 1:])  # the grid the processor made
    margin = Margin(scorer, member, batch, offset, budget)
    if method == "occlusion":
        regions = torch.from_numpy(region_ids(shape, cfg.occlusion_regions)).reshape(-1)
        mask = regions.repeat_interleave(MERGE * MERGE).reshape(1, -1, 1).to(device)
        with torch.no_grad():
            values = FeatureAblation(margin).attribute(x, baselines=0.0, feature_mask=mask,
                                                       perturbations_per_eval=cfg.chunk)
        # every pixel of a region holds the region's effect: one value per patch, then per token
        scores = values[0, :, 0].reshape(-1, MERGE * MERGE)[:, 0].detach().float().cpu().numpy().reshape(shape)
    elif method == "input_x_gradient":
        scores = _per_token(InputXGradient(margin).attribute(x.requires_grad_()), shape)
    elif method == "integrated_gradients":
        scores = _per_token(IntegratedGradients(margin).attribute(
            x, baselines=torch.zeros_like(x), n_steps=cfg.ig_steps, internal_batch_size=cfg.chunk), shape)
    else:
        raise BadRequest(f"unknown explanation method {method!r}; known: occlusion, input_x_gradient, "
                         "integrated_gradients")
    return Attribution(scores, member, logits[0], method)


def normalized(scores: np.ndarray) -> np.ndarray:
    """Evidence for fake in [0, 1]: positive attributions over the largest (all 0 when none is
    positive). How strong the peak is, in logits, is the answer's `peak_logit`."""
    positive = np.clip(scores.astype(np.float64), 0, None)
    return positive / positive.max() if positive.max() > 0 else positive


def region_boxes(grid: np.ndarray, threshold: float, max_boxes: int) -> list[dict]:
    """Connected areas of the map at or above `threshold`, strongest first; x, y, w, h are fractions
    of the image's width and height, so they hold for the image as sent at any size."""
    from skimage.measure import label, regionprops

    h, w = grid.shape
    boxes = [{"x": c0 / w, "y": r0 / h, "w": (c1 - c0) / w, "h": (r1 - r0) / h,
              "score": round(float(r.intensity_max), 4), "area": round(float(r.area) / (h * w), 4)}
             for r in regionprops(label(grid >= threshold, connectivity=2), intensity_image=grid)
             for r0, c0, r1, c1 in [r.bbox]]
    return sorted(boxes, key=lambda b: -b["score"])[:max_boxes]


def overlay_png(image: np.ndarray, grid: np.ndarray, boxes: list[dict], min_side: int = 384) -> bytes:
    """The model's view in grey under the map (inferno: dark = none, yellow = the peak) with the
    region boxes outlined, enlarged (nearest) to at least `min_side`: colour never hides in the photo's own."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    h, w = image.shape[:2]
    heat = np.asarray(Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR),
                      np.float32) / 255
    grey = np.asarray(Image.fromarray(image).convert("L"), np.float32)[..., None]
    colour = colormaps["inferno"](heat)[..., :3] * 255
    out = Image.fromarray((0.45 * grey + 0.55 * colour).astype(np.uint8))
    scale = max(1, math.ceil(min_side / max(h, w)))
    out = out.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(out)
    for b in boxes:
        x0, y0 = b["x"] * out.width, b["y"] * out.height
        draw.rectangle([x0, y0, x0 + b["w"] * out.width - 1, y0 + b["h"] * out.height - 1], outline=(0, 255, 255),
                       width=max(2, scale))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def explain(scorer, image: np.ndarray, adapter: str, members: list[str], ensemble: EnsembleConfig,
            cfg: ExplainConfig, method: str | None = None, budget: Budget | None = None) -> dict:
    """The answer /v1/detect (or, for `ensemble`, /v1/ensemble over `members`, under the same
    on_member_failure policy) gives, plus `explanation`: the map of one adapter, or the ensemble's
    weighted mean of its members' maps."""
    method = method or cfg.method
    each, failed = {}, {}
    for name in members if adapter == ENSEMBLE else [adapter]:
        try:
            each[name] = attribute(scorer, image, name, method, cfg, budget)
        except AdapterUnavailable as e:  # not loaded, or switched out mid-explanation
            if adapter != ENSEMBLE:
                raise
            failed[name] = str(e)
    if failed and (ensemble.on_member_failure == "fail" or not each):
        raise MemberFailed("ensemble member(s) failed: " + "; ".join(f"{n}: {r}" for n, r in failed.items()))
    answers = {n: a.answer(scorer) for n, a in each.items()}
    if adapter == ENSEMBLE:
        answer = ensemble_answer(answers, failed, ensemble)
        weights = answer["weights"]
    else:
        answer, weights = answers[adapter], {adapter: 1.0}
    grid = normalized(sum(weights[n] * normalized(a.scores) for n, a in each.items()))  # peaks at 1 too
    boxes = region_boxes(grid, cfg.region_threshold, cfg.max_boxes)
    return {**answer, "explanation": {
        "method": method,
        "grid": np.round(grid.astype(np.float64), 4).tolist(),
        "grid_shape": list(grid.shape),
        "region_boxes": boxes,
        "peak_logit": {n: round(float(max(a.scores.max(), 0.0)), 5) for n, a in each.items()},
        "overlay_png_base64": base64.b64encode(overlay_png(image, grid, boxes)).decode(),
    }}
