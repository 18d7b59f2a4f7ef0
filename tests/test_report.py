"""The evaluation report: rounded numbers, per-group tables and plots, never an AUC where a class is missing."""

from __future__ import annotations

import re

import numpy as np

from aigd import config as C
from aigd import metrics as M
from aigd import report as R
from aigd import evaluation as E

PERTS = ["clean", "jpeg_q50"]


def _scores(n=120, seed=0) -> dict:
    """Two adapters, `a` without an uncertain band and `b` with one, each image clean and after JPEG."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    cols = {"img_id": np.asarray([f"i{i}" for i in range(n)]), "label": y, "width": np.full(n, 640),
            "height": np.full(n, 480), "format": np.asarray(["PNG"] * n)}
    for name, strength, band in (("a", 1.3, (np.nan, np.nan)), ("b", 0.9, (0.35, 0.65))):
        cols.update({f"z_real_{name}": np.zeros(n), f"z_fake_{name}": (2 * y - 1) * strength + rng.normal(0, 1, n),
                     f"temperature_{name}": np.full(n, 1.3), f"threshold_{name}": np.full(n, 0.5),
                     f"band_lo_{name}": np.full(n, band[0]), f"band_hi_{name}": np.full(n, band[1])})
    both = {k: np.concatenate([v, v]) for k, v in cols.items()}
    both["z_fake_a"][n:] *= 0.5  # JPEG blurs the evidence
    both["perturbation"] = np.asarray(["clean"] * n + ["jpeg_q50"] * n)
    return both


def _group_metrics(scores: dict, cfg: C.EvalConfig, sel: np.ndarray, min_per_class: int = 5) -> dict:
    """binary_metrics of the selected images per perturbation and member; AUC and AP None with too few of a class."""
    out = {}
    for name in PERTS:
        rows = sel & (scores["perturbation"] == name)
        y = scores["label"][rows]
        out[name] = {}
        for m, (p, rule) in E.probabilities({k: v[rows] for k, v in scores.items()}, cfg).items():
            met = M.binary_metrics(y, p, rule.threshold)
            if min(np.sum(y == 0), np.sum(y == 1)) < min_per_class:
                met.update(roc_auc=None, average_precision=None)
            out[name][m] = met
    return out


def _summary(scores: dict, cfg: C.EvalConfig) -> dict:
    """The shape robustness.summarize writes, built here so the report is tested on its own."""
    metrics = {}
    for name in PERTS:
        rows = scores["perturbation"] == name
        probs = E.probabilities({k: v[rows] for k, v in scores.items()}, cfg)
        metrics[name] = {m: M.binary_metrics(scores["label"][rows], p, rule.threshold, rule.band)
                         for m, (p, rule) in probs.items()}
    for m in metrics["clean"].values():
        m["roc_auc_ci95"] = [0.912345678901, 0.987654321012]  # as an unrounded interval would arrive
    kept = {m: {n: metrics[n][m]["roc_auc"] / metrics["clean"][m]["roc_auc"] for n in PERTS} for m in metrics["clean"]}
    n = len(scores["label"]) // 2
    y = scores["label"][:n]
    generator = np.where(y == 0, "real", np.where(np.cumsum(y) <= 3, "vae", "gan_tconv"))  # 3 vae fakes
    generator, y = np.concatenate([generator, generator]), scores["label"]
    table = {}
    for value, sel, reals in (("gan_tconv", (generator == "gan_tconv") | (y == 0), "pooled"),
                              ("vae", (generator == "vae") | (y == 0), "pooled"),
                              ("real", generator == "real", "none")):
        own = (generator == value) & (scores["perturbation"] == "clean")
        table[value] = {"n_real": int(np.sum(own & (y == 0))), "n_fake": int(np.sum(own & (y == 1))),
                        "reals": reals, "metrics": _group_metrics(scores, cfg, sel)}
    return {"metrics": metrics, "auc_kept_vs_clean": kept, "groups": {"generator": table}}


def _row(doc: str, value: str) -> str:
    return re.search(rf"<tr><td>{value}</td>.*?</tr>", doc).group(0)


def test_report_rounds_numbers_and_renders_groups_with_dashes_where_a_class_is_missing(tmp_path):
    scores = _scores()
    cfg = C.from_dict(C.EvalConfig, {"adapters": {"a": "/x", "b": "/y"}, "perturbations": PERTS, "bootstrap": 0})
    summary = _summary(scores, cfg)
    extra = {"shortcut_audit": E.shortcut_stats(scores),
             "calibration": {"a": M.fit_calibration(np.stack([scores["z_real_a"], scores["z_fake_a"]], 1),
                                                    scores["label"])}}
    report = R.write_report(scores, summary, cfg, extra, tmp_path)
    doc = report.read_text(encoding="utf-8")

    assert re.findall(r"\d\.\d{5,}", doc) == []
    assert "[0.912, 0.988]" in doc
    assert "<h3>generator</h3>" in doc and "AUC jpeg_q50" in doc
    assert doc.index("Robustness: AUC") < doc.index("<h3>generator</h3>") < doc.index('src="roc.png"')
    vae = summary["groups"]["generator"]["vae"]
    assert vae["metrics"]["clean"]["a"]["roc_auc"] is None and vae["n_fake"] == 3
    row = _row(doc, "vae")
    assert "<td>0</td><td>3</td><td>pooled</td>" in row
    assert re.search(r"<td>—</td><td>[01]\.\d{3}</td>", row)  # AUC a dash, accuracy still a number
    gan = _row(doc, "gan_tconv")
    assert "—" not in gan and gan.count("<td>0.") + gan.count("<td>1.") >= 12
    real = _row(doc, "real")
    assert "<td>none</td>" in real and "(real)" in real and "<td>—</td>" in real

    assert (tmp_path / "groups_generator.png").stat().st_size > 1000 and 'src="groups_generator.png"' in doc
    for name in ("robustness.png", "roc.png", "reliability.png", "confusion.png"):
        assert f'src="{name}"' in doc and (tmp_path / name).exists()

    console = R.text_table(summary)
    assert console.startswith(R.text_table({k: v for k, v in summary.items() if k != "groups"}))
    assert "vae" in R.group_text_table(summary) and "—" in R.group_text_table(summary)


def test_report_without_groups_has_no_group_section(tmp_path):
    scores = _scores(60, seed=1)
    cfg = C.from_dict(C.EvalConfig, {"adapters": {"a": "/x"}, "perturbations": PERTS, "bootstrap": 0})
    summary = _summary(scores, cfg)
    del summary["groups"]
    doc = R.write_report(scores, summary, cfg, {}, tmp_path).read_text(encoding="utf-8")
    assert "Per group" not in doc and not list(tmp_path.glob("groups_*.png"))
    assert R.group_text_table(summary) == ""
