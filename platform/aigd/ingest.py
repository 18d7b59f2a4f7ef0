"""How Ray Train hands each rank its part of the job's datasets.

A module of its own: Ray Train unpickles the DataConfig in its dataset-manager actor, which then
imports only this (and Ray), not the training loop with torch.
"""

from __future__ import annotations

import ray.train

VALIDATION_SETS = ("val", "val_full")


class ValidationSplit(ray.train.DataConfig):
    """Ray Train splits its datasets with `equal=True`, which drops up to world-1 rows to give every
    rank the same count; validation must score every row once, so its sets are split unequally.
    Each rank reads only its part; `aigd.validation` gathers the scores (uneven counts are fine there)."""

    def __init__(self, train: list[str], validation: list[str]):
        # Both kinds are "split": Ray Train 2.60 then configures them with every rank present and
        # shuts their split coordinators down with the run.
        super().__init__(datasets_to_split=[*train, *validation])
        self.validation = validation

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        """Ray Train 2.60 calls this once per dataset, at the first rank's get_dataset_shard."""
        rest = {k: v for k, v in datasets.items() if k not in self.validation}
        out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        for name in [n for n in self.validation if n in datasets]:
            ds = datasets[name].copy(datasets[name])
            ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            # One rank reads it all: no split coordinator (an actor and its executor) in between.
            parts = [ds.iterator()] if world_size == 1 else ds.streaming_split(
                world_size, equal=False, locality_hints=worker_node_ids if self._enable_shard_locality else None)
            for i, part in enumerate(parts):
                out[i][name] = part
        return out
