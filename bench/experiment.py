"""The demo's evidence: both methods trained over several seeds, evaluated on the held-out test split,
summarised as mean and spread per method and perturbation; the proxy table in docs/benchmarks.md is this output.

    python bench/experiment.py --seeds 0 1 2 --doc docs/benchmarks.md --json     # (make experiment)

Per seed: jobs/train_method1.py and jobs/train_method2.py with the demo configs (seed set in
optim, lora and data), then jobs/evaluate.py on both adapters; all on one local Ray. Also the
training throughput of the jobs against a plain single-process loop over the same model and batch
size (`framework_ratio`).
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
ROWS = ("clean", "jpeg_q75", "jpeg_q50", "jpeg_q30", "downscale_0.5", "center_crop_0.5", "equalized")
MEMBERS = ("method1", "method2", "ensemble")
BEGIN, END = "<!-- experiment:begin -->", "<!-- experiment:end -->"


def home() -> Path:
    return Path(os.environ.get("AIGD_HOME", "~/.cache/aigd")).expanduser()


def train(method: str, seed: int, tag: str = "", overrides: tuple[str, ...] = ()) -> tuple[Path, dict]:
    recipe = __import__(f"train_{method}")
    root = home() / "experiment"
    name = f"exp-{method}-s{seed}{tag}-{int(time.time())}"
    t0 = time.perf_counter()
    out = recipe.main(["--config", str(REPO / f"configs/demo_{method}.yaml"), f"optim.seed={seed}",
                       f"lora.seed={seed}", f"data.seed={seed}", f"run.name={name}",
                       f"run.storage_path={root}/runs", f"run.export_dir={root}/s{seed}{tag}/{method}", *overrides])
    wall = time.perf_counter() - t0
    ckpts = sorted(p for p in (root / "runs" / name).glob("checkpoint_*") if p.is_dir())
    history = json.loads((ckpts[-1] / "loop_state.json").read_text())["history"]
    rates = [h["train_samples_per_s"] for h in history if "train_samples_per_s" in h]
    from aigd.manifest import read_manifest

    manifest = read_manifest(out)
    return Path(out.uri), {"job_s": round(wall, 1), "train_samples_per_s": round(rates[-1], 1) if rates else None,
                 "steps": manifest["training"]["global_step"], "best_step": manifest["training"]["best_step"],
                 "val_auc": manifest["val_metrics"].get("roc_auc")}


def evaluate(seed: int, adapters: dict[str, Path], tag: str = "", overrides: tuple[str, ...] = ()) -> dict:
    import evaluate as job

    out = home() / "experiment" / f"s{seed}{tag}" / "eval"
    job.main(["--config", str(REPO / "configs/eval_demo.yaml"), f"out_dir={out}",
              *(f"adapters.{k}={v}" for k, v in adapters.items()), *overrides])
    return json.loads((out / "metrics.json").read_text())


def summarise(per_seed: list[dict]) -> dict:
    """mean, min, max over seeds of AUC, accuracy, fake recall, coverage per perturbation and member."""
    out: dict = {}
    for row in ROWS:
        for m in MEMBERS:
            for key in ("roc_auc", "accuracy", "recall_fake", "coverage"):
                vals = [s["metrics"][row][m].get(key, float("nan")) for s in per_seed]
                out.setdefault(row, {}).setdefault(m, {})[key] = {
                    "mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}
    return out


def table(summary: dict, per_seed: list[dict], seeds: list[int]) -> str:
    def cell(row, m, key):
        v = summary[row][m][key]
        return f"{v['mean']:.3f} ({v['min']:.2f}-{v['max']:.2f})"

    lines = [f"Mean over seeds {', '.join(map(str, seeds))} (min-max); each member at its validation-fitted "
             "threshold; coverage = share not answered `uncertain`.", "",
             "| perturbation | " + " | ".join(f"{m} AUC | {m} acc | {m} fake recall" for m in MEMBERS) + " |",
             "|---|" + "---|" * (3 * len(MEMBERS))]
    for row in ROWS:
        lines.append(f"| {row.replace('_', ' ')} | " + " | ".join(
            f"{cell(row, m, 'roc_auc')} | {cell(row, m, 'accuracy')} | {cell(row, m, 'recall_fake')}"
            for m in MEMBERS) + " |")
    lines += ["", "| seed | " + " | ".join(f"{m} clean AUC [95 % CI] / coverage" for m in MEMBERS) + " |",
              "|---|" + "---|" * len(MEMBERS)]
    for seed, s in zip(seeds, per_seed):
        clean = s["metrics"]["clean"]
        lines.append(f"| {seed} | " + " | ".join(
            f"{clean[m]['roc_auc']:.3f} [{clean[m]['roc_auc_ci95'][0]:.2f}, {clean[m]['roc_auc_ci95'][1]:.2f}] / "
            f"{clean[m].get('coverage', float('nan')):.2f}" for m in MEMBERS) + " |")
    return "\n".join(lines)


def goals(summary: dict, per_seed: list[dict]) -> dict:
    clean = {m: [s["metrics"]["clean"][m]["roc_auc"] for s in per_seed] for m in MEMBERS}
    q50 = summary["jpeg_q50"]

    def drop(m, key, row):
        return summary["clean"][m][key]["mean"] - summary[row][m][key]["mean"]

    return {
        "adapters_clean_auc_mean_ge_0.97": all(np.mean(clean[m]) >= 0.97 for m in ("method1", "method2")),
        "adapters_no_seed_below_0.95": all(min(clean[m]) >= 0.95 for m in ("method1", "method2")),
        "ensemble_at_least_better_member": bool(np.mean(clean["ensemble"]) >= max(
            np.mean(clean["method1"]), np.mean(clean["method2"])) - 1e-9),
        "method2_auc_ge_0.95_at_q50": q50["method2"]["roc_auc"]["mean"] >= 0.95,
        "method2_keeps_accuracy_at_q50": drop("method2", "accuracy", "jpeg_q50") <= 0.02,
        "method1_loses_more_at_q50_q30": (drop("method1", "accuracy", "jpeg_q50") > drop("method2", "accuracy", "jpeg_q50")
                                          and drop("method1", "recall_fake", "jpeg_q30")
                                          > drop("method2", "recall_fake", "jpeg_q30")),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--doc", help="replace the block between the experiment markers in this file "
                    "(docs/benchmarks.md)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import ray

    from aigd import config as C
    from aigd.dev.demo_data import write_demo_data
    from aigd.dev.tiny_model import ensure_tiny_model

    ensure_tiny_model(home() / "tiny-qwen2.5-vl")
    write_demo_data(C.load(C.DemoDataConfig, REPO / "configs/demo_data.yaml"))  # kept when already written
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "jobs"), os.environ.get("PYTHONPATH", "")])
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    t0 = time.perf_counter()
    per_seed, jobs = [], []
    for seed in args.seeds:
        adapters = {}
        for method in ("method1", "method2"):
            adapters[method], info = train(method, seed)
            jobs.append({"seed": seed, "method": method, **info})
        per_seed.append(evaluate(seed, adapters))
    ray.shutdown()
    from peers import plain_loop_samples_per_s

    plain = plain_loop_samples_per_s()
    summary = summarise(per_seed)
    md = table(summary, per_seed, args.seeds)
    rate = {m: float(np.median([j["train_samples_per_s"] for j in jobs if j["method"] == m]))
            for m in ("method1", "method2")}
    throughput = {"plain_loop_samples_per_s": round(plain, 1),
                  **{f"{m}_job_samples_per_s": round(r, 1) for m, r in rate.items()},
                  **{f"{m}_framework_ratio": round(r / plain, 2) for m, r in rate.items()}}
    md += (f"\n\nTraining throughput (validation excluded, median over seeds): Method 1 jobs "
           f"{throughput['method1_job_samples_per_s']} samples/s (preprocessed once), Method 2 jobs "
           f"{throughput['method2_job_samples_per_s']} samples/s (augmentation + JPEG redrawn every epoch on the "
           f"same CPUs); a plain single-process loop over the same model and batch on all CPUs, its batches "
           f"prepared beforehand, {throughput['plain_loop_samples_per_s']} samples/s: framework_ratio "
           f"{throughput['method1_framework_ratio']} (Method 1), {throughput['method2_framework_ratio']} (Method 2).")
    met = goals(summary, per_seed)
    md += "\n\nGoals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()) + "."
    md += "\n\nJobs: " + "; ".join(f"seed {j['seed']} {j['method']} {j['job_s']:.0f} s, {j['steps']} steps "
                                    f"(best at {j['best_step']})" for j in jobs) + \
          f". All in {(time.perf_counter() - t0) / 60:.0f} min on {os.cpu_count()} CPUs."
    print(md)
    if args.doc:
        path = Path(args.doc)
        text = path.read_text()
        block = f"{BEGIN}\n<!-- written by: python bench/experiment.py --seeds {' '.join(map(str, args.seeds))} "\
                f"--doc {args.doc} -->\n{md}\n{END}"
        path.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))
    out = {"summary": summary, "jobs": jobs, "goals": met, **throughput}
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
