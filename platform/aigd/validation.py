"""Validation inside the training loop: sharded across ranks by batch, gathered back in order.

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
