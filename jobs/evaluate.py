"""Evaluate adapters and their ensemble: metrics, robustness sweep, calibration, shortcut audit, report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/evaluate.py --config configs/eval_demo.yaml
    python jobs/evaluate.py --config configs/eval_demo.yaml split=val calibrate=true

Reads the split (same hash split as training) or a whole parquet / image folder (split=all),
decodes each image once and scores it clean and after every perturbation with Ray Data batch
inference: an actor pool whose actors each hold one base model with every adapter.

Each adapter reference is pinned to one registry version at the start; calibration publishes new
versions (same weights, new calibration) and the split is scored with those. Every evaluated
version gets the figures recorded beside it in the registry, keyed by the evaluation set, which is
what `aigd promote` compares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from aigd import config as C
from aigd import registry
from aigd import report as R
from aigd import evaluation as E
from aigd import explain_eval, explain_report
from aigd.data import configure_execution, planned_rows
from aigd.manifest import policy_for, recalibrated
from aigd.sampling import Catalog, unit_hash
from aigd.sources import image_bytes, metadata, resolve_source, row_blocks, shards, with_images


def parse_args(argv=None) -> C.EvalConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. split=val bootstrap=500")
    args = ap.parse_args(argv)
    cfg = C.load(C.EvalConfig, args.config, args.overrides)  # validated on load
    cfg = C.replace(cfg, adapters={n: registry.resolve(r).uri for n, r in cfg.adapters.items()})  # pinned
    return C.replace(cfg, image=policy_for(cfg))  # the expand stage prepares images before any Scorer exists


def with_groups(table: pa.Table, group_by: list[str]) -> pa.Table:
    """The metadata plus a string copy of each group_by column (`label` is rewritten to the class
    by selection; the copy keeps the dataset's own value)."""
    for col in group_by:
        table = table.append_column(E.GROUP + col, pa.array([str(v) for v in table.column(col).to_pylist()]))
    return table


def scoring_dataset(cfg: C.EvalConfig, cat: Catalog, split: str, perturbations: list[str]):
    """Ray Data: the split's planned rows -> decode + perturbations (tasks) -> Scorers (an actor pool)."""
    rows, files = planned_rows(cat, split, None)
    ds = rows.map_batches(E.expand_block, fn_kwargs=dict(cfg=cat.cfg, files=files, perturbations=perturbations,
                                                         policy=cfg.image, provenance=cfg.provenance),
                          batch_format="pyarrow", batch_size=None, num_cpus=cfg.decode_cpus)
    return ds.map_batches(E.ScoringActor, fn_constructor_kwargs=dict(cfg=C.to_dict(cfg)), batch_format="numpy",
                          batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.scorers),
                          num_cpus=cfg.scorer_cpus,
                          num_gpus=cfg.scorer_gpus or None)


class Progress:
    """A line every `every_s` while images are scored: done / total, rate, ETA (a SID_Set-scale
    evaluation runs for most of an hour)."""

    def __init__(self, split: str, total: int, every_s: float = 10.0):
        self.split, self.total, self.every_s = split, total, every_s
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.done / (now - self.t0)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(f"[evaluate] {self.split}: {self.done}/{self.total} images, {rate:.1f} images/s, "
                  f"ETA {eta / 60:.1f} min", flush=True)


def catalog(cfg: C.EvalConfig) -> Catalog:
    """The job's one metadata read, with the group_by columns."""
    data = resolve_source(cfg.data)
    return Catalog.of(data, with_groups(metadata(data, extra=cfg.group_by), cfg.group_by))


def score(cfg: C.EvalConfig, cat: Catalog, split: str, perturbations: list[str]) -> tuple[dict, int]:
    """All scores of one split as numpy columns, plus the number of images that could not be decoded."""
    rows_in = int(cat.in_split(split).sum())
    progress = Progress(split, rows_in)
    cols: dict[str, list] = {}
    for batch in scoring_dataset(cfg, cat, split, perturbations).iter_batches(batch_size=256, batch_format="numpy"):
        for k, v in batch.items():
            cols.setdefault(k, []).extend(list(v))
        progress.add(int(np.sum(batch["perturbation"] == perturbations[0])))
    scores = {k: np.asarray(v) for k, v in cols.items()}
    n_out = int(np.sum(scores["perturbation"] == perturbations[0])) if scores else 0
    return scores, rows_in - n_out


def calibrate(cfg: C.EvalConfig, cat: Catalog, extra: dict) -> C.EvalConfig:
    """Refit each adapter's temperature and thresholds on val; publish them as new versions, which
    the rest of the job scores."""
    val, _ = score(cfg, cat, "val", ["clean"])
    extra["calibration"] = E.calibration_report(val["label"], val, list(cfg.adapters), cfg.target_fpr)
    adapters = dict(cfg.adapters)
    for name, fitted in extra["calibration"].items():
        new = recalibrated(registry.resolve(adapters[name]), fitted, fitted_by="jobs/evaluate.py")
        adapters[name] = new.uri
        print(f"[calibration] {name}: T={fitted['temperature']:.3f} ECE {fitted['ece_before']:.3f} -> "
              f"{fitted['ece_after']:.3f}; threshold at FPR {cfg.target_fpr}: "
              f"{fitted['threshold_at_target_fpr']:.3f} (published as version {new.version})")
    return C.replace(cfg, adapters=adapters)


