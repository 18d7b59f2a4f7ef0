"""Evaluation: perturbations, Ray Data batch scoring stages, metrics with bootstrap intervals.

The sweep re-scores the SAME images after each perturbation (JPEG re-compression, downscaling,
center crop) so a drop in AUC is the perturbation's effect, not a different sample. `equalized`
(square center crop + one JPEG format for every image) is the shortcut audit: a detector that
learned aspect ratio or file format instead of the generator loses its AUC there.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from aigd.config import PERTURBATION, DataConfig, DecodeLimits, EvalConfig, ImagePolicy, ProvenanceConfig, from_dict
from aigd.decision import ENSEMBLE, Rule, ensemble, p_fake
from aigd.errors import AigdError
from aigd.images import jpeg, sniff
from aigd.metrics import binary_metrics, bootstrap_cis, ece, fit_calibration
from aigd.image_view import views
from aigd.provenance import TABLE_COLUMNS, origin, table_columns
from aigd.scorer import Scorer
from aigd.sources import image_bytes, with_images

GROUP = "group_"  # metadata columns carried through scoring for EvalConfig.group_by


def perturbation(name: str):
    """The named perturbation as a transform of an upright RGB image (for `image_view.views`)."""
    return lambda img: perturb(img, name)


def perturb(img: Image.Image, name: str) -> Image.Image:
    """The named perturbation of an upright RGB image (names: `aigd.config.PERTURBATION`)."""
    m = PERTURBATION.fullmatch(name)
    if m is None:
        raise ValueError(f"unknown perturbation {name!r}")
    if name == "clean":
        return img
    if name == "equalized":
        side = min(img.size)
        x, y = (img.width - side) // 2, (img.height - side) // 2
        return jpeg(img.crop((x, y, x + side, y + side)), 95)
    if m["quality"]:
        return jpeg(img, int(m["quality"]))
    if m["scale"]:
        f = float(m["scale"])
        return img.resize((max(28, round(img.width * f)), max(28, round(img.height * f))), Image.Resampling.BICUBIC)
    f = float(m["crop"])
    w, h = max(28, round(img.width * f)), max(28, round(img.height * f))
    x, y = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((x, y, x + w, y + h))


# --------------------------------------------------------------------------- Ray Data stages


def expand(batch: dict, perturbations: list[str], policy: ImagePolicy, max_pixels: int,
           provenance: ProvenanceConfig = ProvenanceConfig()) -> dict:
    """One prepared (policy-sized) uint8 array per image and perturbation, through `aigd.image_view`
    under the batch scorer's limits: clean is exactly what the API would score, every perturbation
    starts from one full decode, and an image the API would refuse is skipped (counted by the caller
    as rows in minus rows out)."""
    groups = [k for k in batch if k.startswith(GROUP)]
    out = {k: [] for k in ("img_id", "label", "perturbation", "pixels", "width", "height", "format", *groups,
                           *TABLE_COLUMNS)}
    limits = DecodeLimits.preset("batch", max_pixels)
    for i, data in enumerate(image_bytes(batch["image"])):
        try:
            prepared = views(data, limits, policy,
                             {name: None if name == "clean" else perturbation(name) for name in perturbations})
            fmt = sniff(data)
        except AigdError:
            continue
        traced = table_columns(origin(data, provenance))
        for name, pixels in prepared.items():
            out["img_id"].append(str(batch["img_id"][i]))
            out["label"].append(int(batch["label"][i]))
            out["perturbation"].append(name)
            out["pixels"].append(pixels)
            out["width"].append(int(batch["width"][i]))
            out["height"].append(int(batch["height"][i]))
            out["format"].append(fmt)
            for k in groups:
                out[k].append(str(batch[k][i]))
            for k, v in traced.items():
                out[k].append(v)
    return out


def expand_block(rows, cfg: DataConfig, files: list[str], perturbations: list[str], policy: ImagePolicy,
                 provenance: ProvenanceConfig = ProvenanceConfig()) -> dict:
    """`expand` for a block of planned rows (aigd.data.planned_rows): reads their images first."""
    table = with_images(cfg, files, rows)
    keys = ("img_id", "image", "label", "width", "height", *(k for k in table.column_names if k.startswith(GROUP)))
    batch = {k: table.column(k).to_pylist() for k in keys}
    return expand(batch, perturbations, policy, cfg.max_image_pixels, provenance)


class ScoringActor:
    """Ray Data actor: one Scorer (base + every adapter) per actor; adds pair-logit columns per adapter."""

    def __init__(self, cfg: dict):
        self.cfg = from_dict(EvalConfig, cfg)
        self.scorer = Scorer(self.cfg)

    def __call__(self, batch: dict) -> dict:
        images = list(batch["pixels"])
        out = {k: v for k, v in batch.items() if k != "pixels"}
        for name in self.cfg.adapters:
            z = self.scorer.pair_logits(images, name)
            out[f"z_real_{name}"], out[f"z_fake_{name}"] = z[:, 0], z[:, 1]
            out[f"temperature_{name}"] = np.full(len(images), self.scorer.members[name].temperature)
            rule = self.scorer.members[name].rule
            out[f"threshold_{name}"] = np.full(len(images), rule.threshold)
            lo, hi = rule.band or (np.nan, np.nan)
            out[f"band_lo_{name}"], out[f"band_hi_{name}"] = np.full(len(images), lo), np.full(len(images), hi)
        return out


# --------------------------------------------------------------------------- metrics


def _rule(scores: dict, name: str) -> Rule:
    threshold = float(scores[f"threshold_{name}"][0]) if f"threshold_{name}" in scores else 0.5
    lo = float(scores[f"band_lo_{name}"][0]) if f"band_lo_{name}" in scores else float("nan")
    hi = float(scores[f"band_hi_{name}"][0]) if f"band_hi_{name}" in scores else float("nan")
    return Rule(threshold, None if np.isnan(lo) else (lo, hi))


def probabilities(scores: dict, cfg: EvalConfig) -> dict[str, tuple]:
    """(calibrated P(fake), decision Rule) per adapter and for the ensemble, by aigd.decision's rules."""
    adapters = list(cfg.adapters)
    out = {}
    for name in adapters:
        z = np.stack([scores[f"z_real_{name}"], scores[f"z_fake_{name}"]], axis=1)
        out[name] = (p_fake(z, float(scores[f"temperature_{name}"][0])), _rule(scores, name))
    members = list(cfg.ensemble.members or adapters)
    if len(members) > 1:
        out[ENSEMBLE] = ensemble({n: out[n] for n in members}, cfg.ensemble)
    return out


