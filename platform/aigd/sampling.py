"""Which rows a split, an epoch or a subset holds: filters, the hash split, class balance and
stratified subsets, decided on metadata columns only.

Torch-free on purpose: Ray Data runs these stages in light (0.1 CPU) tasks, and every process that
imports torch costs seconds of CPU and ~0.5 GB; on a 2-CPU machine that churn stalled training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from aigd.config import DataConfig
from aigd.sources import DataError, metadata

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- hashing


def unit_hash(keys, salt: str) -> np.ndarray:
    """Stable uniform [0, 1) per key, identical on every machine and Python version."""
    out = np.empty(len(keys), dtype=np.float64)
    prefix = salt.encode() + b"\x00"
    for i, k in enumerate(keys):
        h = hashlib.blake2b(prefix + str(k).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2.0**64
    return out


def split_key(img_ids, group_sep: str | None):
    if group_sep is None:
        return list(img_ids)
    return [str(k).split(group_sep, 1)[0] for k in img_ids]


# --------------------------------------------------------------------------- labels


def class_of(labels: np.ndarray, cfg: DataConfig, ids=None) -> np.ndarray:
    """Dataset labels -> 0 real / 1 fake / -1 dropped. Unknown labels are an error naming the row."""
    names = {int(k): v for k, v in cfg.label_map.items()}
    bad = set(names.values()) - {"real", "fake", "tampered"}
    if bad:
        raise DataError(f"label_map names {sorted(bad)}: only real, fake, tampered are known")
    lut = {k: (0 if v == "real" else 1 if v == "fake" else (1 if cfg.tampered == "fake" else -1))
           for k, v in names.items()}
    out = np.empty(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels):
        if int(lab) not in lut:
            where = f"img_id {ids[i]!r}" if ids is not None else f"row {i}"
            raise DataError(f"{where}: label {lab.item() if hasattr(lab, 'item') else lab!r} is not in the "
                            f"label map {names}")
        out[i] = lut[int(lab)]
    return out


def keep_mask(table: pa.Table, cls: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Rows of a known class, large enough, and not excluded by `cfg.exclude`."""
    keep = ((cls >= 0) & (table.column("width").to_numpy() >= cfg.min_width)
            & (table.column("height").to_numpy() >= cfg.min_height))
    for column, values in cfg.exclude.items():
        keep &= ~np.isin(np.asarray(table.column(column).to_pylist(), dtype=object).astype(str),
                         [str(v) for v in values])
    return keep


# --------------------------------------------------------------------------- the plan (one metadata read)


def assign_split(u: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 train, 1 val, 2 test from a row's (or its group's) unit hash."""
    out = np.zeros(len(u), dtype=np.int64)
    out[u < test_fraction + val_fraction] = 1
    out[u < test_fraction] = 2
    return out


def split_of(ids, cfg: DataConfig) -> np.ndarray:
    """0 train, 1 val, 2 test per img_id, by the config's salted hash of its group."""
    return assign_split(unit_hash(split_key(ids, cfg.split_group_sep), cfg.split_salt),
                        cfg.val_fraction, cfg.test_fraction)


@dataclass(frozen=True)
class Catalog:
    """A source's metadata, read once per job, with each row's class, filter verdict and split.
    Every count, balance, subset and selection of the job is computed from these columns; nothing
    downstream reads the metadata again."""

    cfg: DataConfig
    table: pa.Table
    ids: list
    cls: np.ndarray  # 0 real, 1 fake, -1 dropped by the label map
    keep: np.ndarray  # known class, large enough, not excluded
    split: np.ndarray  # 0 train, 1 val, 2 test

    @classmethod
    def read(cls, cfg: DataConfig, extra: tuple[str, ...] | list[str] = ()) -> "Catalog":
        return cls.of(cfg, metadata(cfg, extra))

    @classmethod
    def of(cls, cfg: DataConfig, table: pa.Table) -> "Catalog":
        ids = table.column("img_id").to_pylist()
        labels = class_of(table.column("label").to_numpy(), cfg, ids)
        return cls(cfg, table, ids, labels, keep_mask(table, labels, cfg), split_of(ids, cfg))

    def in_split(self, split: str) -> np.ndarray:
        """Rows of the split that pass the filters ("all": every row that passes them)."""
        return self.keep if split == "all" else self.keep & (self.split == SPLITS.index(split))

    def counts(self) -> dict[str, list[int]]:
        """split -> [n_real, n_fake] after filtering, before balancing."""
        return {name: [int((self.in_split(name) & (self.cls == c)).sum()) for c in (0, 1)] for name in SPLITS}

    def select(self, split: str, sample: "Subsample | None" = None) -> pa.Table:
        """Filter + split + undersample; image bytes are never copied to Python. The label column
        holds the class (0/1)."""
        keep = self.in_split(split).copy()
        if sample is not None:
            draw = unit_hash(self.ids, sample.salt)
            keep &= np.where(self.cls == 0, draw < sample.cuts[0], draw < sample.cuts[1])
        out = self.table.filter(pa.array(keep))
        return out.set_column(out.schema.get_field_index("label"), "label", pa.array(self.cls[keep], pa.int64()))


class Subsample(NamedTuple):
    """Rows of class c pass when unit_hash(img_id, salt) < cuts[c]: a per-row test, no global state."""

    salt: str
    cuts: tuple[float, float]


def subsample(cat: Catalog, split: str, salt: str, per_class: tuple[int, int] | None = None) -> Subsample:
    """Hash thresholds that let exactly `per_class` rows of each class through (default: the
    minority's count for both, i.e. balance by undersampling)."""
    in_split = cat.in_split(split)
    draw = unit_hash(cat.ids, salt)
    n = [int((in_split & (cat.cls == c)).sum()) for c in (0, 1)]
    want = per_class or (min(n), min(n))
    cuts = []
    for c in (0, 1):
        d = np.sort(draw[in_split & (cat.cls == c)])
        cuts.append(1.0 if n[c] <= want[c] else float(d[want[c]]) if want[c] > 0 else 0.0)
    return Subsample(salt, (cuts[0], cuts[1]))


def balance(cat: Catalog, epoch: int) -> Subsample:
    """This epoch's undersampling of the training split; redrawn every epoch."""
    return subsample(cat, "train", f"{cat.cfg.seed}/{epoch}/balance")


def stratified(cat: Catalog, split: str, n: int | None) -> Subsample | None:
    """A fixed subset of about n rows with the split's class proportions (None: the whole split)."""
    counts = cat.counts()[split]
    if n is None or n >= sum(counts):
        return None
    per_class = tuple(max(1, round(n * c / sum(counts))) if c else 0 for c in counts)
    return subsample(cat, split, f"{cat.cfg.seed}/subset/{split}", per_class)


# --------------------------------------------------------------------------- per-row stages


def keep_sampled(batch: dict, sample: Subsample) -> dict:
    """The rows of an already preprocessed batch (labels 0/1) that this epoch's sample keeps."""
    draw = unit_hash(list(batch["img_id"]), sample.salt)
    labels = np.asarray(batch["label"])
    keep = np.where(labels == 0, draw < sample.cuts[0], draw < sample.cuts[1])
    return {k: v[keep] for k, v in batch.items()}
