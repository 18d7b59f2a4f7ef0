"""Building blocks the training recipes (jobs/train_method*.py) call. No trainer class on purpose:
each recipe reads top to bottom and picks what it needs from here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aigd import config as C
from aigd.data import (SPLITS, balance_cuts, build_dataset, class_counts, configure_execution, metadata,
                       resolve_source)
from aigd.metrics import accuracy_threshold, binary_metrics, ece, fit_temperature, sigmoid_p, threshold_at_fpr

log = logging.getLogger("aigd.train")


# --------------------------------------------------------------------------- driver side


def parse_args(description: str, argv=None) -> C.TrainJobConfig:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", required=True, help="YAML under configs/")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    args = ap.parse_args(argv)
    return C.load(C.TrainJobConfig, args.config, args.overrides)


def init_ray(cfg: C.TrainJobConfig) -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS) or start a local one for `python jobs/...`."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    configure_execution(cfg.data)
    ray.data.DataContext.get_current().enable_progress_bars = False


@dataclass
class DataPlan:
    counts: dict  # split -> [real, fake] after filters, before balancing
    per_epoch: list  # train rows fed per epoch after balancing
    cuts: list  # per epoch (cut_real, cut_fake)


def plan_data(cfg: C.TrainJobConfig) -> tuple[C.TrainJobConfig, DataPlan]:
    """One metadata pass: class counts per split and each epoch's undersampling thresholds."""
    data = resolve_source(cfg.data)
    cfg = C.replace(cfg, data=data)
    table = metadata(data)
    counts = class_counts(data, table)
    cuts = [balance_cuts(data, table, "train", e) if data.balance else None for e in range(cfg.optim.epochs)]
    n_train = 2 * min(counts["train"]) if data.balance else sum(counts["train"])
    if n_train == 0:
        raise ValueError(f"no training rows survive the filters: {counts}")
    return cfg, DataPlan(counts, [n_train] * cfg.optim.epochs, cuts)


def make_datasets(cfg: C.TrainJobConfig, plan: DataPlan) -> dict:
    """One lazy dataset per epoch (its randomness and balance sample keyed by the epoch) + validation."""
    path = cfg.model.name_or_path
    counter = counter_name(cfg)
    ds = {f"train_{e}": build_dataset(cfg.data, "train", path, cfg.image, cfg.augment, e, plan.cuts[e],
                                      batch_size=cfg.optim.batch_size, counter=counter)
          for e in range(cfg.optim.epochs)}
    ds["val"] = build_dataset(cfg.data, "val", path, cfg.image, None, 0, None, batch_size=cfg.optim.batch_size,
                              counter=counter)
    return ds


def counter_name(cfg: C.TrainJobConfig) -> str:
    return f"skipped-{cfg.run.name}"


def steps_per_epoch(cfg: C.TrainJobConfig, n_rows: int) -> int:
    per_worker = n_rows // cfg.scaling.num_workers
    return max(1, math.ceil(per_worker / cfg.optim.batch_size) // cfg.optim.grad_accum)


def make_trainer(cfg: C.TrainJobConfig, plan: DataPlan, loop, datasets: dict):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    loop_config = {"cfg": C.to_dict(cfg), "steps_per_epoch": steps_per_epoch(cfg, plan.per_epoch[0]),
                   "counts": plan.counts}
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep,
                                                         checkpoint_score_attribute="val_score",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[k for k in datasets if k.startswith("train_")]),
    )


# --------------------------------------------------------------------------- worker side


