"""Training losses on the answer position, and the one table that `optim.loss` names."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from aigd.config import OptimConfig
from aigd.forward import pair_logits


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_ids: tuple[int, int]) -> torch.Tensor:
    """Method 1: full-vocabulary cross-entropy of the answer token only (B, V) -> scalar."""
    targets = torch.as_tensor(label_ids, device=logits.device)[labels]
    return F.cross_entropy(logits.float(), targets)


def binary_focal(pair: torch.Tensor, labels: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Method 2: focal loss on the two-way softmax over [Real, Fake] logits; alpha weights Fake (class 1).

    FL = -alpha_t (1 - p_t)^gamma log p_t, with alpha_t = alpha for fakes and 1 - alpha for reals.
    """
    logp = F.log_softmax(pair.float(), dim=-1).gather(1, labels.view(-1, 1)).squeeze(1)
    p_t = logp.exp()
    alpha_t = torch.where(labels == 1, torch.full_like(p_t, alpha), torch.full_like(p_t, 1 - alpha))
    return (-alpha_t * (1 - p_t).pow(gamma) * logp).mean()


Loss = Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]

# optim.loss -> (answer logits (B, V), labels, label token ids) -> scalar
LOSSES: dict[str, Callable[[OptimConfig], Loss]] = {
    "ce": lambda o: answer_cross_entropy,
    "focal": lambda o: lambda logits, labels, ids: binary_focal(pair_logits(logits, ids), labels,
                                                                o.focal_alpha, o.focal_gamma),
}


def loss_fn(optim: OptimConfig) -> Loss:
    return LOSSES[optim.loss](optim)
