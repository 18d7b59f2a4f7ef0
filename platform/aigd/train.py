"""Driver side of a training job: config, data plan, the TorchTrainer, export. The recipes in
jobs/train_method*.py call these in order; the loop every worker runs is `aigd.loop`.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.data
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from aigd import checkpoint
from aigd import config as C
from aigd.data import (COUNTER_NAMESPACE, LIGHT_STAGE_CPUS, LIGHT_STAGE_TASKS, build_dataset, configure_execution,
                       skip_counter, skipped_counts)
from aigd.ingest import VALIDATION_SETS, ValidationSplit
from aigd.loop import train_loop_per_worker
from aigd.manifest import new_manifest, read_manifest, write_adapter
from aigd.metrics import fit_calibration
from aigd.model import check_available, loaded_repo, lora_target_regex
from aigd.registry import Version
from aigd.sampling import SPLITS, Catalog, Subsample, balance, keep_sampled, stratified
from aigd.sources import is_remote, resolve_source


def load_config(description: str, preset: dict, argv=None) -> C.TrainJobConfig:
    """The method's preset (what makes it that method), then the YAML, then `a.b=c` overrides."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", required=True, help="YAML under configs/")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    args = ap.parse_args(argv)
    return C.load(C.TrainJobConfig, args.config, args.overrides, base=preset)


