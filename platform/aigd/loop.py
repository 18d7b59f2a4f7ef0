"""The training loop both recipes run on every Ray Train worker: model -> loop -> validate -> checkpoint.

What differs between Method 1 and Method 2 is configuration (loss from `aigd.losses.LOSSES`,
schedule, epochs, augmentation), so the loop exists once and exact resume and worker restart are
tested once for both.

Collectives: every tensor handed to torch.distributed here is a CPU tensor, and on GPUs the
process group is "cpu:gloo,cuda:nccl" (`train.dist_backend`), so they go through gloo while DDP's
gradient buckets go through NCCL. Decisions that all ranks must share (best score, early stop) are
computed from the same gathered validation scores on every rank, so no rank can disagree.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aigd import config as C
from aigd.data import Collate, skipped_counts
from aigd.decision import p_fake
from aigd.losses import loss_fn
from aigd.metrics import binary_metrics
from aigd.model import autocast, import_backend_first, load_for_training, precision
from aigd.prompt import label_token_ids
from aigd.scoring import answer_logits, pair_logits

# Ray Train keeps the newest checkpoints; the best weights travel inside each one.
FINAL = "final"


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
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> tuple[torch.Tensor, dict]:
    """RNG states: torch's as a tensor, numpy's and Python's as JSON (so the checkpoint loads with
    torch.load(weights_only=True): no pickled objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return torch.get_rng_state(), {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
                                   "python": [version, list(internal), gauss_next]}


