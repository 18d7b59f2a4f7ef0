"""The leave-one-generator-out table: which figure comes from which run, and the goals' arithmetic."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import generalization as G  # noqa: E402

FAMILIES = ["gan", "vae"]


def _metrics(auc, recall=0.8, recall_real=0.97, acc=0.9):
    return {"roc_auc": auc, "recall_fake": recall, "recall_real": recall_real, "accuracy": acc}


def _run(auc_of: dict, fpr=0.03):
    """One setting's evaluation: per family the given clean AUC (q50 = 0.9x, q30 = 0.8x of it)."""
    groups = {f: {"metrics": {p: {m: _metrics(a * s) for m in G.METHODS}
                              for p, s in (("clean", 1.0), ("jpeg_q50", 0.9), ("jpeg_q30", 0.8))}}
              for f, a in auc_of.items()}
    overall = {"clean": {m: _metrics(0.9, recall_real=1 - fpr) for m in G.METHODS}}
    return {"groups": groups, "overall": overall, "jobs": []}


@pytest.fixture
def runs():
    return {s: {"all": _run({"gan": 0.99, "vae": 0.95}),
                "gan": _run({"gan": 0.6 + 0.1 * s, "vae": 0.9}),
                "vae": _run({"gan": 0.98, "vae": 0.8}, fpr=0.1)} for s in (0, 1)}


def test_held_out_figures_come_from_the_run_without_that_family(runs):
    fig = G.figures(runs, FAMILIES)
    gan = fig["gan"]["method1"]
    assert gan["auc_in"] == [0.99, 0.99] and gan["auc_out"] == pytest.approx([0.6, 0.7])
    assert gan["auc_seen"] == [0.9, 0.9]  # the other families, in the run without gan
    assert fig["vae"]["method2"]["fpr"] == pytest.approx([0.1, 0.1])
    assert gan["auc_in_jpeg_q50"] == pytest.approx([0.891, 0.891])


def test_goals_report_the_measured_values(runs):
    goals = G.goals(G.figures(runs, FAMILIES), FAMILIES)
    assert goals["in_distribution_auc_ge_0.97_every_family_both_methods"] == {"met": False, "lowest": 0.95}
    held_out = goals["mean_held_out_auc_ge_0.85_better_method"]
    assert not held_out["met"] and held_out["method1"] == pytest.approx(np.mean([0.65, 0.8]), abs=1e-3)
    recall = goals["held_out_fake_recall_ge_0.7_at_real_fpr_le_0.05"]
    assert recall["families_met"] == ["gan"] and not recall["met"]  # vae's run calls 10 % of reals fake
    assert goals["method2_q50_auc_ge_0.9x_clean_every_family"]["met"]


def test_the_table_has_a_row_per_family_and_method(runs):
    text = G.tables(G.figures(runs, FAMILIES), FAMILIES)
    assert text.count("| gan | method1 |") == 2 and "| **mean** | method2 |" in text
    assert "0.650 (0.60-0.70)" in text  # mean over seeds (min-max)


def test_the_doc_block_is_replaced_and_a_doc_without_markers_refused(tmp_path):
    doc = tmp_path / "g.md"
    doc.write_text(f"intro\n{G.BEGIN}\nold\n{G.END}\nafter\n")
    G.write_doc(doc, "new table")
    assert doc.read_text() == f"intro\n{G.BEGIN}\nnew table\n{G.END}\nafter\n"
    (tmp_path / "bare.md").write_text("nothing")
    with pytest.raises(SystemExit, match="no"):
        G.write_doc(tmp_path / "bare.md", "x")


def test_earlier_seeds_are_reused_only_for_the_same_families_and_epochs(tmp_path, runs):
    import json

    path = tmp_path / "generalization.json"
    assert G.previous_runs(path, FAMILIES, 6) == ({}, {})
    path.write_text(json.dumps({"runs": runs, "seed_wall_s": {0: 60.0, 1: 70.0}, "families": FAMILIES, "epochs": 6}))
    again, wall = G.previous_runs(path, FAMILIES, 6)
    assert set(again) == {0, 1} and wall == {0: 60.0, 1: 70.0}
    assert again[1]["gan"]["groups"]["gan"]["metrics"]["clean"]["method1"]["roc_auc"] == pytest.approx(0.7)
    assert G.previous_runs(path, FAMILIES, 10) == ({}, {})
    assert G.previous_runs(path, ["gan"], 6) == ({}, {})
