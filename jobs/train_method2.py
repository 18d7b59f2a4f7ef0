"""Method 2, the low-quality specialist: LoRA with fresh augmentation + JPEG simulation every epoch,
focal loss (alpha 0.75 on Fake, gamma 2.0) on the Real/Fake decision, cosine schedule, 2 epochs.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_method2.py --config configs/demo_method2.yaml
    python jobs/train_method2.py --config configs/method2.yaml optim.lr=5e-5   # local Ray

config -> data (streamed Ray Data pipeline) -> model -> loop -> checkpoint -> export.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aigd import config as C
from aigd import train as T


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from aigd.losses import binary_focal
    from aigd.model import load_for_training
    from aigd.prompt import Collate, label_token_ids
    from aigd.scoring import answer_logits, pair_logits

    # ---- config
    cfg = C.from_dict(C.TrainJobConfig, config["cfg"])
    o = cfg.optim
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    T.seed_everything(o.seed)

    # ---- model
    model, processor, _ = load_for_training(cfg.model, cfg.lora, device)
    label_ids = label_token_ids(processor.tokenizer)
    to_batch = Collate.of(processor)
    total_steps = config["steps_per_epoch"] * o.epochs if o.max_steps is None else o.max_steps
    opt, sched = T.make_optimizer(model, o, total_steps)

    # ---- resume
    state, restored = T.LoopState(), ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = T.load_checkpoint(Path(d), model, opt, sched)
        if rank == 0:
            print(f"resumed at epoch {state.epoch + 1} batch {state.batches_done} step {state.global_step}")
    if world > 1:
        # Buffers (rotary tables) are constant; broadcasting them every forward only adds a collective.
        model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy_kwargs={"broadcast_buffers": False})
    model.train()

    def eval_checkpoint_report(metrics: dict) -> bool:
        val_batches = ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=o.batch_size,
                                                                            collate_fn=to_batch)
        return T.eval_checkpoint_report(model, opt, sched, state, config["cfg"], metrics, val_batches,
                                        label_ids, o.early_stop_patience)

    # ---- loop
    progress = T.Progress(total_steps, o.log_every)
    stop = state.global_step >= total_steps
    while state.epoch < o.epochs and not stop:
        epoch, skip = state.epoch, state.batches_done
        fed = torch.zeros(2)
        batches = ray.train.get_dataset_shard(f"train_{epoch}").iter_torch_batches(
            batch_size=o.batch_size, collate_fn=to_batch)
        running = []
        for i, batch in enumerate(batches):
            if i < skip:
                continue  # consumed before the checkpoint we resumed from
            labels = batch["label"].to(device)
            fed += torch.bincount(batch["label"], minlength=2).float()
            loss = binary_focal(pair_logits(answer_logits(model, batch), label_ids), labels,
                                o.focal_alpha, o.focal_gamma)
            (loss / o.grad_accum).backward()
            running.append(loss.item())
            state.batches_done = i + 1
            progress.samples += len(labels) * world
            if (i + 1) % o.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], o.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state.global_step += 1
            if o.fail_at_step is not None and restored is None and state.global_step == o.fail_at_step:
                raise RuntimeError(f"injected failure at step {state.global_step} (optim.fail_at_step)")
            line = progress.line(state, sum(running) / len(running), sched.get_last_lr()[0], o.epochs)
            if line and rank == 0:
                print(line, flush=True)
            if state.global_step % o.eval_every == 0 or state.global_step >= total_steps:
                stop = eval_checkpoint_report({"loss": sum(running) / len(running), "lr": sched.get_last_lr()[0],
                                               "epoch": epoch, "step": state.global_step})
                running = []
            if stop or state.global_step >= total_steps:
                stop = True
                break
        if world > 1:
            torch.distributed.all_reduce(fed)
        if rank == 0:
            print(f"epoch {epoch + 1} fed real={int(fed[0])} fake={int(fed[1])}", flush=True)
        if not stop:
            state.epoch, state.batches_done = epoch + 1, 0
            if state.global_step % o.eval_every:
                stop = eval_checkpoint_report({"loss": sum(running) / max(1, len(running)),
                                               "lr": sched.get_last_lr()[0], "epoch": epoch,
                                               "step": state.global_step})


def main(argv=None) -> Path:
    # ---- config + data plan (one metadata pass) on the driver
    cfg = T.parse_args(__doc__.splitlines()[0], argv)
    if cfg.method != "method2" or cfg.optim.loss != "focal" or not cfg.augment.enabled:
        raise SystemExit("jobs/train_method2.py needs method: method2, optim.loss: focal, augment.enabled: true")
    T.init_ray(cfg)
    cfg, plan = T.prepare_run(cfg)
    trainer = T.make_trainer(cfg, plan, train_loop_per_worker, T.make_datasets(cfg, plan))
    result = trainer.fit()
    return T.finish_run(cfg, plan, result)


if __name__ == "__main__":
    main()
