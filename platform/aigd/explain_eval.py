"""Are the maps right? Two measurements for jobs/evaluate.py (`explain.enabled=true`):

- faithfulness, on a fixed subset of the split's fakes: deletion curves. The most-attributed tokens
  (top-k %) of the model's view are replaced by the baseline image (`explain.baseline`: blurred or
  the mean colour) and the image scored again, beside the same share of random tokens. A faithful
  map lowers P(fake) faster than chance; the figures are mean P(fake) per share, the drops at 20 %,
  their ratio and the area between the curves.
- localization, on tampered rows (SID_Set label 2: a real photo with a generated region pasted in,
  and its mask; never trained on): pixel ROC-AUC of the map against the mask (per image, and over
  all pixels pooled), IoU of the map at `iou_threshold`, and the image-level verdicts.

Both run in one process with one Scorer (a Ray task in the job), so the deletion scores go through
the same scoring path as the API's answers.
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from aigd.config import DecodeLimits, EvalConfig
from aigd.errors import AigdError
from aigd.explain import attribute, baseline_image, normalized
from aigd.image_view import PATCH
from aigd.metrics import roc_auc

SCORE_BATCH = 16


def filled(image: np.ndarray, baseline: np.ndarray, tokens: np.ndarray, width: int) -> np.ndarray:
    """The image with the given tokens (flat indices over the token grid) taken from the baseline image."""
    out = image.copy()
    for t in tokens:
        r, c = divmod(int(t), width)
        out[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = baseline[r * PATCH:(r + 1) * PATCH,
                                                                           c * PATCH:(c + 1) * PATCH]
    return out


def deletion(scorer, image: np.ndarray, baseline: np.ndarray, adapter: str, scores: np.ndarray,
             fractions: list[float], draws: int, rng: np.random.Generator) -> tuple[list[float], list[float]]:
    """P(fake) as each share of tokens is taken from the baseline image: most-attributed first, and
    at random (mean of draws)."""
    n, width = scores.size, scores.shape[1]
    order = np.argsort(-scores.ravel(), kind="stable")
    copies = []
    for f in fractions:
        k = int(round(f * n))
        copies.append(filled(image, baseline, order[:k], width))
        copies += [filled(image, baseline, rng.permutation(n)[:k], width) for _ in range(draws)]
    p = np.concatenate([scorer.p_fake(copies[i:i + SCORE_BATCH], adapter) for i in range(0, len(copies), SCORE_BATCH)])
    p = p.reshape(len(fractions), 1 + draws)
    return p[:, 0].tolist(), p[:, 1:].mean(axis=1).tolist()


def mask_view(mask: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A stored mask at the model view's size (h, w), as booleans."""
    img = Image.open(io.BytesIO(mask)).convert("L").resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(img) > 127


def per_pixel(tokens: np.ndarray) -> np.ndarray:
    """A token grid at the model view's pixels: each token's value over its 28 x 28 px."""
    return np.kron(tokens, np.ones((PATCH, PATCH), tokens.dtype))


def localization(scores: np.ndarray, mask: np.ndarray, threshold: float) -> dict:
    """Pixel ROC-AUC of the token map against the mask, and IoU of the map at `threshold` of its peak."""
    predicted = per_pixel(normalized(scores) >= threshold)
    union = (predicted | mask).sum()
    return {"pixel_auc": roc_auc(mask.ravel().astype(int), per_pixel(scores).ravel()),
            "iou": float((predicted & mask).sum() / union) if union else float("nan")}


def _prepared(scorer, rows: list[tuple], limits: DecodeLimits) -> tuple[list, int]:
    out, unreadable = [], 0
    for row in rows:
        try:
            out.append((row[0], scorer.prepare(row[1], limits), *row[2:]))
        except AigdError:
            unreadable += 1
    return out, unreadable


def _mean(values) -> float:
    values = [v for v in values if v == v]  # nan: an image whose mask covers all or none of it
    return float(np.mean(values)) if values else float("nan")