@dataclass
class LoopState:
    """Everything besides weights/optimizer needed to continue a run exactly."""

    epoch: int = 0
    batches_done: int = 0  # micro-batches consumed in `epoch`
    global_step: int = 0  # optimizer steps
    best_score: float = -1.0
    best_step: int = -1
    evals_since_best: int = 0
    samples_seen: int = 0
    history: list = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model, optim: C.OptimConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    warmup = int(optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.scheduler == "linear":
            return 1.0 - progress
        if optim.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def unwrap(model):
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path: Path, model, opt, sched, state: LoopState, cfg_dict: dict, val: dict | None) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    inner = unwrap(model)
    save_file({n: p.detach().cpu().contiguous() for n, p in inner.named_parameters() if p.requires_grad},
              str(path / "trainable.safetensors"))
    inner.save_pretrained(str(path / "adapter"), safe_serialization=True)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}},
               path / "training_state.pt")
    (path / "loop_state.json").write_text(json.dumps(state.__dict__))
    (path / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    if val is not None:
        np.savez(path / "val_predictions.npz", pair_logits=val["pair_logits"], labels=val["labels"])
        (path / "val_metrics.json").write_text(json.dumps(val["metrics"], indent=2))


def load_checkpoint(path: Path, model, opt, sched) -> LoopState:
    from safetensors.torch import load_file

    inner = unwrap(model)
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(inner.named_parameters())
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    blob = torch.load(path / "training_state.pt", weights_only=False)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    np.random.set_state(blob["rng"]["numpy"])
    random.setstate(blob["rng"]["python"])
    return LoopState(**json.loads((path / "loop_state.json").read_text()))


@torch.no_grad()
def evaluate(model, batches, label_ids) -> dict:
    """Pair logits and labels over an iterator of collated batches, plus metrics at 0.5."""
    from aigd.scoring import answer_logits, pair_logits

    model = unwrap(model)  # DDP's forward would broadcast buffers, a collective the other ranks never join
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(pair_logits(answer_logits(model, batch), label_ids).cpu().numpy())
        labels.append(batch["label"].numpy())
    model.train(was_training)
    z = np.concatenate(logits) if logits else np.zeros((0, 2))
    y = np.concatenate(labels) if labels else np.zeros(0, int)
    return {"pair_logits": z, "labels": y, "metrics": binary_metrics(y, sigmoid_p(z)) if len(y) else {}}


def eval_checkpoint_report(model, opt, sched, state: LoopState, cfg_dict: dict, metrics: dict, val_batches,
                           label_ids, patience: int) -> bool:
    """Evaluate, checkpoint (rank 0) and report (every rank). Returns True on every rank to stop early."""
    import tempfile

    import ray.train

    from aigd.data import skipped_counts

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    # Every rank evaluates the full validation set, so all ranks run the same collectives in the
    # same order; only rank 0 writes the checkpoint.
    val = evaluate(model, val_batches, label_ids)
    score = val["metrics"].get("roc_auc", 0.0)
    if score > state.best_score:
        state.best_score, state.best_step, state.evals_since_best = score, state.global_step, 0
    else:
        state.evals_since_best += 1
    metrics.update({f"val_{k}": v for k, v in val["metrics"].items() if isinstance(v, (int, float))})
    metrics["val_score"] = score
    stop = torch.tensor([float(state.evals_since_best >= patience)])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            metrics["skipped_images"] = sum(skipped_counts(counter_name(C.from_dict(C.TrainJobConfig, cfg_dict)))
                                            .values())
            state.history.append({"step": state.global_step, **metrics})
            print(f"eval step {state.global_step}: auc {score:.4f} acc {val['metrics']['accuracy']:.4f} "
                  f"f1 {val['metrics']['f1']:.4f} (best {state.best_score:.4f} @ {state.best_step})", flush=True)
            save_checkpoint(Path(tmp), model, opt, sched, state, cfg_dict, val)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
    if world > 1:
        torch.distributed.broadcast(stop, src=0)  # float noise must not split the ranks' decisions
    return bool(stop.item())


class Progress:
    """A progress line every N steps with throughput and ETA, for the job log."""

    def __init__(self, total_steps: int, every: int):
        self.total, self.every, self.t0, self.samples = total_steps, max(1, every), time.time(), 0

    def line(self, state: LoopState, loss: float, lr: float, epochs: int) -> str | None:
        if state.global_step % self.every and state.global_step != self.total:
            return None
        dt = max(1e-9, time.time() - self.t0)
        rate = state.global_step / dt if state.global_step else 0.0
        eta = (self.total - state.global_step) / rate if rate else float("nan")
        return (f"epoch {state.epoch + 1}/{epochs} step {state.global_step}/{self.total} loss {loss:.4f} "
                f"lr {lr:.2e} {self.samples / dt:.1f} samples/s ETA {eta:.0f}s")


# --------------------------------------------------------------------------- export


def export_adapter(cfg: C.TrainJobConfig, result, counts: dict) -> Path:
    """Write the best checkpoint's adapter with a manifest (incl. calibration fit on validation)."""
    from transformers import AutoConfig

    from aigd.manifest import base_fingerprint, policy_dict, write_adapter
    from aigd.model import lora_target_regex

    best = None
    if result.best_checkpoints:
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_score", -1))[0]
    ckpt = best or result.checkpoint
    if ckpt is None:
        raise RuntimeError("training produced no checkpoint to export")
    with ckpt.as_directory() as d:
        d = Path(d)
        val = np.load(d / "val_predictions.npz")
        z, y = val["pair_logits"], val["labels"]
        temperature = fit_temperature(z, y) if len(np.unique(y)) == 2 else 1.0
        p_cal = sigmoid_p(z, temperature)
        calibration = {
            "temperature": temperature, "threshold": accuracy_threshold(y, p_cal),
            "threshold_rule": "max validation accuracy",
            "threshold_at_fpr_0.05": threshold_at_fpr(y, p_cal, 0.05),
            "ece_before": ece(y, sigmoid_p(z)), "ece_after": ece(y, p_cal), "n_val": int(len(y)),
        }
        loop_state = json.loads((d / "loop_state.json").read_text())
        base_cfg = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision)
        manifest = {
            "method": cfg.method,
            "base_model": cfg.model.name_or_path, "base_revision": cfg.model.revision,
            "base_fingerprint": base_fingerprint(base_cfg),
            "image_policy": policy_dict(cfg.image),
            "label_words": ["Real", "Fake"], "label_map": {str(k): v for k, v in cfg.data.label_map.items()},
            "tampered": cfg.data.tampered,
            "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                     "target_modules": lora_target_regex(cfg.lora)},
            "training": {"loss": cfg.optim.loss, "focal_alpha": cfg.optim.focal_alpha,
                         "focal_gamma": cfg.optim.focal_gamma, "lr": cfg.optim.lr, "scheduler": cfg.optim.scheduler,
                         "epochs": cfg.optim.epochs, "augment": C.to_dict(cfg.augment),
                         "best_step": loop_state["best_step"], "global_step": loop_state["global_step"]},
            "data": {"source": cfg.data.source, "path": cfg.data.path, "class_counts": counts,
                     "min_width": cfg.data.min_width, "balance": cfg.data.balance},
            "val_metrics": json.loads((d / "val_metrics.json").read_text()),
            "calibration": calibration,
        }
        out = write_adapter(d / "adapter", Path(cfg.run.export_dir), manifest)
    return out


