"""The evaluation report: robustness, per-group, ROC, reliability and confusion plots, metrics.json, report.html."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np

from aigd.config import EvalConfig
from aigd.metrics import confusion, ece
from aigd.evaluation import probabilities

DASH = "—"
GROUP_PERTURBATIONS = ("jpeg_q50",)  # shown per group beside clean when the sweep has them


def _num(v, spec: str = ".3f") -> str:
    """None (a group with too few images of a class) and nan read as a dash, never as a number."""
    return DASH if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _ci(interval) -> str:
    return f"[{_num(interval[0])}, {_num(interval[1])}]" if interval else DASH


def _rounded(obj, digits: int = 4):
    """For reading only: metrics.json keeps full precision."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _pyplot().close(fig)
    return name


# --------------------------------------------------------------------------- plots


def _robustness_plot(summary: dict, cfg: EvalConfig, out: Path) -> str:
    fig, ax = _pyplot().subplots(figsize=(8, 4))
    names = cfg.perturbations
    for m in summary["metrics"]["clean"]:
        ax.plot(range(len(names)), [summary["metrics"][n][m]["roc_auc"] for n in names], marker="o", label=m)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_ylabel("ROC-AUC")
    ax.set_ylim(0.4, 1.01)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend()
    ax.set_title("Robustness: AUC on the same images after each perturbation")
    return _save(fig, out, "robustness.png")


