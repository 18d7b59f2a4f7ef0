"""The training loop both recipes run on every Ray Train worker, as a `Trainer`:
setup (model, optimizer, resume) -> train_epoch ... -> evaluate + checkpoint -> finish.

What differs between Method 1 and Method 2 is configuration (loss from `aigd.losses.LOSSES`,
schedule, epochs, augmentation), so the loop exists once and exact resume and worker restart are
tested once for both. The checkpoint format is `aigd.checkpoint`'s; validation is `aigd.validation`'s.
Decisions that all ranks must share (best score, early stop) are computed from the same gathered
validation scores on every rank, so no rank can disagree.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch

from aigd import checkpoint
from aigd import config as C
from aigd.data import Collate, skipped_counts
from aigd.forward import answer_logits
from aigd.losses import loss_fn
from aigd.model import autocast, grad_scaler, import_backend_first, load_for_training, precision
from aigd.prompt import label_token_ids
from aigd.validation import unwrap, validate

FINAL = "final"  # the metric key of the last report, whose checkpoint holds the exported adapter


@dataclass
class LoopState:
    """Everything besides weights/optimizer needed to continue a run exactly."""

    epoch: int = 0
    batches_done: int = 0  # micro-batches consumed in `epoch`
    global_step: int = 0  # optimizer steps
    samples: int = 0  # training samples consumed by all ranks (the evaluation schedule's clock)
    next_eval_at: int = 0
    best_score: float = -1.0
    best_step: int = -1
    evals_since_best: int = 0
    last_eval_step: int = -1  # so a resumed epoch end does not evaluate the same step twice
    finished: bool = False
    history: list = field(default_factory=list)
    process_group: str = ""  # torch.distributed's backend as the ranks set it up (the last start's)
    world_size: int = 1


class TrainerHook:
    """Called by the Trainer at its seams. Tests install hooks (`aigd.dev.faults`) to inject
    failures; production runs have none."""

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def during_checkpoint(self, trainer: "Trainer") -> None:
        """Rank 0, with the first file of a checkpoint written and the rest not."""


def cpu_threads(s: C.ScalingConfig) -> int:
    """A CPU worker's torch threads: its CPU share rounded up (1.5 CPUs run 2 threads and leave half a
    CPU to Ray Data on a 2-CPU node)."""
    return max(1, math.ceil(s.cpus_per_worker - 1e-9))


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


def ddp_trainable_only(model):
    """Tell DDP to leave the frozen base and the buffers alone. Every rank loads the base from the same
    files, so DDP's start-up broadcast of it from rank 0 (5-8 GB of 4-bit base, pod to pod, on every
    (re)start) would copy what each rank already holds; the buffers (rotary tables) are constant, and
    syncing them before every forward would add a collective. Only the LoRA parameters are
    broadcast and all-reduced."""
    fixed = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, fixed)
    return model


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


class Progress:
    """Training throughput (validation time excluded) and a progress line every N steps."""

    def __init__(self, total_steps: int, every: int):
        self.total, self.every, self.t0, self.samples, self.paused = total_steps, max(1, every), time.time(), 0, 0.0
        self.steps = 0
        self.data_wait = 0.0  # seconds the loop waited for its next training batch

    def waited(self, batches):
        """The batches, timing each wait for the next one (the data pipeline not keeping up)."""
        it = iter(batches)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            self.data_wait += time.perf_counter() - t
            if batch is None:
                return
            yield batch

    @contextlib.contextmanager
    def pause(self):
        t = time.time()
        yield
        self.paused += time.time() - t

    def samples_per_s(self) -> float:
        return self.samples / max(1e-9, time.time() - self.t0 - self.paused)

    def line(self, state: LoopState, loss: float, lr: float, epochs: int) -> str | None:
        self.steps += 1
        if state.global_step % self.every and state.global_step != self.total:
            return None
        rate = self.steps / max(1e-9, time.time() - self.t0)
        eta = (self.total - state.global_step) / rate if rate else float("nan")
        return (f"epoch {state.epoch + 1}/{epochs} step {state.global_step}/{self.total} loss {loss:.4f} "
                f"lr {lr:.2e} {self.samples_per_s():.1f} samples/s ETA {eta:.0f}s")


class Trainer:
    """One worker's part of a training run. `fit()` is the whole recipe; each method is one stage."""

    def __init__(self, config: dict):
        self.job = config
        self.cfg = C.from_dict(C.TrainJobConfig, config["cfg"])
        self.o = self.cfg.optim
        self.hooks: list[TrainerHook] = list(config.get("hooks", ()))
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        quiet_report_log(self.cfg.run.train_log_level)
        self.state, self.best, self.restored = LoopState(next_eval_at=self.o.eval_every_samples), None, None

    def fit(self) -> None:
        self.setup()
        stop = self.state.finished or self.state.global_step >= self.total_steps
        while self.state.epoch < self.o.epochs and not stop:
            stop = self.train_epoch()
        if not self.state.finished:
            self.finish()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg, o = self.cfg, self.o
        self.backend = import_backend_first(cfg.model)  # Unsloth must patch transformers before it is imported
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg.scaling))
        seed_everything(o.seed)
        self.model, processor, self.base_info = load_for_training(cfg.model, cfg.lora, self.device)
        self.label_ids = label_token_ids(processor.tokenizer)
        self.loss_of, self.to_batch = loss_fn(o), Collate.of(processor)
        self.amp = autocast(cfg.model, self.device)
        self.scaler = grad_scaler(cfg.model, self.device)
        self.total_steps = self.job["steps_per_epoch"] * o.epochs if o.max_steps is None else o.max_steps
        self.opt, self.sched = make_optimizer(self.model, o, self.total_steps)
        self.per_step = o.batch_size * o.grad_accum * self.world
        self.resume()
        self.state.process_group = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        self.state.world_size = self.world
        if self.world > 1:
            self.model = ray.train.torch.prepare_model(ddp_trainable_only(self.model), move_to_device=False)
        self.model.train()
        self.split_ahead(self.state.epoch - 1)
        self.progress = Progress(self.total_steps, o.log_every)
        self.say(f"[{cfg.run.name}] {self.world} worker(s) on {self.device.type} ({self.state.process_group}), "
                 f"backend {self.backend}, precision "
                 f"{precision(cfg.model, self.device)}, loss {o.loss}, {self.per_step} samples per "
                 f"optimizer step, {self.total_steps} steps")

    def resume(self) -> None:
        self.restored = ray.train.get_checkpoint()
        if self.restored is None:
            return
        with self.restored.as_directory() as d:
            saved = checkpoint.load(Path(d))
        load_trainable(self.model, saved.trainable)
        self.opt.load_state_dict(saved.optimizer)
        self.sched.load_state_dict(saved.scheduler)
        if saved.scaler:
            self.scaler.load_state_dict(saved.scaler)
        self.state, self.best = LoopState(**saved.loop_state), saved.best
        s = self.state
        self.say(f"resumed at epoch {s.epoch + 1} batch {s.batches_done} step {s.global_step}")

    # ------------------------------------------------------------------ training

    def shard(self, name: str):
        # device="cpu": labels and counters stay on the CPU (Ray would move every tensor to the GPU);
        # answer_logits moves the model inputs itself.
        return ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=self.o.batch_size,
                                                                    collate_fn=self.to_batch, device="cpu")

    def split_ahead(self, epoch: int) -> None:
        """Have the datasets this run reads next split while this epoch trains. Ray Train splits a
        dataset at its first get_dataset_shard, starting a split coordinator (an actor: a process to
        start) that the first batch then waits for; on 2 CPUs that was 2-3 s of every epoch."""
        later = [f"train_{epoch + 1}"] if epoch + 1 < self.o.epochs else ["val_full"]
        for name in ["val", *later]:
            ray.train.get_dataset_shard(name)

    def train_epoch(self) -> bool:
        """One epoch from where the state says it stands; True: the run is done (steps or early stop)."""
        s, o = self.state, self.o
        epoch, skip, fed, self.running = s.epoch, s.batches_done, torch.zeros(2), []
        stop = False
        for i, batch in enumerate(self.progress.waited(self.shard(f"train_{epoch}"))):
            if i < skip:
                continue  # consumed before the checkpoint we resumed from
            if i == skip:
                self.split_ahead(epoch)
            fed += torch.bincount(batch["label"], minlength=2).float()
            if not self.micro_batch(i, batch):
                continue
            if s.samples >= s.next_eval_at or s.global_step >= self.total_steps:
                stop = self.evaluate(epoch)
            if stop or s.global_step >= self.total_steps:
                stop = True
                break
        # Micro-batches of an accumulation the epoch cut short never reach the next epoch's step.
        self.opt.zero_grad(set_to_none=True)
        self.report_fed(epoch, fed)
        if not stop:
            s.epoch, s.batches_done = epoch + 1, 0
            if s.last_eval_step != s.global_step:
                stop = self.evaluate(epoch)
        return stop

    def micro_batch(self, i: int, batch: dict) -> bool:
        """Forward and backward of one micro-batch; True when it completed an optimizer step."""
        o = self.o
        labels = batch["label"].to(self.device)
        step_now = (i + 1) % o.grad_accum == 0
        # Accumulating micro-batches need no gradient all-reduce; the stepping one does it.
        sync = contextlib.nullcontext() if step_now or self.world == 1 else self.model.no_sync()
        with sync:
            with self.amp:
                logits = answer_logits(self.model, batch)
            loss = self.loss_of(logits, labels, self.label_ids)
            self.scaler.scale(loss / o.grad_accum).backward()
        self.running.append(loss.item())
        self.state.batches_done = i + 1
        self.progress.samples += len(labels) * self.world
        if step_now:
            self.optimizer_step()
        return step_now

    def optimizer_step(self) -> None:
        self.scaler.unscale_(self.opt)  # clip the true gradients (a no-op unless fp16 scales the loss)
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.o.grad_clip)
        self.scaler.step(self.opt)  # skips the step when fp16 gradients overflowed
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.state.samples += self.per_step
        for hook in self.hooks:
            hook.after_step(self)
        line = self.progress.line(self.state, self.mean_loss(), self.sched.get_last_lr()[0], self.o.epochs)
        if line:
            self.say(line)

    def mean_loss(self) -> float:
        return sum(self.running) / max(1, len(self.running))

    def report_fed(self, epoch: int, fed: torch.Tensor) -> None:
        if self.world > 1:
            torch.distributed.all_reduce(fed)
        self.say(f"epoch {epoch + 1} fed real={int(fed[0])} fake={int(fed[1])}")

    # ------------------------------------------------------------------ evaluation and checkpoints

    def evaluate(self, epoch: int) -> bool:
        """Validate on the fixed subset, checkpoint (rank 0), report (every rank); True: stop early."""
        s = self.state
        s.next_eval_at = s.samples + self.o.eval_every_samples
        metrics = {"loss": self.mean_loss(), "lr": self.sched.get_last_lr()[0], "epoch": epoch,
                   "step": s.global_step, "train_samples_per_s": self.progress.samples_per_s(),
                   "data_wait_s": round(self.progress.data_wait, 2)}
        self.running = []
        with self.progress.pause():
            val = validate(self.model, self.shard("val"), self.label_ids, self.world, self.amp)
            s.last_eval_step = s.global_step
            score = val["metrics"].get("roc_auc", 0.0)
            if score > s.best_score:
                s.best_score, s.best_step, s.evals_since_best = score, s.global_step, 0
                self.best = trainable(self.model)
            else:
                s.evals_since_best += 1
            metrics.update(val_numbers(val))
            s.history.append({"step": s.global_step, "samples": s.samples, **metrics})
            self.checkpoint(metrics, val, final=False)
        return self.o.early_stop_patience is not None and s.evals_since_best >= self.o.early_stop_patience

    def checkpoint(self, metrics: dict, val: dict, final: bool) -> None:
        """Rank 0 writes the checkpoint; every rank reports (Ray Train needs all ranks to)."""
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                metrics["skipped_images"] = sum(skipped_counts(self.job["counter"]).values())
                self.say(f"{'final (whole val split, best weights)' if final else 'eval'} step "
                         f"{self.state.global_step}: auc {val['metrics'].get('roc_auc', float('nan')):.4f} "
                         f"acc {val['metrics'].get('accuracy', float('nan')):.4f} "
                         f"(best {self.state.best_score:.4f} @ {self.state.best_step})")
                checkpoint.save(Path(tmp), trainable=trainable(self.model), best=self.best, optimizer=self.opt,
                                scheduler=self.sched, scaler=self.scaler, loop_state=self.state.__dict__,
                                config=self.job["cfg"], base=self.base_info, val=val,
                                export=unwrap(self.model).save_pretrained if final else None,
                                after_first_file=self.during_checkpoint)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    def during_checkpoint(self) -> None:
        for hook in self.hooks:
            hook.during_checkpoint(self)

    def finish(self) -> None:
        """The best weights on the whole validation split: what the export calibrates on."""
        if self.best is not None:
            load_trainable(self.model, self.best)
        # Each rank scores its part of the streamed split: the pass costs 1/world of the whole.
        val = validate(self.model, self.shard("val_full"), self.label_ids, self.world, self.amp)
        self.state.finished = True
        self.checkpoint({"step": self.state.global_step, "best_step": self.state.best_step, FINAL: 1,
                         **val_numbers(val)}, val, final=True)

    def say(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)


def quiet_report_log(level: str) -> None:
    """Ray 2.60 logs every report (its whole metrics dict, once per rank) under a logger named by its
    file path, outside `ray.train`, so `run.train_log_level` (Ray Train's LoggingConfig) misses it."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)


def val_numbers(val: dict) -> dict:
    return {f"val_{k}": v for k, v in val["metrics"].items() if isinstance(v, (int, float))}


def train_loop_per_worker(config: dict) -> None:
    Trainer(config).fit()
