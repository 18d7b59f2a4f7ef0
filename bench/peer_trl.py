"""The training peer: the seed's way of fine-tuning, TRL's `SFTTrainer` in one process, on the same
tiny model, LoRA, data, batch, optimizer and steps as the Method 1 demo job.

    python bench/peer_trl.py --steps 300 --out /tmp/trl.json      # (bench/peers.py runs it)

What the peer shares with the job: the base and its LoRA (`load_for_training`, same seed, so the same
initial weights), the image policy (`prepare`), the prompt, the answer token, the optimizer and its
schedule (`make_optimizer`). What is TRL's own: the data loader, the collator that calls the
processor on every batch (the seed's collator), the step loop, the loss (`SFTTrainer.compute_loss`
on labels that keep only the answer token), gradient clipping and logging. Before training it checks
that TRL's loss on its first batch equals the project's loss (`answer_logits` + `loss_fn` on the
same images through `model_batch`): the same work, so samples/s compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # wall time counts imports and loading, as the job's does

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "jobs")]


def job_config(overrides: tuple[str, ...] = ()):
    from aigd import config as C

    return C.load(C.TrainJobConfig, REPO / "configs/demo_method1.yaml", base=__import__("train_method1").PRESET,
                  overrides=list(overrides))


def training_rows(cfg, table):
    """The balanced training rows of every epoch, concatenated (the job redraws the balance each epoch:
    the peer sees the same rows, shuffled by its own sampler), as a `datasets.Dataset` whose images are
    decoded on access, like an Image column's."""
    from datasets import Dataset

    from peers import model_view

    def decode(batch):
        return {"pixels": [model_view(b, cfg) for b in batch["image_bytes"]], "label": batch["label"]}

    data, labels = [im["bytes"] for im in table.column("image").to_pylist()], table.column("label").to_pylist()
    good = {d: model_view(d, cfg) is not None for d in set(data)}  # the job skips and counts the rest
    keep = [i for i, d in enumerate(data) if good[d]]
    ds = Dataset.from_dict({"image_bytes": [data[i] for i in keep], "label": [labels[i] for i in keep]})
    return ds.with_transform(decode)


class VisionCollator:
    """The seed's collator: chat template + processor per batch, labels on the answer token only
    (Method 1's loss; the seed also trained on the prompt's tokens, NOTES.md)."""

    def __init__(self, processor, policy):
        from aigd.prompt import LABEL_WORDS, label_token_ids, prompt_text

        self.processor, self.prompt, self.words = processor, prompt_text(processor, policy), LABEL_WORDS
        self.label_ids = label_token_ids(processor.tokenizer)

    def __call__(self, examples):
        import torch

        images = [e["pixels"] for e in examples]
        labels = [int(e["label"]) for e in examples]
        self.processor.tokenizer.padding_side = "left"
        batch = self.processor(text=[self.prompt + self.words[y] for y in labels], images=images,
                               return_tensors="pt", padding=True)
        target = torch.full_like(batch["input_ids"], -100)
        target[:, -1] = torch.tensor([self.label_ids[y] for y in labels])
        batch["labels"] = target
        return batch


def same_loss_at_step_0(trainer, rows, collator, cfg, processor, n: int) -> dict:
    """TRL's loss (its collator, its compute_loss) on the first n rows vs the project's loss on the
    same images and weights, before any step."""
    import torch

    from aigd.batching import model_batch
    from aigd.forward import answer_logits
    from aigd.losses import loss_fn

    examples = [rows[i] for i in range(n)]
    images, labels = [e["pixels"] for e in examples], [int(e["label"]) for e in examples]
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, collator(examples)))
        ours = model_batch(processor, images, cfg.image)
        project_loss = float(loss_fn(cfg.optim)(answer_logits(trainer.model, ours), torch.tensor(labels),
                                                collator.label_ids))
    return {"trl_loss": round(trl_loss, 6), "project_loss": round(project_loss, 6), "rows": n,
            "abs_diff": abs(trl_loss - project_loss)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps (the job's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="a.b=c overrides of configs/demo_method1.yaml")
    args = ap.parse_args(argv)
    import torch
    from trl import SFTConfig, SFTTrainer

    from aigd.loop import make_optimizer, seed_everything
    from aigd.model import load_for_training
    from aigd.sampling import Catalog, balance
    import pyarrow as pa

    cfg = job_config(tuple(args.overrides))
    torch.set_num_threads(os.cpu_count())
    seed_everything(cfg.optim.seed)
    model, processor, _ = load_for_training(cfg.model, cfg.lora, torch.device("cpu"))
    cat = Catalog.read(cfg.data, extra=("image",))
    rows = training_rows(cfg, pa.concat_tables([cat.select("train", balance(cat, e)) for e in range(cfg.optim.epochs)]))
    per_step = cfg.optim.batch_size * cfg.scaling.num_workers  # the job's samples per optimizer step
    opt, sched = make_optimizer(model, cfg.optim, args.steps)
    collator = VisionCollator(processor, cfg.image)
    trainer = SFTTrainer(
        model=model, train_dataset=rows, data_collator=collator, processing_class=processor,
        optimizers=(opt, sched),
        args=SFTConfig(output_dir=str(Path(args.out).parent / "trl-run"), max_steps=args.steps,
                       per_device_train_batch_size=per_step, gradient_accumulation_steps=cfg.optim.grad_accum,
                       max_grad_norm=cfg.optim.grad_clip, bf16=False, fp16=False, use_cpu=True,
                       dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                       max_length=None, save_strategy="no", report_to="none", logging_steps=25,
                       seed=cfg.optim.seed, dataloader_num_workers=0))
    check = same_loss_at_step_0(trainer, rows, collator, cfg, processor, per_step)
    result = trainer.train()
    from peers import val_auc

    out = {"steps": result.global_step, "samples": result.global_step * per_step,
           "train_s": round(result.metrics["train_runtime"], 1),
           "samples_per_s": round(result.global_step * per_step / result.metrics["train_runtime"], 1),
           "val_auc": val_auc(model, processor, cfg), "step0": check, "wall_s": round(time.perf_counter() - T0, 1)}
    Path(args.out).write_text(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