def init_ray(cfg: C.TrainJobConfig) -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS) or start a local one for `python jobs/...`."""
    # Ray Train 2.60 prints each print() of a worker twice: its print patch logs the line and, since Ray's workers
    # replace sys.stdout, also tees it there (ray/train/v2/_internal/logging/patch_print.py). Train passes this on
    # to its controller and workers; a print then goes to the worker's stdout once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    configure_execution(cfg.data)


def check_storage(cfg: C.TrainJobConfig, n_nodes: int) -> None:
    """On more than one node every path the job writes or reads must reach every node."""
    if n_nodes <= 1 or cfg.run.shared_storage:
        return
    local = [f"run.storage_path={cfg.run.storage_path}"] if not is_remote(cfg.run.storage_path) else []
    if cfg.data.source == "hub":
        local.append("data.source=hub (downloads into the driver's local cache)")
    elif not is_remote(cfg.data.path):
        local.append(f"data.path={cfg.data.path}")
    if local:
        raise C.ConfigError(
            f"this cluster has {n_nodes} nodes but {', '.join(local)} is local to one machine. Point them at "
            "storage every node reaches: AIGD_STORAGE=s3://bucket/aigd/runs (or gs://), data.path=s3://... for "
            "the parquet shards; or, for a mount every node has (NFS, Lustre), add run.shared_storage=true")


def check_cpus(cfg: C.TrainJobConfig, cluster_cpus: float) -> None:
    """Ray Data preprocesses and samples beside the training workers: a job whose workers take every CPU
    would wait forever for its first batch. A cluster the workers do not fit yet is left to the
    autoscaler (and to Ray Train's own wait)."""
    s = cfg.scaling
    held = s.num_workers * s.cpus_per_worker
    need = max(cfg.data.preprocess_cpus, LIGHT_STAGE_CPUS)
    if held <= cluster_cpus < held + need:
        raise C.ConfigError(
            f"scaling: {s.num_workers} worker(s) x {s.cpus_per_worker} CPUs hold {held:g} of this cluster's "
            f"{cluster_cpus:g} CPUs, and Ray Data needs {need:g} beside them (data.preprocess_cpus) or the job waits "
            f"forever for its first batch: lower scaling.cpus_per_worker (on CPU a worker runs its share rounded up "
            f"in threads: {max(0.0, cluster_cpus - need) / s.num_workers:g} CPUs each would fit) or add CPUs")


@dataclass
class DataPlan:
    catalog: Catalog  # the source's metadata, read once, with class, filter and split per row
    counts: dict  # split -> [real, fake] after filters, before balancing
    train_rows: int  # fed per epoch, after balancing
    balance: list  # per epoch: Subsample of the train split, or None
    val_subset: Subsample | None  # the in-loop validation subset (None: the whole val split)


def plan_data(cfg: C.TrainJobConfig) -> tuple[C.TrainJobConfig, DataPlan]:
    """The job's one metadata read: class counts per split, each epoch's undersampling, the
    validation subset; the datasets are built from the same catalog."""
    data = resolve_source(cfg.data)
    cfg = C.replace(cfg, data=data)
    cat = Catalog.read(data)
    counts = cat.counts()
    n_train = 2 * min(counts["train"]) if data.balance else sum(counts["train"])
    if n_train == 0:
        raise ValueError(f"no training rows survive the filters: {counts}")
    if min(counts["val"]) == 0:
        raise ValueError(f"the val split needs both classes for AUC and calibration: {counts['val']}")
    plan = DataPlan(cat, counts, n_train, [balance(cat, e) if data.balance else None for e in range(cfg.optim.epochs)],
                    stratified(cat, "val", cfg.optim.eval_samples))
    return cfg, plan


def counter_name(cfg: C.TrainJobConfig) -> str:
    return f"skipped-{cfg.run.name}"


def make_datasets(cfg: C.TrainJobConfig, plan: DataPlan) -> dict:
    """One lazy dataset per epoch (its randomness and balance keyed by the epoch); the validation
    subset preprocessed ONCE here (every evaluation reads the same rows); the whole val split for
    the final calibration pass."""
    processor = (cfg.model.name_or_path, cfg.model.revision)
    trainer_cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker

    def build(split, aug, epoch, sample):
        return build_dataset(plan.catalog, split, processor, cfg.image, aug, epoch, sample,
                             batch_size=cfg.optim.batch_size, counter=counter_name(cfg), reserved_cpus=trainer_cpus,
                             train_workers=cfg.scaling.num_workers)

    if cfg.data.cache_preprocessed:  # TrainJobConfig.validate: never with augmentation
        every = build("train", None, 0, None).materialize()  # decoded and encoded once
        ds = cached_epochs(every, plan.balance, plan.train_rows / max(1, sum(plan.counts["train"])))
    else:
        ds = {f"train_{e}": build("train", cfg.augment, e, plan.balance[e]) for e in range(cfg.optim.epochs)}
    ds["val"] = build("val", None, 0, plan.val_subset).materialize()
    ds["val_full"] = build("val", None, 0, None) if plan.val_subset is not None else ds["val"]
    return ds


def cached_epochs(every, balance: list, kept: float, store_share: float = 0.5) -> dict:
    """Each epoch's balanced sample of the cached train split. Drawn here and kept when all of them fit
    in `store_share` of the object store: drawn while the epoch streams, the sampling tasks and the
    coordinator's executor beside the training workers cost the Method 1 demo ~45 % of its training
    throughput on 2 CPUs (bench/peers.py --parts overhead). Larger runs draw each epoch as it streams."""
    def draw(sample):
        return every.map_batches(keep_sampled, fn_kwargs=dict(sample=sample), batch_format="numpy",
                                 num_cpus=LIGHT_STAGE_CPUS, compute=ray.data.TaskPoolStrategy(size=LIGHT_STAGE_TASKS))

    ahead = every.size_bytes() * kept * len(balance) <= store_share * ray.cluster_resources().get(
        "object_store_memory", 0)
    return {f"train_{e}": every if sample is None else draw(sample).materialize() if ahead else draw(sample)
            for e, sample in enumerate(balance)}


def steps_per_epoch(cfg: C.TrainJobConfig, n_rows: int) -> int:
    per_worker = n_rows // cfg.scaling.num_workers
    return max(1, math.ceil(per_worker / cfg.optim.batch_size) // cfg.optim.grad_accum)


def dist_backend(s: C.ScalingConfig) -> str:
    """The loop's own collectives use CPU tensors; on GPUs they need gloo beside NCCL. Ranks that
    share a GPU (gpus_per_worker < 1) get gloo alone: NCCL refuses two ranks on one device."""
    if s.backend != "auto":
        return s.backend
    return "cpu:gloo,cuda:nccl" if s.use_gpu and s.gpus_per_worker >= 1 else "gloo"


def make_trainer(cfg: C.TrainJobConfig, plan: DataPlan, datasets: dict, hooks=()):
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    loop_config = {"cfg": C.to_dict(cfg), "steps_per_epoch": steps_per_epoch(cfg, plan.train_rows),
                   "counter": counter_name(cfg), "hooks": list(hooks)}
    for ds in datasets.values():  # progress bars on the driver only: in training the loop reports progress
        ds.context.enable_progress_bars = False
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend=dist_backend(s)),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.run.train_log_level)),
        datasets=datasets,
        dataset_config=ValidationSplit(train=[k for k in datasets if k.startswith("train_")],
                                       validation=[k for k in VALIDATION_SETS if k in datasets]),
    )


