"""Evaluation: perturbations, Ray Data batch scoring, metrics with bootstrap intervals, the report.

The sweep re-scores the SAME images after each perturbation (JPEG re-compression, downscaling,
center crop) so a drop in AUC is the perturbation's effect, not a different sample. `equalized`
(square center crop + one JPEG format for every image) is the shortcut audit: a detector that
learned aspect ratio or file format instead of the generator loses its AUC there.
"""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from aigd.config import EvalConfig
from aigd.images import ImageLimits, decode, sniff
from aigd.errors import AigdError
from aigd.metrics import (accuracy_threshold, binary_metrics, bootstrap_ci, ece, fit_temperature, sigmoid_p,
                          threshold_at_fpr)

ENSEMBLE = "ensemble"
_JPEG = re.compile(r"jpeg_q(\d+)$")
_SCALE = re.compile(r"downscale_([0-9.]+)$")
_CROP = re.compile(r"center_crop_([0-9.]+)$")


def check_perturbation(name: str) -> None:
    if name in ("clean", "equalized") or _JPEG.match(name) or _SCALE.match(name) or _CROP.match(name):
        return
    raise ValueError(f"unknown perturbation {name!r}: clean, jpeg_q<Q>, downscale_<F>, center_crop_<F>, equalized")


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def perturb(img: Image.Image, name: str) -> Image.Image:
    """The named perturbation of an upright RGB image."""
    if name == "clean":
        return img
    if m := _JPEG.match(name):
        return jpeg(img, int(m.group(1)))
    if m := _SCALE.match(name):
        f = float(m.group(1))
        return img.resize((max(28, round(img.width * f)), max(28, round(img.height * f))), Image.Resampling.BICUBIC)
    if m := _CROP.match(name):
        f = float(m.group(1))
        w, h = max(28, round(img.width * f)), max(28, round(img.height * f))
        x, y = (img.width - w) // 2, (img.height - h) // 2
        return img.crop((x, y, x + w, y + h))
    if name == "equalized":
        side = min(img.size)
        x, y = (img.width - side) // 2, (img.height - side) // 2
        return jpeg(img.crop((x, y, x + side, y + side)), 95)
    raise ValueError(f"unknown perturbation {name!r}")


# --------------------------------------------------------------------------- Ray Data stages


def expand(batch: dict, perturbations: list[str], policy, max_pixels: int) -> dict:
    """Decode each image once; emit one prepared (policy-sized) uint8 array per perturbation."""
    from aigd.data import image_bytes
    from aigd.prompt import prepare_image

    out = {k: [] for k in ("img_id", "label", "perturbation", "pixels", "width", "height", "format")}
    limits = ImageLimits(max_pixels=max_pixels, min_side=1, max_aspect=1e9)
    for i, data in enumerate(image_bytes(batch["image"])):
        try:
            img = decode(data, limits)
            fmt = sniff(data)
        except AigdError:
            continue  # counted by the caller as rows in minus rows out
        for name in perturbations:
            out["img_id"].append(str(batch["img_id"][i]))
            out["label"].append(int(batch["label"][i]))
            out["perturbation"].append(name)
            out["pixels"].append(np.asarray(prepare_image(perturb(img, name), policy)))
            out["width"].append(int(batch["width"][i]))
            out["height"].append(int(batch["height"][i]))
            out["format"].append(fmt)
    return out


class Scorer:
    """Ray Data actor: one Detector (base + adapters) per actor; adds pair-logit columns per adapter."""

    def __init__(self, cfg: dict):
        from aigd import config as C
        from aigd.detector import Detector

        self.cfg = C.from_dict(EvalConfig, cfg)
        self.detector = Detector(self.cfg.model, self.cfg.image, self.cfg.adapters)

    def __call__(self, batch: dict) -> dict:
        images = [Image.fromarray(np.asarray(p)) for p in batch["pixels"]]
        out = {k: v for k, v in batch.items() if k != "pixels"}
        for name in self.cfg.adapters:
            z = self.detector.pair_logits(images, name)
            out[f"z_real_{name}"], out[f"z_fake_{name}"] = z[:, 0], z[:, 1]
            out[f"temperature_{name}"] = np.full(len(images), self.detector.members[name].temperature)
            out[f"threshold_{name}"] = np.full(len(images), self.detector.members[name].threshold)
        return out


# --------------------------------------------------------------------------- metrics