def evaluation_set(cfg: C.EvalConfig, cat: Catalog) -> dict:
    """What the figures were measured on: the same id means the same images (by img_id) of the same split."""
    ids = sorted(str(i) for i in np.asarray(cat.ids)[cat.in_split(cfg.split)])
    digest = hashlib.sha256(json.dumps([cfg.split, ids]).encode()).hexdigest()[:12]
    return {"id": f"{cfg.split}-{digest}", "split": cfg.split, "source": cfg.data.source, "path": cfg.data.path,
            "n_rows": len(ids), "perturbations": list(cfg.perturbations)}


def gated_figures(summary: dict, member: str) -> dict:
    """`<perturbation>.<metric>` -> value: the scalar figures of one member, as gates name them."""
    return {f"{pert}.{k}": v for pert, by_member in summary["metrics"].items()
            for k, v in by_member.get(member, {}).items() if isinstance(v, (int, float))}


def record(cfg: C.EvalConfig, evalset: dict, summary: dict, report: Path) -> None:
    for name, uri in cfg.adapters.items():
        where = registry.record_evaluation(registry.resolve(uri), evalset, gated_figures(summary, name), str(report))
        print(f"[evaluate] {name}: figures recorded for version {registry.resolve(uri).version} ({where})")


def _read(cat: Catalog, idx: np.ndarray, columns: tuple[str, ...]) -> list[tuple]:
    """(img_id, *columns as bytes) of the given catalog rows."""
    rows = cat.table.take(pa.array(np.sort(idx)))
    files = shards(cat.cfg)
    out = []
    for block in row_blocks(rows, 64):
        block = with_images(cat.cfg, files, block, columns)
        out += zip(block.column("img_id").to_pylist(), *(image_bytes(block.column(c).to_pylist()) for c in columns))
    return out


def explanation_rows(cfg: C.EvalConfig, cat: Catalog) -> tuple[list, list]:
    """The fixed subsets (by a hash of img_id): `explain.fakes` fakes of the split, and
    `explain.tampered` tampered rows (label_map: tampered) of any split with a stored mask."""
    draw = unit_hash(cat.ids, "explain")
    fakes = np.flatnonzero(cat.in_split(cfg.split) & (cat.cls == 1))
    fakes = fakes[np.argsort(draw[fakes])][:cfg.explain.fakes]
    codes = [int(k) for k, v in cat.cfg.label_map.items() if v == "tampered"]
    tampered = np.flatnonzero(np.isin(cat.table.column("label").to_numpy(), codes)
                              & (cat.table.column("width").to_numpy() >= cat.cfg.min_width))
    tampered = tampered[np.argsort(draw[tampered])][:2 * cfg.explain.tampered]  # some may lack a mask
    with_mask = [r for r in _read(cat, tampered, ("image", "mask")) if r[2] is not None][:cfg.explain.tampered]
    return _read(cat, fakes, ("image",)), with_mask


def explanations(cfg: C.EvalConfig, cat: Catalog) -> dict:
    """Faithfulness and localization of the maps (aigd.explain_eval), in one task with one Scorer."""
    t0 = time.perf_counter()
    fakes, tampered = explanation_rows(cfg, cat)
    if not fakes:
        raise SystemExit(f"explain: no fakes in split {cfg.split!r}")
    task = ray.remote(num_cpus=cfg.scorer_cpus, num_gpus=cfg.scorer_gpus or None)(explain_eval.evaluate)
    figures = ray.get(task.remote(cfg, fakes, tampered))
    print(f"[evaluate] explanations: {len(fakes)} fakes, {len(tampered)} tampered rows with masks, "
          f"{len(cfg.adapters)} adapter(s) x {len(cfg.explain.methods)} method(s) in {time.perf_counter() - t0:.0f} s")
    return figures


def main(argv=None) -> Path:
    cfg = parse_args(argv)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    configure_execution(cfg.data)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    extra: dict = {"config": C.to_dict(cfg)}
    cat = catalog(cfg)
    if cfg.calibrate:
        cfg = calibrate(cfg, cat, extra)
        extra["config"] = C.to_dict(cfg)
    scores, unreadable = score(cfg, cat, cfg.split, list(cfg.perturbations))
    if not len(scores.get("label", [])):
        raise SystemExit(f"no readable images in split {cfg.split!r} of {cfg.data.path}")
    summary = E.summarize(scores, cfg)
    extra["shortcut_audit"] = E.shortcut_stats(scores)
    extra["unreadable_images"] = unreadable
    extra["n_images"] = int(np.sum(scores["perturbation"] == "clean"))
    out = Path(cfg.out_dir)
    extra["evaluation_set"] = evaluation_set(cfg, cat)
    sections = ()
    if cfg.explain.enabled:
        figures = explanations(cfg, cat)
        pictures = figures.pop("pictures")
        extra["explanations"] = figures
        out.mkdir(parents=True, exist_ok=True)
        sections = (explain_report.html_section(figures, pictures, out),)
    report = R.write_report(scores, summary, cfg, extra, out, sections)
    record(cfg, extra["evaluation_set"], summary, report)
    pq.write_table(pa.table(E.predictions(scores, cfg)), out / "predictions.parquet")
    print(f"\n{R.text_table(summary)}\n")
    if "explanations" in extra:
        print(f"{explain_report.text_table(extra['explanations'])}\n")
    print(f"{extra['n_images']} images ({unreadable} unreadable, skipped) x {len(cfg.perturbations)} perturbations "
          f"scored in {time.perf_counter() - t0:.0f} s")
    print(f"report: {report}\nmetrics: {out / 'metrics.json'}\nper-image answers: {out / 'predictions.parquet'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