def prepare_run(cfg: C.TrainJobConfig) -> tuple[C.TrainJobConfig, DataPlan]:
    """Driver-side set-up shared by both recipes: base model present, data planned and summarised."""
    from aigd.data import skip_counter

    if cfg.model.build_tiny:
        from aigd.tiny_model import ensure_tiny_model

        ensure_tiny_model(cfg.model.name_or_path)
    cfg, plan = plan_data(cfg)
    skip_counter(counter_name(cfg))
    print(f"[{cfg.run.name}] data {cfg.data.source}:{cfg.data.path}")
    for split in SPLITS:
        real, fake = plan.counts[split]
        print(f"  {split:5s} real={real} fake={fake} (after label/size filters)")
    print(f"  train rows fed per epoch after balancing: {plan.per_epoch[0]} "
          f"({'undersampled' if cfg.data.balance else 'not balanced'}, redrawn each epoch)")
    print(f"  {cfg.scaling.num_workers} worker(s), {steps_per_epoch(cfg, plan.per_epoch[0])} optimizer steps/epoch, "
          f"{cfg.optim.epochs} epoch(s)", flush=True)
    return cfg, plan


def finish_run(cfg: C.TrainJobConfig, plan: DataPlan, result) -> Path:
    import ray

    from aigd.data import COUNTER_NAMESPACE, skipped_counts

    skipped = skipped_counts(counter_name(cfg))
    ray.kill(ray.get_actor(counter_name(cfg), namespace=COUNTER_NAMESPACE))
    if result.error is not None:
        raise result.error
    out = export_adapter(cfg, result, plan.counts)
    manifest = json.loads((out / "manifest.json").read_text())
    vm = manifest["val_metrics"]
    print(f"[{cfg.run.name}] skipped unreadable images (counted per split, all epochs): {skipped or 0}")
    print(f"[{cfg.run.name}] best validation: auc {vm.get('roc_auc', float('nan')):.4f} "
          f"acc {vm.get('accuracy', float('nan')):.4f} f1 {vm.get('f1', float('nan')):.4f}; "
          f"temperature {manifest['calibration']['temperature']:.3f}")
    print(f"[{cfg.run.name}] adapter exported to {out}")
    print(f"score images with it: aigd score --model {cfg.model.name_or_path} --adapter {out} "
          f"--image max_pixels={cfg.image.max_pixels} IMAGE...")
    return out