def probabilities(scores: dict, adapters: list[str], weights: dict[str, float]) -> dict[str, tuple]:
    """(calibrated P(fake), decision threshold) per adapter and for the weighted-mean ensemble."""
    from aigd.detector import combine

    out = {}
    for name in adapters:
        z = np.stack([scores[f"z_real_{name}"], scores[f"z_fake_{name}"]], axis=1)
        threshold = float(scores[f"threshold_{name}"][0]) if f"threshold_{name}" in scores else 0.5
        out[name] = (sigmoid_p(z, float(scores[f"temperature_{name}"][0])), threshold)
    if len(adapters) > 1:
        p = np.asarray([combine({n: out[n][0][i] for n in adapters}, weights) for i in range(len(scores["label"]))])
        out[ENSEMBLE] = (p, combine({n: out[n][1] for n in adapters}, weights))
    return out


def with_ci(y, p, threshold: float, n_boot: int) -> dict:
    m = binary_metrics(y, p, threshold)
    if n_boot and len(np.unique(y)) == 2:
        for key in ("accuracy", "f1", "roc_auc"):
            m[f"{key}_ci95"] = list(bootstrap_ci(y, p, key, n_boot=n_boot, threshold=threshold))
    return m


def summarize(scores: dict, cfg: EvalConfig) -> dict:
    """metrics[perturbation][member] and the AUC each member keeps relative to clean."""
    adapters = list(cfg.adapters)
    pert = np.asarray(scores["perturbation"])
    y_all = np.asarray(scores["label"])
    metrics: dict = {}
    for name in cfg.perturbations:
        sel = pert == name
        sub = {k: np.asarray(v)[sel] for k, v in scores.items()}
        probs = probabilities(sub, adapters, cfg.ensemble_weights)
        metrics[name] = {m: with_ci(y_all[sel], p, t, cfg.bootstrap if name == "clean" else 0)
                         for m, (p, t) in probs.items()}
    kept = {m: {name: metrics[name][m]["roc_auc"] / metrics["clean"][m]["roc_auc"]
                for name in cfg.perturbations} for m in metrics.get("clean", {})}
    return {"metrics": metrics, "auc_kept_vs_clean": kept}


def calibration_report(y, scores: dict, adapters: list[str], target_fpr: float) -> dict:
    """Temperature and threshold fitted on (validation) scores; ECE at T=1, manifest T and fitted T."""
    out = {}
    for name in adapters:
        z = np.stack([scores[f"z_real_{name}"], scores[f"z_fake_{name}"]], axis=1)
        t = fit_temperature(z, y)
        p_fit = sigmoid_p(z, t)
        out[name] = {"temperature": t, "threshold": accuracy_threshold(y, p_fit),
                     "threshold_at_fpr": threshold_at_fpr(y, p_fit, target_fpr),
                     "target_fpr": target_fpr, "ece_uncalibrated": ece(y, sigmoid_p(z)),
                     "ece_manifest_temperature": ece(y, sigmoid_p(z, float(scores[f"temperature_{name}"][0]))),
                     "ece_calibrated": ece(y, p_fit), "n": int(len(y))}
    return out