def predictions(scores: dict, cfg: EvalConfig) -> dict:
    """One row per image and perturbation: P(fake) and label per member and for the ensemble."""
    out = {k: np.asarray(scores[k]) for k in ("img_id", "label", "perturbation", *TABLE_COLUMNS)}
    out.update({col: np.asarray(scores[GROUP + col]) for col in cfg.group_by})
    for name, (p, rule) in probabilities(scores, cfg).items():
        out[f"p_fake_{name}"], out[f"label_{name}"] = p, rule.label(p)
    return out


def with_ci(y, p, rule: Rule, n_boot: int) -> dict:
    threshold = rule.threshold
    m = binary_metrics(y, p, threshold, rule.band)
    if n_boot and len(np.unique(y)) == 2:
        m.update({f"{k}_ci95": v for k, v in bootstrap_cis(y, p, threshold, n_boot=n_boot).items()})
    return m


def summarize(scores: dict, cfg: EvalConfig) -> dict:
    """metrics[perturbation][member] and the AUC each member keeps relative to clean."""
    pert = np.asarray(scores["perturbation"])
    y_all = np.asarray(scores["label"])
    metrics: dict = {}
    for name in cfg.perturbations:
        sel = pert == name
        sub = {k: np.asarray(v)[sel] for k, v in scores.items()}
        probs = probabilities(sub, cfg)
        metrics[name] = {m: with_ci(y_all[sel], p, t, cfg.bootstrap if name == "clean" else 0)
                         for m, (p, t) in probs.items()}
    kept = {m: {name: metrics[name][m]["roc_auc"] / metrics["clean"][m]["roc_auc"]
                for name in cfg.perturbations} for m in metrics.get("clean", {})}
    out = {"metrics": metrics, "auc_kept_vs_clean": kept}
    if cfg.group_by:
        out["groups"] = {col: group_metrics(scores, cfg, col) for col in cfg.group_by}
    return out


