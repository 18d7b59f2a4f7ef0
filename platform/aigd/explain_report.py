"""The explanation figures of an evaluation (aigd.explain_eval) as the console's table and the
report's section: the table, the deletion curves, and tampered rows drawn as image | map | mask."""

from __future__ import annotations

import html
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from aigd.explain import overlay_png

DASH = "—"


def _f(v, spec: str = ".3f") -> str:
    return DASH if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))) else format(v, spec)


def rows(figures: dict) -> list[list[str]]:
    out = []
    for adapter, methods in figures["methods"].items():
        for method, m in methods.items():
            f, loc = m["faithfulness"], m["localization"]
            out.append([adapter, method, _f(f["drop_top"]), _f(f["drop_random"]), _f(f["drop_ratio"], ".2f"),
                        _f(f["area_between"]), _f(loc.get("pixel_auc_mean")), _f(loc.get("pixel_auc_pooled")),
                        _f(loc.get("iou_mean")), _f(f["seconds_per_map"], ".2f"), _f(f["cost_vs_detect"], ".1f")])
    return out


HEADER = ["adapter", "method", "drop top", "drop rand", "ratio", "area", "pxAUC", "pxAUC pool", "IoU", "s/map",
          "x detect"]


def notes(figures: dict) -> list[str]:
    """What the columns mean, and the image-level verdicts on tampered rows."""
    f = next(iter(next(iter(figures["methods"].values())).values()))["faithfulness"]
    lines = [f"drop: mean P(fake) lost on {f['n']} fakes when {f['at']:.0%} of the tokens are replaced by the baseline "
             f"(most attributed first / at random); ratio = top / random ({DASH}: random lowers nothing); area between "
             f"the curves over the shares {f['fractions']}; pxAUC: the map against tampered rows' masks"]
    for adapter, v in figures["tampered_verdicts"].items():
        lines.append(f"tampered rows, {adapter}: {v['n']} scored, {v['fake']} called fake, {v['uncertain']} uncertain, "
                     f"{v['real']} real; mean P(fake) {_f(v['mean_p_fake'])}")
    return lines


def text_table(figures: dict) -> str:
    """What the job prints: per adapter and method, the deletion drops at ~20 %, their ratio and the
    area between the curves (fakes), localization on tampered rows, and the cost; then the notes."""
    table = [HEADER, *rows(figures)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    return "\n".join(lines + notes(figures))


def _curves_plot(figures: dict, out: Path) -> str:
    from aigd.report import _pyplot, _save

    plt = _pyplot()
    items = [(a, m, v["faithfulness"]) for a, ms in figures["methods"].items() for m, v in ms.items()]
    fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 3), squeeze=False)
    for ax, (adapter, method, f) in zip(axes[0], items):
        ax.plot(f["fractions"], f["p_fake_top"], marker="o", label="most attributed first")
        ax.plot(f["fractions"], f["p_fake_random"], marker="o", label="random")
        ax.set_title(f"{adapter}, {method}", fontsize=9)
        ax.set_xlabel("share of tokens filled")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("mean P(fake) of fakes")
    axes[0][0].legend(fontsize=7)
    return _save(fig, out, "explain_deletion.png")


def _picture(i: int, item: tuple, out: Path) -> str:
    """image | map over it | mask, side by side, at 3x."""
    adapter, method, img_id, image, grid, mask, answer = item
    over = Image.open(io.BytesIO(overlay_png(image, grid, [], min_side=1))).convert("RGB")
    mask_img = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (3 * w + 8, h), "white")
    for k, part in enumerate((Image.fromarray(image), over.resize((w, h)), mask_img)):
        canvas.paste(part, (k * (w + 4), 0))
    name = f"explain_tampered_{i}.png"
    canvas.resize((canvas.width * 3, canvas.height * 3), Image.Resampling.NEAREST).save(out / name)
    return name


def html_section(figures: dict, pictures: list, out: Path) -> str:
    table = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows(figures))
    curves = _curves_plot(figures, out)
    note = html.escape("\n".join(notes(figures)))
    shown = "".join(
        f'<figure><img src="{_picture(i, p, out)}" alt="tampered row {html.escape(str(p[2]))}">'
        f"<figcaption>{html.escape(str(p[2]))}: {html.escape(p[0])} ({html.escape(p[1])}) says "
        f"{html.escape(p[6]['label'])}, P(fake) {p[6]['p_fake']:.3f}. Image | map | pasted region</figcaption></figure>"
        for i, p in enumerate(pictures))
    return (f"<h2>Explanations: faithfulness and localization</h2>"
            f"<table><tr>{''.join(f'<th>{h}</th>' for h in HEADER)}</tr>{table}</table>"
            f"<pre>{note}</pre>"
            f'<p><img src="{curves}" alt="deletion curves"></p>{shown}')
