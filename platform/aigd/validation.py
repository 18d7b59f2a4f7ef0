"""Validation inside the training loop: every rank scores its own part of the set (Ray Data splits
it, `aigd.ingest.ValidationSplit`), and the scores are gathered and ordered by each row's key, so
the result does not depend on how the rows were split.

Every tensor handed to torch.distributed here is a CPU tensor (gloo, also on GPU clusters, where
the process group is "cpu:gloo,cuda:nccl"), and every rank ends with the same result, so decisions
made from it (best score, early stop) cannot disagree between ranks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from aigd.decision import p_fake
from aigd.forward import answer_logits, pair_logits
from aigd.metrics import binary_metrics


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def merge_shares(shares: list[np.ndarray]) -> np.ndarray:
    """Rows [row key, z_real, z_fake, label] from every rank, in row-key order: the same whatever
    rank scored which row."""
    rows = np.concatenate([s for s in shares if len(s)]) if any(len(s) for s in shares) else np.zeros((0, 4))
    return rows[np.argsort(rows[:, 0], kind="stable")]


def gather_rows(rows: np.ndarray, world: int) -> list[np.ndarray]:
    """All ranks' rows on every rank, through CPU tensors (gloo), whatever each rank's count."""
    if world == 1:
        return [rows]
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
def validate(model, batches, label_ids, world: int, amp) -> dict:
    """Pair logits and labels of this rank's batches, gathered from every rank and ordered by row
    key (`batch["row_key"]`, a hash of the image id), plus metrics at 0.5; identical on every rank."""
    inner = unwrap(model)  # DDP's forward would broadcast buffers, a collective the other ranks never join
    was_training = inner.training
    inner.eval()
    rows = []
    for batch in batches:
        with amp:
            z = pair_logits(answer_logits(inner, batch), label_ids).float().cpu().numpy()
        rows.append(np.column_stack([batch["row_key"].numpy(), z, batch["label"].numpy()]))
    inner.train(was_training)
    merged = merge_shares(gather_rows(np.concatenate(rows) if rows else np.zeros((0, 4)), world))
    z, y = merged[:, 1:3], merged[:, 3].astype(np.int64)
    return {"pair_logits": z, "labels": y, "metrics": binary_metrics(y, p_fake(z)) if len(y) else {}}