def _set_rng_state(torch_state: torch.Tensor, other: dict) -> None:
    torch.set_rng_state(torch_state)
    kind, keys, pos, has_gauss, gauss = other["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = other["python"]
    random.setstate((version, tuple(internal), gauss_next))


COMPLETE = "complete.json"  # written last: every file of the checkpoint with its size


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint whose writer died before it finished."""


def save_checkpoint(path: Path, model, opt, sched, state: LoopState, cfg_dict: dict, base: dict,
                    best: dict | None, val: dict | None, final: bool = False, die_midway: bool = False) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in trainable(model).items()}, str(path / "trainable.safetensors"))
    if die_midway:  # optim.fail_with=sigkill_in_checkpoint: a real kill with half the files written
        os.kill(os.getpid(), signal.SIGKILL)
    if best is not None:
        save_file({n: t.contiguous() for n, t in best.items()}, str(path / "best.safetensors"))
    torch_rng, other_rng = _rng_state()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch_rng},
               path / "training_state.pt")
    (path / "rng.json").write_text(json.dumps(other_rng))
    (path / "loop_state.json").write_text(json.dumps(state.__dict__))
    (path / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    (path / "base.json").write_text(json.dumps(base, indent=2))  # what the manifest says it was trained on
    if val is not None:
        np.savez(path / "val_predictions.npz", pair_logits=val["pair_logits"], labels=val["labels"])
        (path / "val_metrics.json").write_text(json.dumps(val["metrics"], indent=2))
    if final:  # the exported adapter: the best weights, as a peft folder
        unwrap(model).save_pretrained(str(path / "adapter"), safe_serialization=True)
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    (path / f"{COMPLETE}.tmp").write_text(json.dumps(files, indent=1))
    os.replace(path / f"{COMPLETE}.tmp", path / COMPLETE)


def check_complete(path: Path) -> None:
    """Refuse a checkpoint that was still being written (or copied) when its process died."""
    if not (path / COMPLETE).exists():
        raise IncompleteCheckpoint(f"checkpoint {path} has no {COMPLETE}: its writer died mid-write")
    listed = json.loads((path / COMPLETE).read_text())
    wrong = [f for f, size in listed.items() if not (path / f).is_file() or (path / f).stat().st_size != size]
    if wrong:
        raise IncompleteCheckpoint(f"checkpoint {path} is incomplete: {wrong} missing or truncated")


def load_checkpoint(path: Path, model, opt, sched) -> tuple[LoopState, dict | None]:
    from safetensors.torch import load_file

    check_complete(path)
    load_trainable(model, load_file(str(path / "trainable.safetensors")))
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").exists() else None
    blob = torch.load(path / "training_state.pt", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["torch_rng"], json.loads((path / "rng.json").read_text()))
    return LoopState(**json.loads((path / "loop_state.json").read_text())), best


# --------------------------------------------------------------------------- validation


def local_share(batches, rank: int, world: int):
    """(batch index, batch) for this rank's batches: every world-th, starting at its rank. Every rank
    must read the batches in the same order (a materialized dataset)."""
    for i, batch in enumerate(batches):
        if i % world == rank:
            yield i, batch


def merge_shares(shares: list[np.ndarray]) -> np.ndarray:
    """Rows [order, z_real, z_fake, label] from every rank, back in the unsharded order."""
    rows = np.concatenate([s for s in shares if len(s)]) if any(len(s) for s in shares) else np.zeros((0, 4))
    return rows[np.argsort(rows[:, 0], kind="stable")]


def gather_rows(rows: np.ndarray, world: int) -> list[np.ndarray]:
    """All ranks' rows on every rank, through CPU tensors (gloo), whatever each rank's count."""
    if world == 1:
        return [rows]
    import torch.distributed as dist

    n = torch.tensor([len(rows)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = torch.full((top, 4), float("nan"), dtype=torch.float64)
    padded[:len(rows)] = torch.from_numpy(rows)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[:int(s.item())].numpy() for o, s in zip(out, sizes)]


@torch.no_grad()
def validate(model, batches, label_ids, rank: int, world: int, amp, shard_batches: bool = True) -> dict:
    """Pair logits and labels of a validation set sharded by batch across ranks and gathered, in
    the unsharded order, plus metrics at 0.5; identical on every rank. shard_batches=False: each
    rank scores every batch it is given (the streamed whole val split goes to rank 0 alone, since
    an unmaterialized dataset has no order the ranks would agree on)."""
    inner = unwrap(model)  # DDP's forward would broadcast buffers, a collective the other ranks never join
    was_training = inner.training
    inner.eval()
    rows = []
    for i, batch in (local_share(batches, rank, world) if shard_batches else enumerate(batches)):
        with amp:
            z = pair_logits(answer_logits(inner, batch), label_ids).float().cpu().numpy()
        order = i * 1_000_000 + np.arange(len(z))
        rows.append(np.column_stack([order, z, batch["label"].numpy()]))
    inner.train(was_training)
    merged = merge_shares(gather_rows(np.concatenate(rows) if rows else np.zeros((0, 4)), world))
    z, y = merged[:, 1:3], merged[:, 3].astype(np.int64)
    return {"pair_logits": z, "labels": y, "metrics": binary_metrics(y, p_fake(z)) if len(y) else {}}


# --------------------------------------------------------------------------- the loop


class Progress:
    """Training throughput (validation time excluded) and a progress line every N steps."""

    def __init__(self, total_steps: int, every: int):
        self.total, self.every, self.t0, self.samples, self.paused = total_steps, max(1, every), time.time(), 0, 0.0
        self.steps = 0

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


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    # ---- config
    cfg = C.from_dict(C.TrainJobConfig, config["cfg"])
    o = cfg.optim
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    backend = import_backend_first(cfg.model)  # Unsloth must patch transformers before it is imported
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    seed_everything(o.seed)

    # ---- model
    model, processor, base_info = load_for_training(cfg.model, cfg.lora, device)
    label_ids = label_token_ids(processor.tokenizer)
    loss_of = loss_fn(o)
    amp = autocast(cfg.model, device, backend)
    to_batch = Collate.of(processor)
    total_steps = config["steps_per_epoch"] * o.epochs if o.max_steps is None else o.max_steps
    opt, sched = make_optimizer(model, o, total_steps)
    per_step = o.batch_size * o.grad_accum * world

    # ---- resume
    state, best, restored = LoopState(next_eval_at=o.eval_every_samples), None, ray.train.get_checkpoint()
    kill_in_checkpoint = False
    if restored is not None:
        with restored.as_directory() as d:
            state, best = load_checkpoint(Path(d), model, opt, sched)
        if rank == 0:
            print(f"resumed at epoch {state.epoch + 1} batch {state.batches_done} step {state.global_step}")
    if world > 1:
        # Buffers (rotary tables) are constant; broadcasting them every forward only adds a collective.
        model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy_kwargs={"broadcast_buffers": False})
    model.train()
    if rank == 0:
        print(f"[{cfg.run.name}] {world} worker(s) on {device.type}, backend {backend}, precision "
              f"{precision(cfg.model, device, backend)}, loss {o.loss}, {per_step} samples per optimizer step, "
              f"{total_steps} steps", flush=True)

    def shard(name: str):
        # device="cpu": labels and counters stay on the CPU (Ray would move every tensor to the GPU);
        # answer_logits moves the model inputs itself.
        return ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=o.batch_size, collate_fn=to_batch,
                                                                    device="cpu")

    def evaluate_and_checkpoint(metrics: dict) -> bool:
        """Validate on the fixed subset, checkpoint (rank 0), report (every rank); True: stop early."""
        metrics["train_samples_per_s"] = progress.samples_per_s()
        with progress.pause():
            return _evaluate_and_checkpoint(metrics)

    def _evaluate_and_checkpoint(metrics: dict) -> bool:
        nonlocal best
        val = validate(model, shard("val"), label_ids, rank, world, amp)
        state.last_eval_step = state.global_step
        score = val["metrics"].get("roc_auc", 0.0)
        if score > state.best_score:
            state.best_score, state.best_step, state.evals_since_best = score, state.global_step, 0
            best = trainable(model)
        else:
            state.evals_since_best += 1
        metrics.update({f"val_{k}": v for k, v in val["metrics"].items() if isinstance(v, (int, float))})
        state.history.append({"step": state.global_step, "samples": state.samples, **metrics})
        _report(metrics, val, final=False)
        return o.early_stop_patience is not None and state.evals_since_best >= o.early_stop_patience

    def _report(metrics: dict, val: dict, final: bool) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                metrics["skipped_images"] = sum(skipped_counts(config["counter"]).values())
                print(f"{'final (whole val split, best weights)' if final else 'eval'} step {state.global_step}: "
                      f"auc {val['metrics'].get('roc_auc', float('nan')):.4f} "
                      f"acc {val['metrics'].get('accuracy', float('nan')):.4f} "
                      f"(best {state.best_score:.4f} @ {state.best_step})", flush=True)
                save_checkpoint(Path(tmp), model, opt, sched, state, config["cfg"], base_info, best, val,
                                final=final, die_midway=kill_in_checkpoint)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    # ---- loop
    progress = Progress(total_steps, o.log_every)
    stop = state.finished or state.global_step >= total_steps
    while state.epoch < o.epochs and not stop:
        epoch, skip = state.epoch, state.batches_done
        fed = torch.zeros(2)
        running: list[float] = []
        for i, batch in enumerate(shard(f"train_{epoch}")):
            if i < skip:
                continue  # consumed before the checkpoint we resumed from
            labels = batch["label"].to(device)
            fed += torch.bincount(batch["label"], minlength=2).float()
            step_now = (i + 1) % o.grad_accum == 0
            # Accumulating micro-batches need no gradient all-reduce; the stepping one does it.
            sync = contextlib.nullcontext() if step_now or world == 1 else model.no_sync()
            with sync:
                with amp:
                    logits = answer_logits(model, batch)
                loss = loss_of(logits, labels, label_ids)
                (loss / o.grad_accum).backward()
            running.append(loss.item())
            state.batches_done = i + 1
            progress.samples += len(labels) * world
            if not step_now:
                continue
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], o.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state.global_step += 1
            state.samples += per_step
            if o.fail_at_step is not None and restored is None and state.global_step == o.fail_at_step:
                if o.fail_with == "exception":
                    raise RuntimeError(f"injected failure at step {state.global_step} (optim.fail_at_step)")
                kill_in_checkpoint = True
            line = progress.line(state, sum(running) / len(running), sched.get_last_lr()[0], o.epochs)
            if line and rank == 0:
                print(line, flush=True)
            if state.samples >= state.next_eval_at or state.global_step >= total_steps:
                state.next_eval_at = state.samples + o.eval_every_samples
                stop = evaluate_and_checkpoint({"loss": sum(running) / len(running), "lr": sched.get_last_lr()[0],
                                                "epoch": epoch, "step": state.global_step})
                running = []
            if stop or state.global_step >= total_steps:
                stop = True
                break
        # Micro-batches of an accumulation the epoch cut short never reach the next epoch's step.
        opt.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.all_reduce(fed)
        if rank == 0:
            print(f"epoch {epoch + 1} fed real={int(fed[0])} fake={int(fed[1])}", flush=True)
        if not stop:
            state.epoch, state.batches_done = epoch + 1, 0
            if state.last_eval_step != state.global_step:
                state.next_eval_at = state.samples + o.eval_every_samples
                stop = evaluate_and_checkpoint({"loss": sum(running) / max(1, len(running)),
                                                "lr": sched.get_last_lr()[0], "epoch": epoch,
                                                "step": state.global_step})

    # ---- the best weights on the whole validation split: what export calibrates on
    if not state.finished:
        if best is not None:
            load_trainable(model, best)
        val = validate(model, shard("val_full") if rank == 0 else [], label_ids, rank, world, amp,
                       shard_batches=False)
        state.finished = True
        _report({"step": state.global_step, "best_step": state.best_step, FINAL: 1,
                 **{f"val_{k}": v for k, v in val["metrics"].items() if isinstance(v, (int, float))}}, val, final=True)