def faithfulness(scorer, fakes: list, adapter: str, method: str, cfg: EvalConfig) -> dict:
    ex = cfg.explain
    rng = np.random.default_rng(0)
    top, rand, seconds = [], [], []
    for _, image in fakes:
        t0 = time.perf_counter()
        a = attribute(scorer, image, adapter, method, ex)
        seconds.append(time.perf_counter() - t0)
        t, r = deletion(scorer, image, baseline_image(image, ex), adapter, a.scores, list(ex.fractions),
                        ex.random_draws, rng)
        top.append(t)
        rand.append(r)
    top_m, rand_m = np.mean(top, axis=0), np.mean(rand, axis=0)
    fr = np.asarray(ex.fractions)
    at = int(np.argmin(np.abs(fr - 0.2) + (fr == 0)))  # the share nearest 20 %
    base = top_m[list(fr).index(0.0)]
    drop_top, drop_rand = base - top_m[at], base - rand_m[at]
    order = np.argsort(fr)
    return {"n": len(fakes), "fractions": fr.tolist(), "p_fake_top": top_m.round(4).tolist(),
            "p_fake_random": rand_m.round(4).tolist(), "at": float(fr[at]),
            "drop_top": float(drop_top), "drop_random": float(drop_rand),
            # None when random filling does not lower P(fake) at all (then any real drop is "more than 2x")
            "drop_ratio": float(drop_top / drop_rand) if drop_rand > 1e-9 else None,
            "meets_2x": bool(drop_top > 0 and drop_top >= 2 * max(drop_rand, 0.0)),
            "area_between": float(np.trapezoid((rand_m - top_m)[order], fr[order])),
            "seconds_per_map": float(np.mean(seconds))}


def tampered_figures(scorer, tampered: list, adapter: str, method: str, cfg: EvalConfig) -> tuple[dict, list]:
    """Localization figures, and per row (img_id, image, map, mask, answer) for the report's pictures."""
    per, pooled_s, pooled_m, shown = [], [], [], []
    for img_id, image, mask_bytes in tampered:
        a = attribute(scorer, image, adapter, method, cfg.explain)
        mask = mask_view(mask_bytes, image.shape[:2])
        per.append(localization(a.scores, mask, cfg.explain.iou_threshold))
        pooled_s.append(per_pixel(a.scores / max(float(np.abs(a.scores).max()), 1e-12)).ravel())
        pooled_m.append(mask.ravel())
        shown.append((img_id, image, normalized(a.scores), mask, a.answer(scorer)))
    figures = {"n": len(per), "pixel_auc_mean": _mean(x["pixel_auc"] for x in per),
               "pixel_auc_pooled": roc_auc(np.concatenate(pooled_m).astype(int), np.concatenate(pooled_s))
               if per else float("nan"),
               "iou_mean": _mean(x["iou"] for x in per)}
    return figures, shown


def verdicts(shown: list) -> dict:
    labels = [s[4]["label"] for s in shown]
    return {"n": len(labels), **{k: labels.count(k) for k in ("fake", "uncertain", "real")},
            "mean_p_fake": _mean(s[4]["p_fake"] for s in shown)}


def evaluate(cfg: EvalConfig, fakes: list[tuple], tampered: list[tuple]) -> dict:
    """Every adapter x method: faithfulness on `fakes` [(img_id, bytes)], localization on `tampered`
    [(img_id, bytes, mask bytes)]; plus pictures of the first method's maps on tampered rows."""
    from aigd.scorer import Scorer

    scorer = Scorer(cfg)
    limits = DecodeLimits.preset("batch")
    fakes, bad_fakes = _prepared(scorer, fakes, limits)
    tampered, bad_tampered = _prepared(scorer, tampered, limits)
    out = {"methods": {}, "tampered_verdicts": {}, "unreadable": bad_fakes + bad_tampered, "pictures": []}
    for adapter in cfg.adapters:
        t0 = time.perf_counter()
        for _ in range(3):
            scorer.p_fake([fakes[0][1]], adapter)
        detect_s = (time.perf_counter() - t0) / 3
        for method in cfg.explain.methods:
            f = faithfulness(scorer, fakes, adapter, method, cfg)
            f["cost_vs_detect"] = f["seconds_per_map"] / detect_s
            loc, shown = tampered_figures(scorer, tampered, adapter, method, cfg) if tampered else ({"n": 0}, [])
            out["methods"].setdefault(adapter, {})[method] = {"faithfulness": f, "localization": loc}
            if method == cfg.explain.methods[0]:
                out["tampered_verdicts"][adapter] = verdicts(shown)
                out["pictures"] += [(adapter, method, *s) for s in shown[:cfg.explain.overlays]]
    return out
