"""The evaluation report: robustness, ROC, reliability and confusion plots, metrics.json, report.html."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from aigd.config import EvalConfig
from aigd.metrics import confusion, ece
from aigd.robustness import probabilities


def _plots(scores: dict, summary: dict, cfg: EvalConfig, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    probs = probabilities(sub, cfg)
    thresholds = {m: rule.threshold for m, (_, rule) in probs.items()}
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
    """AUC, accuracy and fake recall at each member's threshold, and the share answered (not
    "uncertain"): JPEG tends to turn fakes into "Real" before it hurts the ranking, so AUC alone hides it."""
    members = list(summary["metrics"]["clean"])
    lines = [f"{'':16s} " + " ".join(f"{m:>30s}" for m in members),
             f"{'perturbation':16s} " + " ".join(f"{'AUC':>8s} {'acc':>5s} {'rec_fake':>8s} {'cover':>5s}"
                                                 for _ in members)]
    for name, row in summary["metrics"].items():
        lines.append(f"{name:16s} " + " ".join(
            f"{row[m]['roc_auc']:>8.3f} {row[m]['accuracy']:>5.3f} {row[m]['recall_fake']:>8.3f} "
            f"{row[m].get('coverage', float('nan')):>5.2f}" for m in members))
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
    keys = ("accuracy", "precision", "recall_fake", "f1", "roc_auc", "average_precision", "ece", "brier", "coverage",
            "covered_accuracy")
    clean_rows = "".join(
        f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{clean[m].get(k, float('nan')):.3f}</td>" for k in keys) +
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