def _roc_plot(y, probs: dict, summary: dict, out: Path) -> str:
    fig, ax = _pyplot().subplots(figsize=(5, 5))
    for m, (p, _) in probs.items():
        order = np.argsort(-p)
        tps, fps = np.cumsum(y[order] == 1), np.cumsum(y[order] == 0)
        ax.plot(np.r_[0, fps / max(1, fps[-1])], np.r_[0, tps / max(1, tps[-1])],
                label=f"{m} (AUC {_num(summary['metrics']['clean'][m]['roc_auc'])})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("false positive rate (real called fake)")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    ax.set_title("ROC, clean")
    return _save(fig, out, "roc.png")


def _reliability_plot(y, probs: dict, out: Path) -> str:
    """Equal-count bins (up to 10, at least 5 images each): equal-width bins of a confident model
    hold a handful of images in the middle and draw zig-zags through noise."""
    fig, ax = _pyplot().subplots(figsize=(5, 5))
    bins = max(1, min(10, len(y) // 5))
    sizes = {len(c) for c in np.array_split(np.arange(len(y)), bins)}
    for m, (p, _) in probs.items():
        chunks = np.array_split(np.argsort(p, kind="stable"), bins)
        ax.plot([p[c].mean() for c in chunks], [y[c].mean() for c in chunks], marker="o",
                label=f"{m} (ECE {ece(y, p):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("predicted P(fake), mean of the bin")
    ax.set_ylabel("observed fraction fake")
    ax.legend()
    ax.set_title(f"Reliability, clean: {bins} bins of n={'-'.join(map(str, sorted(sizes)))} images")
    return _save(fig, out, "reliability.png")


def _confusion_plot(y, probs: dict, out: Path) -> str:
    fig, axes = _pyplot().subplots(1, len(probs), figsize=(3.2 * len(probs), 3.2), squeeze=False)
    for ax, (m, (p, rule)) in zip(axes[0], probs.items()):
        c = confusion(y, p >= rule.threshold)
        mat = np.asarray([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(mat, cmap="Blues")
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, str(v), ha="center", va="center")
        ax.set_xticks([0, 1], ["real", "fake"])
        ax.set_yticks([0, 1], ["real", "fake"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{m} (threshold {rule.threshold:.2f})")
    return _save(fig, out, "confusion.png")


def _clean_plots(scores: dict, summary: dict, cfg: EvalConfig, out: Path) -> list[str]:
    clean = np.asarray(scores["perturbation"]) == "clean"
    sub = {k: np.asarray(v)[clean] for k, v in scores.items()}
    probs = probabilities(sub, cfg)
    return [_roc_plot(sub["label"], probs, summary, out), _reliability_plot(sub["label"], probs, out),
            _confusion_plot(sub["label"], probs, out)]


def _clean_auc(g: dict, member: str) -> float:
    auc = g["metrics"].get("clean", {}).get(member, {}).get("roc_auc")
    return np.nan if auc is None else auc


def _group_plot(column: str, values: dict, members: list[str], out: Path) -> str | None:
    """Clean AUC per value and member; values without an AUC (too few images of a class) are left out."""
    auc = {v: [_clean_auc(g, m) for m in members] for v, g in values.items()}
    auc = {v: row for v, row in auc.items() if not np.isnan(row).all()}
    if not auc:
        return None
    fig, ax = _pyplot().subplots(figsize=(max(5.0, 1.0 + 0.3 * len(auc) * len(members)), 4))
    width = 0.8 / len(members)
    for j, m in enumerate(members):
        ax.bar(np.arange(len(auc)) + (j - (len(members) - 1) / 2) * width, [row[j] for row in auc.values()], width,
               label=m)
    ax.set_xticks(range(len(auc)), [str(v) for v in auc], rotation=30, ha="right")
    ax.set_ylabel("ROC-AUC, clean")
    ax.set_ylim(0.4, 1.1)  # the top band holds the legend
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend(loc="upper center", ncols=len(members), fontsize=8)
    ax.set_title(f"Clean AUC per {column}")
    return _save(fig, out, f"groups_{re.sub(r'[^A-Za-z0-9_.-]', '_', column)}.png")


# --------------------------------------------------------------------------- tables


def _recall(g: dict, m: dict):
    """Fake recall; on a reals-only group (no fakes) the share of reals called real."""
    return m.get("recall_real" if g["reals"] == "none" else "recall_fake")


def _group_cells(g: dict, member: str, perts: list[str]) -> str:
    clean = g["metrics"].get("clean", {}).get(member, {})
    recall = _num(_recall(g, clean)) + (" (real)" if g["reals"] == "none" else "")
    cells = [_num(clean.get("roc_auc")), _num(clean.get("accuracy")), recall]
    cells += [_num(g["metrics"].get(n, {}).get(member, {}).get("roc_auc")) for n in perts]
    return "".join(f"<td>{c}</td>" for c in cells)


def _group_table(column: str, values: dict, members: list[str]) -> str:
    perts = [n for n in GROUP_PERTURBATIONS if any(n in g["metrics"] for g in values.values())]
    sub = ["AUC", "acc", "recall"] + [f"AUC {n}" for n in perts]
    head = (f"<tr><th rowspan=2>{html.escape(column)}</th><th rowspan=2>n_real</th><th rowspan=2>n_fake</th>"
            "<th rowspan=2>negatives</th>" + "".join(f"<th colspan={len(sub)}>{html.escape(m)}</th>" for m in members)
            + "</tr><tr>" + "".join(f"<th>{s}</th>" for s in sub) * len(members) + "</tr>")
    rows = "".join(
        f"<tr><td>{html.escape(str(v))}</td><td>{g['n_real']}</td><td>{g['n_fake']}</td><td>{g['reals']}</td>"
        + "".join(_group_cells(g, m, perts) for m in members) + "</tr>" for v, g in values.items())
    return f"<table>{head}{rows}</table>"


def _groups_section(summary: dict, out: Path) -> str:
    if not summary.get("groups"):
        return ""
    members = list(summary["metrics"]["clean"])
    parts = ["<h2>Per group (clean unless named; each member at its manifest threshold)</h2>",
             "<p>negatives: <code>own</code> = the group's own real images; <code>pooled</code> = all evaluated "
             "reals (the group has too few of its own); <code>none</code> = the group has no fakes, so recall is "
             f"the share of reals called real. {DASH} = too few images of a class for an AUC.</p>"]
    for column, values in summary["groups"].items():
        parts.append(f"<h3>{html.escape(column)}</h3>{_group_table(column, values, members)}")
        if image := _group_plot(column, values, members, out):
            parts.append(f'<p><img src="{image}" alt="{image}"></p>')
    return "\n".join(parts)


def group_text_table(summary: dict) -> str:
    """The console's per-group block: counts, negatives, and each member's clean AUC and recall."""
    members = list(summary["metrics"]["clean"])
    lines = []
    for column, values in summary.get("groups", {}).items():
        names = " ".join(f"{m[:13]:>13s}" for m in members)
        lines += [f"{column[:16]:16s} {'real':>5s} {'fake':>5s} {'neg':>6s} {names}",
                  f"{'':35s} " + " ".join(f"{'AUC':>6s} {'recall':>6s}" for _ in members)]
        for value, g in values.items():
            clean = g["metrics"].get("clean", {})
            lines.append(f"{str(value)[:16]:16s} {g['n_real']:>5d} {g['n_fake']:>5d} {g['reals']:>6s} " + " ".join(
                f"{_num(clean.get(m, {}).get('roc_auc')):>6s} {_num(_recall(g, clean.get(m, {}))):>6s}"
                for m in members))
    if lines:
        lines.append(f"recall: of fakes; of reals where neg is none. {DASH}: too few images of a class")
    return "\n".join(lines)


def text_table(summary: dict) -> str:
    """AUC, accuracy and fake recall at each member's threshold, and the share answered (not
    "uncertain"): JPEG tends to turn fakes into "Real" before it hurts the ranking, so AUC alone hides it.
    Followed by the per-group block when the summary has groups."""
    members = list(summary["metrics"]["clean"])
    lines = [f"{'':16s} " + " ".join(f"{m:>30s}" for m in members),
             f"{'perturbation':16s} " + " ".join(f"{'AUC':>8s} {'acc':>5s} {'rec_fake':>8s} {'cover':>5s}"
                                                 for _ in members)]
    for name, row in summary["metrics"].items():
        lines.append(f"{name:16s} " + " ".join(
            f"{row[m]['roc_auc']:>8.3f} {row[m]['accuracy']:>5.3f} {row[m]['recall_fake']:>8.3f} "
            f"{row[m].get('coverage', float('nan')):>5.2f}" for m in members))
    groups = group_text_table(summary)
    return "\n".join(lines) + (f"\n\n{groups}" if groups else "")


def _json_block(obj) -> str:
    return html.escape(json.dumps(_rounded(obj), indent=2))


def write_report(scores: dict, summary: dict, cfg: EvalConfig, extra: dict, out: Path,
                 sections: tuple[str, ...] = ()) -> Path:
    """The report folder; `sections` are HTML blocks placed after the plots (the explanations')."""
    out.mkdir(parents=True, exist_ok=True)
    robustness_image = _robustness_plot(summary, cfg, out)
    groups = _groups_section(summary, out)
    images = _clean_plots(scores, summary, cfg, out)
    (out / "metrics.json").write_text(json.dumps({**summary, **extra}, indent=2, default=float))
    members = list(summary["metrics"]["clean"])
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(
            f"<td>{_num(summary['metrics'][n][m]['roc_auc'])} ({_num(summary['auc_kept_vs_clean'][m][n], '.0%')})</td>"
            for m in members) + "</tr>" for n in cfg.perturbations)
    clean = summary["metrics"]["clean"]
    keys = ("accuracy", "precision", "recall_fake", "f1", "roc_auc", "average_precision", "ece", "brier", "coverage",
            "covered_accuracy")
    clean_rows = "".join(
        f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{_num(clean[m].get(k))}</td>" for k in keys) +
        f"<td>{_ci(clean[m].get('roc_auc_ci95'))}</td></tr>" for m in members)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>aigd evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd}}</style>
</head><body><h1>Evaluation report</h1>
<p>Data: {html.escape(cfg.data.source)}:{html.escape(cfg.data.path)}, split {html.escape(cfg.split)}.
Adapters: {html.escape(", ".join(f"{k} ({v})" for k, v in cfg.adapters.items()))}.</p>
<h2>Clean metrics (each member at its manifest threshold; 95% bootstrap interval for AUC)</h2>
<table><tr><th>member</th>{"".join(f"<th>{k}</th>" for k in keys)}<th>AUC 95% CI</th></tr>{clean_rows}</table>
<h2>Robustness: AUC (and share of clean AUC kept)</h2>
<table><tr><th>perturbation</th>{"".join(f"<th>{html.escape(m)}</th>" for m in members)}</tr>{rows}</table>
<p><img src="{robustness_image}" alt="{robustness_image}"></p>
{groups}
{"".join(f'<p><img src="{f}" alt="{f}"></p>' for f in images)}
{"".join(sections)}
<h2>Shortcut audit: per-class image statistics</h2><pre>{_json_block(extra.get("shortcut_audit", {}))}</pre>
<p>If AUC collapses on <code>equalized</code> (square center crop, everything re-encoded as JPEG q95),
the detector was reading aspect ratio or file format rather than the image.</p>
<h2>Calibration</h2><pre>{_json_block(extra.get("calibration", {}))}</pre>
</body></html>"""
    (out / "report.html").write_text(doc, encoding="utf-8")
    return out / "report.html"
