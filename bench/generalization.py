"""Leave-one-generator-out: how a detector trained here does on a generator it was not trained on.

    python bench/generalization.py --seeds 0 1 --doc docs/generalization.md     # (make generalization)

Per seed: both methods trained on every family of the demo data's generator zoo (the
in-distribution row), then, for each family, both methods trained with that family removed from
train and val (`data.exclude`); every pair evaluated by jobs/evaluate.py on the whole test split,
grouped by generator, clean and after JPEG q50 / q30. Each figure is the mean over seeds with its
min-max; thresholds are the ones each adapter's export fitted on its own validation split (which
never holds the held-out family), so "fake recall" is what a user acting on the answers would get.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "jobs"), str(REPO / "bench")]
from experiment import evaluate, home, train  # noqa: E402

METHODS = ("method1", "method2")
PERTS = ("clean", "jpeg_q50", "jpeg_q30")
BEGIN, END = "<!-- generalization:begin -->", "<!-- generalization:end -->"


def run_setting(seed: int, held_out: str | None, epochs: int | None) -> dict:
    """Both methods trained without `held_out` (None: on every family), evaluated by generator."""
    tag = f"-logo-{held_out or 'all'}"
    overrides = (f"data.exclude={{generator: [{held_out}]}}",) if held_out else ()
    overrides += (f"optim.epochs={epochs}",) if epochs else ()
    adapters, jobs = {}, []
    for method in METHODS:
        adapters[method], info = train(method, seed, tag, overrides)
        jobs.append({"method": method, **info})
    metrics = evaluate(seed, adapters, tag, (f"perturbations=[{', '.join(PERTS)}]", "bootstrap=0"))
    return {"groups": metrics["groups"]["generator"], "overall": metrics["metrics"], "jobs": jobs}


# --------------------------------------------------------------------------- figures


def figures(runs: dict, families: list[str]) -> dict:
    """fig[family][method][name] = per-seed values; runs[seed][setting] from run_setting."""
    fig: dict = {}
    for seed_runs in runs.values():
        seen = seed_runs["all"]
        for fam in families:
            logo = seed_runs[fam]
            for m in METHODS:
                own = logo["groups"][fam]["metrics"]
                vals = {
                    "auc_in": seen["groups"][fam]["metrics"]["clean"][m]["roc_auc"],
                    "auc_out": own["clean"][m]["roc_auc"],
                    "acc_out": own["clean"][m]["accuracy"],
                    "recall_out": own["clean"][m]["recall_fake"],
                    "fpr": 1 - logo["overall"]["clean"][m]["recall_real"],
                    "auc_seen": float(np.mean([logo["groups"][f]["metrics"]["clean"][m]["roc_auc"]
                                               for f in families if f != fam])),
                    **{f"auc_in_{p}": seen["groups"][fam]["metrics"][p][m]["roc_auc"] for p in PERTS[1:]},
                    **{f"recall_in_{p}": seen["groups"][fam]["metrics"][p][m]["recall_fake"] for p in PERTS},
                    **{f"auc_out_{p}": own[p][m]["roc_auc"] for p in PERTS[1:]},
                    **{f"recall_out_{p}": own[p][m]["recall_fake"] for p in PERTS[1:]},
                }
                for k, v in vals.items():
                    fig.setdefault(fam, {}).setdefault(m, {}).setdefault(k, []).append(np.nan if v is None else v)
    return fig


def cell(vals: list[float]) -> str:
    return f"{np.mean(vals):.3f} ({np.min(vals):.2f}-{np.max(vals):.2f})" if len(vals) > 1 else f"{vals[0]:.3f}"


def tables(fig: dict, families: list[str]) -> str:
    def mean_row(m, key):
        return [float(np.mean([np.mean(fig[f][m][key]) for f in families]))]

    lines = ["| held-out family | method | AUC in-distribution | AUC held out | gap | accuracy | fake recall "
             "| real FPR | AUC on the seen families |", "|---|---|---|---|---|---|---|---|---|"]
    for fam in families:
        for m in METHODS:
            v = fig[fam][m]
            gap = [a - b for a, b in zip(v["auc_in"], v["auc_out"])]
            lines.append(f"| {fam} | {m} | {cell(v['auc_in'])} | {cell(v['auc_out'])} | {cell(gap)} | "
                         f"{cell(v['acc_out'])} | {cell(v['recall_out'])} | {cell(v['fpr'])} | {cell(v['auc_seen'])} |")
    for m in METHODS:
        keys = ("auc_in", "auc_out", "acc_out", "recall_out", "fpr", "auc_seen")
        means = {k: mean_row(m, k) for k in keys}
        lines.append(f"| **mean** | {m} | {cell(means['auc_in'])} | {cell(means['auc_out'])} | "
                     f"{cell([means['auc_in'][0] - means['auc_out'][0]])} | {cell(means['acc_out'])} | "
                     f"{cell(means['recall_out'])} | {cell(means['fpr'])} | {cell(means['auc_seen'])} |")
    lines += ["", "JPEG (the same test images re-encoded): AUC and fake recall at each adapter's threshold.", "",
              "| family | method | in-dist. AUC clean / q50 / q30 | in-dist. q50 AUC / clean AUC | in-dist. fake recall "
              "clean / q50 / q30 | held-out AUC q50 / q30 | held-out fake recall q50 / q30 |",
              "|---|---|---|---|---|---|---|"]
    for fam in families:
        for m in METHODS:
            v = fig[fam][m]
            ratio = [a / b for a, b in zip(v["auc_in_jpeg_q50"], v["auc_in"])]
            lines.append(
                f"| {fam} | {m} | {np.mean(v['auc_in']):.3f} / {np.mean(v['auc_in_jpeg_q50']):.3f} / "
                f"{np.mean(v['auc_in_jpeg_q30']):.3f} | {cell(ratio)} | {np.mean(v['recall_in_clean']):.2f} / "
                f"{np.mean(v['recall_in_jpeg_q50']):.2f} / {np.mean(v['recall_in_jpeg_q30']):.2f} | "
                f"{np.mean(v['auc_out_jpeg_q50']):.3f} / {np.mean(v['auc_out_jpeg_q30']):.3f} | "
                f"{np.mean(v['recall_out_jpeg_q50']):.2f} / {np.mean(v['recall_out_jpeg_q30']):.2f} |")
    return "\n".join(lines)


def goals(fig: dict, families: list[str]) -> dict:
    def mean(fam, m, key):
        return float(np.mean(fig[fam][m][key]))

    logo_auc = {m: float(np.mean([mean(f, m, "auc_out") for f in families])) for m in METHODS}
    better = max(METHODS, key=logo_auc.get)
    caught = [f for f in families if mean(f, better, "recall_out") >= 0.7 and mean(f, better, "fpr") <= 0.05]
    ratio = {m: {f: mean(f, m, "auc_in_jpeg_q50") / mean(f, m, "auc_in") for f in families} for m in METHODS}
    return {
        "in_distribution_auc_ge_0.97_every_family_both_methods": {
            "met": all(mean(f, m, "auc_in") >= 0.97 for f in families for m in METHODS),
            "lowest": round(min(mean(f, m, "auc_in") for f in families for m in METHODS), 3)},
        "mean_held_out_auc_ge_0.85_better_method": {"met": logo_auc[better] >= 0.85, "method": better,
                                                    **{m: round(v, 3) for m, v in logo_auc.items()}},
        "held_out_fake_recall_ge_0.7_at_real_fpr_le_0.05": {
            "met": len(caught) == len(families), "families_met": caught, "method": better},
        "method2_q50_auc_ge_0.9x_clean_every_family": {
            "met": all(r >= 0.9 for r in ratio["method2"].values()),
            "lowest": round(min(ratio["method2"].values()), 3)},
        "method1_loses_more_auc_at_q50": {
            "met": float(np.mean(list(ratio["method1"].values()))) < float(np.mean(list(ratio["method2"].values()))),
            **{f"{m}_mean_q50_over_clean": round(float(np.mean(list(ratio[m].values()))), 3) for m in METHODS}},
    }


def previous_runs(path: Path, families: list[str], epochs: int | None) -> tuple[dict, dict]:
    """(runs, seconds) per seed of an earlier run of this command with the same families and epochs."""
    if not path.exists():
        return {}, {}
    saved = json.loads(path.read_text())
    if saved.get("families") != families or saved.get("epochs") != epochs:
        return {}, {}
    return ({int(k): v for k, v in saved["runs"].items()},
            {int(k): v for k, v in saved.get("seed_wall_s", {}).items()})


def write_doc(path: Path, block: str) -> None:
    text = path.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block to replace")
    path.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{block}\n{END}", text,
                           flags=re.S))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--families", nargs="+", help="default: every family of the demo data config's zoo")
    ap.add_argument("--epochs", type=int, help="override optim.epochs of both demo configs")
    ap.add_argument("--doc", help="replace the block between the generalization markers in this file")
    ap.add_argument("--reuse", action="store_true", help="take seeds already run (same families and epochs) "
                    "from $AIGD_HOME/experiment/generalization.json instead of training them again")
    args = ap.parse_args(argv)
    import ray

    from aigd import config as C
    from aigd.dev.demo_data import write_demo_data
    from aigd.dev.tiny_model import ensure_tiny_model

    demo = C.load(C.DemoDataConfig, REPO / "configs/demo_data.yaml")
    families = args.families or list(demo.zoo.families)
    ensure_tiny_model(home() / "tiny-qwen2.5-vl")
    write_demo_data(demo)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "jobs"), os.environ.get("PYTHONPATH", "")])
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    out = home() / "experiment" / "generalization.json"
    runs, seed_wall = previous_runs(out, families, args.epochs) if args.reuse else ({}, {})
    runs = {seed: runs[seed] for seed in args.seeds if seed in runs}
    for seed in args.seeds:
        if seed not in runs:
            t0 = time.perf_counter()
            runs[seed] = {held: run_setting(seed, None if held == "all" else held, args.epochs)
                          for held in ["all", *families]}
            seed_wall[seed] = time.perf_counter() - t0
    ray.shutdown()
    wall = sum(seed_wall.get(seed, 0.0) for seed in args.seeds)
    fig = figures(runs, families)
    met = goals(fig, families)
    epochs = f"{args.epochs} epochs" if args.epochs else "the demo configs' epochs"
    block = (f"<!-- written by: python bench/generalization.py --seeds {' '.join(map(str, args.seeds))}"
             f"{f' --epochs {args.epochs}' if args.epochs else ''}{' --reuse' if args.reuse else ''} --doc {args.doc} -->\n"
             f"Seeds {', '.join(map(str, args.seeds))}: mean (min-max). Families {', '.join(families)}; {epochs}; "
             f"{len(runs) * (1 + len(families)) * 2} training jobs and {len(runs) * (1 + len(families))} evaluations "
             f"in {wall / 60:.0f} min on {os.cpu_count()} CPUs "
             f"({', '.join(f'seed {k} {v / 60:.0f} min' for k, v in sorted(seed_wall.items()) if k in runs)}).\n\n" + tables(fig, families) +
             "\n\nGoals:\n\n" + "\n".join(f"- {k}: **{'met' if v['met'] else 'NOT met'}** "
                                          f"({', '.join(f'{a} {b}' for a, b in v.items() if a != 'met')})"
                                          for k, v in met.items()))
    print(block)
    out.write_text(json.dumps({"runs": runs, "goals": met, "wall_s": wall, "seed_wall_s": seed_wall,
                               "families": families, "epochs": args.epochs}, indent=1, default=float))
    if args.doc:
        write_doc(Path(args.doc), block)
    return {"goals": met, "wall_s": wall}


if __name__ == "__main__":
    main()