def write_calibration(adapter_dir: str, fitted: dict) -> None:
    """Store a validation-fitted temperature and threshold in the adapter's manifest (serving reads them)."""
    path = Path(adapter_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    cal = manifest.setdefault("calibration", {})
    cal.update({"temperature": fitted["temperature"], "threshold": fitted["threshold"],
                "threshold_rule": "max validation accuracy", f"threshold_at_fpr_{fitted['target_fpr']}":
                fitted["threshold_at_fpr"], "ece_before": fitted["ece_uncalibrated"],
                "ece_after": fitted["ece_calibrated"], "fitted_by": "jobs/evaluate.py", "n_val": fitted["n"]})
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


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


# --------------------------------------------------------------------------- report


def _plots(scores: dict, summary: dict, cfg: EvalConfig, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aigd.metrics import confusion

    files = []
    members = list(summary["metrics"]["clean"])
    # robustness curves
    fig, ax = plt.subplots(figsize=(8, 4))
    names = cfg.perturbations
    for m in members:
        ax.plot(range(len(names)), [summary["metrics"][n][m]["roc_auc"] for n in names], marker="o", label=m)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_ylabel("ROC-AUC")
    ax.set_ylim(0.4, 1.01)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend()
    ax.set_title("Robustness: AUC on the same images after each perturbation")
    fig.tight_layout()
    fig.savefig(out / "robustness.png", dpi=110)
    files.append("robustness.png")
    plt.close(fig)
    clean = np.asarray(scores["perturbation"]) == "clean"
    sub = {k: np.asarray(v)[clean] for k, v in scores.items()}
    y = sub["label"]
    probs = probabilities(sub, list(cfg.adapters), cfg.ensemble_weights)
    thresholds = {m: t for m, (_, t) in probs.items()}
    probs = {m: p for m, (p, _) in probs.items()}
    # ROC
    fig, ax = plt.subplots(figsize=(5, 5))
    for m, p in probs.items():
        order = np.argsort(-p)
        tps, fps = np.cumsum(y[order] == 1), np.cumsum(y[order] == 0)
        ax.plot(np.r_[0, fps / max(1, fps[-1])], np.r_[0, tps / max(1, tps[-1])],
                label=f"{m} (AUC {summary['metrics']['clean'][m]['roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("false positive rate (real called fake)")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    ax.set_title("ROC, clean")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    files.append("roc.png")
    plt.close(fig)
    # reliability diagram
    fig, ax = plt.subplots(figsize=(5, 5))
    edges = np.linspace(0, 1, 11)
    for m, p in probs.items():
        idx = np.clip(np.digitize(p, edges) - 1, 0, 9)
        xs = [p[idx == b].mean() for b in range(10) if (idx == b).any()]
        ys = [y[idx == b].mean() for b in range(10) if (idx == b).any()]
        ax.plot(xs, ys, marker="o", label=f"{m} (ECE {ece(y, p):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("predicted P(fake)")
    ax.set_ylabel("observed fraction fake")
    ax.legend()
    ax.set_title("Reliability, clean")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    files.append("reliability.png")
    plt.close(fig)
    # confusion matrices
    fig, axes = plt.subplots(1, len(probs), figsize=(3.2 * len(probs), 3.2), squeeze=False)
    for ax, (m, p) in zip(axes[0], probs.items()):
        c = confusion(y, p >= thresholds[m])
        mat = np.asarray([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(mat, cmap="Blues")
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, str(v), ha="center", va="center")
        ax.set_xticks([0, 1], ["real", "fake"])
        ax.set_yticks([0, 1], ["real", "fake"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{m} (threshold {thresholds[m]:.2f})")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=110)
    files.append("confusion.png")
    plt.close(fig)
    return files


def text_table(summary: dict) -> str:
    """AUC, accuracy and fake recall at 0.5 per member: JPEG tends to turn fakes into "Real" before
    it hurts the ranking, so AUC alone hides it."""
    members = list(summary["metrics"]["clean"])
    lines = [f"{'':16s} " + " ".join(f"{m:>25s}" for m in members),
             f"{'perturbation':16s} " + " ".join(f"{'AUC':>10s} {'acc':>5s} {'rec_fake':>8s}" for _ in members)]
    for name, row in summary["metrics"].items():
        lines.append(f"{name:16s} " + " ".join(
            f"{row[m]['roc_auc']:>10.3f} {row[m]['accuracy']:>5.3f} {row[m]['recall_fake']:>8.3f}" for m in members))
    return "\n".join(lines)


def write_report(scores: dict, summary: dict, cfg: EvalConfig, extra: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    images = _plots(scores, summary, cfg, out)
    (out / "metrics.json").write_text(json.dumps({**summary, **extra}, indent=2, default=float))
    members = list(summary["metrics"]["clean"])
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(
            f"<td>{summary['metrics'][n][m]['roc_auc']:.3f} ({summary['auc_kept_vs_clean'][m][n]:.0%})</td>"
            for m in members) + "</tr>" for n in cfg.perturbations)
    clean = summary["metrics"]["clean"]
    keys = ("accuracy", "precision", "recall_fake", "f1", "roc_auc", "average_precision", "ece", "brier")
    clean_rows = "".join(
        f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{clean[m][k]:.3f}</td>" for k in keys) +
        f"<td>{clean[m].get('roc_auc_ci95', ['', ''])}</td></tr>" for m in members)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>aigd evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd}}</style>
</head><body><h1>Evaluation report</h1>
<p>Data: {html.escape(cfg.data.source)}:{html.escape(cfg.data.path)}, split {html.escape(cfg.split)}.
Adapters: {html.escape(", ".join(f"{k} ({v})" for k, v in cfg.adapters.items()))}.</p>
<h2>Clean metrics (each member at its manifest threshold; 95% bootstrap interval for AUC)</h2>
<table><tr><th>member</th>{"".join(f"<th>{k}</th>" for k in keys)}<th>AUC 95% CI</th></tr>{clean_rows}</table>
<h2>Robustness: AUC (and share of clean AUC kept)</h2>
<table><tr><th>perturbation</th>{"".join(f"<th>{html.escape(m)}</th>" for m in members)}</tr>{rows}</table>
{"".join(f'<p><img src="{f}" alt="{f}"></p>' for f in images)}
<h2>Shortcut audit: per-class image statistics</h2><pre>{html.escape(json.dumps(extra.get("shortcut_audit", {}), indent=2))}</pre>
<p>If AUC collapses on <code>equalized</code> (square center crop, everything re-encoded as JPEG q95),
the detector was reading aspect ratio or file format rather than the image.</p>
<h2>Calibration</h2><pre>{html.escape(json.dumps(extra.get("calibration", {}), indent=2))}</pre>
</body></html>"""
    (out / "report.html").write_text(doc)
    return out / "report.html"