def prepare_run(cfg: C.TrainJobConfig) -> tuple[C.TrainJobConfig, DataPlan]:
    """Driver-side set-up: storage reachable from every node, base model present, data planned."""
    check_storage(cfg, len([n for n in ray.nodes() if n.get("Alive")]))
    check_cpus(cfg, ray.cluster_resources().get("CPU", 0.0))
    if cfg.model.build_tiny:  # built once here, not by every worker at once
        check_available(cfg.model)
    elif cfg.scaling.use_gpu and cfg.model.backend != "hf":  # before any GPU is held: a revision Unsloth drops
        loaded_repo(cfg.model, "unsloth")
    cfg, plan = plan_data(cfg)
    skip_counter(counter_name(cfg))
    print(f"[{cfg.run.name}] data {cfg.data.source}:{cfg.data.path}")
    for split in SPLITS:
        real, fake = plan.counts[split]
        print(f"  {split:5s} real={real} fake={fake} (after label/size filters)")
    print(f"  train rows fed per epoch after balancing: {plan.train_rows} "
          f"({'undersampled' if cfg.data.balance else 'not balanced'}, redrawn each epoch)")
    subset = "the whole val split" if plan.val_subset is None else f"a fixed stratified subset of ~{cfg.optim.eval_samples}"
    print(f"  validation in the loop: {subset}, every {cfg.optim.eval_every_samples} samples and each epoch end")
    print(f"  {cfg.scaling.num_workers} worker(s), {steps_per_epoch(cfg, plan.train_rows)} optimizer steps/epoch, "
          f"{cfg.optim.epochs} epoch(s)", flush=True)
    return cfg, plan


# --------------------------------------------------------------------------- export


def export_adapter(cfg: C.TrainJobConfig, method: str, result, counts: dict, skipped: dict) -> Version:
    """The final checkpoint's adapter (best weights) with a manifest, calibrated on the whole val
    split, published as a new version under `run.export_dir` (the adapter's registry entry)."""
    if result.checkpoint is None:
        raise RuntimeError("training produced no checkpoint to export")
    with result.checkpoint.as_directory() as d:
        final = checkpoint.read_final(Path(d))
        manifest = new_manifest(
            method=method, base=final.base, policy=cfg.image,
            lora={"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                  "target_modules": lora_target_regex(cfg.lora)},
            training={"loss": cfg.optim.loss, "focal_alpha": cfg.optim.focal_alpha,
                      "focal_gamma": cfg.optim.focal_gamma, "lr": cfg.optim.lr, "scheduler": cfg.optim.scheduler,
                      "epochs": cfg.optim.epochs, "augment": C.to_dict(cfg.augment),
                      "best_step": final.loop_state["best_step"], "global_step": final.loop_state["global_step"],
                      "process_group": final.loop_state.get("process_group"),
                      "world_size": final.loop_state.get("world_size")},
            data={"source": cfg.data.source, "path": cfg.data.path, "class_counts": counts,
                  "skipped_unreadable": skipped,
                  "label_map": {str(k): v for k, v in cfg.data.label_map.items()}, "tampered": cfg.data.tampered,
                  "min_width": cfg.data.min_width, "balance": cfg.data.balance},
            val_metrics=final.val_metrics, calibration=fit_calibration(final.pair_logits, final.labels))
        return write_adapter(final.adapter, cfg.run.export_dir, manifest)


def finish_run(cfg: C.TrainJobConfig, method: str, plan: DataPlan, result) -> Version:
    skipped = skipped_counts(counter_name(cfg))
    ray.kill(ray.get_actor(counter_name(cfg), namespace=COUNTER_NAMESPACE))
    if result.error is not None:
        raise result.error
    out = export_adapter(cfg, method, result, plan.counts, skipped)
    manifest = read_manifest(out)
    vm, cal = manifest["val_metrics"], manifest["calibration"]
    print(f"[{cfg.run.name}] skipped unreadable images (counted per split): {skipped or 0}")
    print(f"[{cfg.run.name}] best weights on the whole val split ({vm.get('n')} images): auc "
          f"{vm.get('roc_auc', float('nan')):.4f} acc {vm.get('accuracy', float('nan')):.4f}; temperature "
          f"{cal['temperature']:.3f}, threshold {cal['threshold']:.3f}")
    print(f"[{cfg.run.name}] adapter exported: version {out.version} at {out.uri}")
    print(f"score images with it: aigd score --adapter {out.uri} IMAGE...")
    print(f"put it in front of a running app: aigd promote {out.name} {out.version} --app URL")
    return out


def run(method: str, preset: dict, description: str, argv=None, hooks=()) -> Version:
    """A recipe, top to bottom: what jobs/train_method*.py run with their own preset. `hooks`
    (`aigd.loop.TrainerHook`) reach every worker's Trainer: the restart tests inject faults so."""
    cfg = load_config(description, preset, argv)  # preset <- YAML <- a.b=c overrides
    init_ray(cfg)
    cfg, plan = prepare_run(cfg)  # one metadata read: counts, balance per epoch, val subset
    trainer = make_trainer(cfg, plan, make_datasets(cfg, plan), hooks)
    result = trainer.fit()  # checkpoints, resume and restarts are Ray Train's; the loop is aigd.loop's
    return finish_run(cfg, method, plan, result)  # calibrate on val, publish a new adapter version