def group_negatives(group: np.ndarray, y: np.ndarray, value: str, min_images: int) -> tuple[np.ndarray, str]:
    """Which images a group is scored on, and what its negatives are: the group's own reals when it
    has enough (an image folder per generator with its own reals), else every real evaluated (the
    demo data, SID_Set's labels: a generator's group holds only fakes); a group without fakes is
    scored on its reals alone ("none": only the share called real means something)."""
    in_group = group == value
    if not (in_group & (y == 1)).any():
        return in_group, "none"
    if (in_group & (y == 0)).sum() >= min_images:
        return in_group, "own"
    return in_group | (y == 0), "pooled"


def group_metrics(scores: dict, cfg: EvalConfig, col: str) -> dict:
    """metrics[perturbation][member] per value of one group_by column; no AUC below min_group_images."""
    pert, y = np.asarray(scores["perturbation"]), np.asarray(scores["label"])
    group = np.asarray(scores[GROUP + col])
    clean = pert == cfg.perturbations[0]
    out = {}
    for value in sorted(set(group[clean].tolist())):
        sel, reals = group_negatives(group[clean], y[clean], value, cfg.min_group_images)
        n_real, n_fake = int((y[clean][sel] == 0).sum()), int((y[clean][sel] == 1).sum())
        enough = min(n_real, n_fake) >= cfg.min_group_images
        per_pert = {}
        for name in cfg.perturbations:
            rows = np.flatnonzero(pert == name)
            chosen = rows[group_negatives(group[rows], y[rows], value, cfg.min_group_images)[0]]
            sub = {k: np.asarray(v)[chosen] for k, v in scores.items()}
            per_pert[name] = {m: _without_auc(binary_metrics(sub["label"], p, rule.threshold, rule.band), enough)
                              for m, (p, rule) in probabilities(sub, cfg).items()}
        out[value] = {"n_real": n_real, "n_fake": n_fake, "reals": reals, "metrics": per_pert}
    return out


def _without_auc(m: dict, enough: bool) -> dict:
    return m if enough else {**m, "roc_auc": None, "average_precision": None}


def calibration_report(y, scores: dict, adapters: list[str], target_fpr: float) -> dict:
    """`metrics.fit_calibration` per adapter on (validation) scores, plus the ECE of the manifest's
    current temperature for comparison."""
    out = {}
    for name in adapters:
        z = np.stack([scores[f"z_real_{name}"], scores[f"z_fake_{name}"]], axis=1)
        out[name] = {**fit_calibration(z, y, target_fpr),
                     "ece_manifest_temperature": ece(y, p_fake(z, float(scores[f"temperature_{name}"][0])))}
    return out


def shortcut_stats(scores: dict) -> dict:
    """Per class: width, height, aspect ratio and file format of the evaluated images."""
    clean = np.asarray(scores["perturbation"]) == scores["perturbation"][0]
    y = np.asarray(scores["label"])[clean]
    w = np.asarray(scores["width"])[clean].astype(float)
    h = np.asarray(scores["height"])[clean].astype(float)
    fmt = np.asarray(scores["format"])[clean]
    out = {}
    for cls, name in ((0, "real"), (1, "fake")):
        s = y == cls
        if not s.any():
            continue
        aspect = w[s] / h[s]
        formats, counts = np.unique(fmt[s], return_counts=True)
        out[name] = {"n": int(s.sum()), "width_median": float(np.median(w[s])), "height_median": float(np.median(h[s])),
                     "aspect_mean": float(aspect.mean()), "aspect_std": float(aspect.std()),
                     "square_fraction": float(np.mean(np.isclose(aspect, 1.0))),
                     "formats": {str(f): int(c) for f, c in zip(formats, counts)}}
    return out
