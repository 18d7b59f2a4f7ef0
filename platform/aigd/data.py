"""Streamed Ray Data preprocessing: source -> filter -> split -> balance -> decode/augment/JPEG -> processor.

Decisions that need global knowledge (split cut-offs, class counts, the undersampling threshold)
come from ONE cheap metadata pass over the label/width/height columns; the per-row stages then
only compare a row's hash against a scalar, so they scale to any dataset size. Every random choice
is drawn from (seed, epoch, img_id): each epoch redraws crops, flips and JPEG qualities, and a
fixed seed reproduces them on any machine.
"""

from __future__ import annotations

import hashlib
import io
import logging
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from ray.data.collate_fn import NumpyBatchCollateFn

from aigd.batching import collate, encode, pixel_affine
from aigd.config import AugmentConfig, DataConfig, DecodeLimits, ImagePolicy
from aigd.errors import AigdError
from aigd.images import decode
from aigd.prompt import prepare_image, target_size
from aigd.sources import DataError, image_bytes, read_source

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ROWS_PER_TASK = 32
# Reading and metadata filtering are short bursts; at a full CPU each they would hold back a
# preprocessing task (the stage that does the work) whenever they run.
LIGHT_STAGE_CPUS = 0.1


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


def keep_mask(labels, widths, heights, cfg: DataConfig) -> np.ndarray:
    cls = class_of(np.asarray(labels), cfg)
    return (cls >= 0) & (np.asarray(widths) >= cfg.min_width) & (np.asarray(heights) >= cfg.min_height)


# --------------------------------------------------------------------------- plan (one metadata pass)


def assign_split(u: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 train, 1 val, 2 test from a row's (or its group's) unit hash."""
    out = np.zeros(len(u), dtype=np.int64)
    out[u < test_fraction + val_fraction] = 1
    out[u < test_fraction] = 2
    return out


def _split_and_class(cfg: DataConfig, table: pa.Table):
    labels = table.column("label").to_numpy()
    cls = class_of(labels, cfg)
    keep = keep_mask(labels, table.column("width").to_numpy(), table.column("height").to_numpy(), cfg)
    ids = table.column("img_id").to_pylist()
    split = assign_split(unit_hash(split_key(ids, cfg.split_group_sep), cfg.split_salt),
                         cfg.val_fraction, cfg.test_fraction)
    return ids, cls, keep, split


def class_counts(cfg: DataConfig, table: pa.Table) -> dict[str, list[int]]:
    """split -> [n_real, n_fake] after filtering, before balancing."""
    _, cls, keep, split = _split_and_class(cfg, table)
    return {name: [int(((split == s) & keep & (cls == c)).sum()) for c in (0, 1)] for s, name in enumerate(SPLITS)}


class Subsample(NamedTuple):
    """Rows of class c pass when unit_hash(img_id, salt) < cuts[c]: a per-row test, no global state."""

    salt: str
    cuts: tuple[float, float]


def subsample(cfg: DataConfig, table: pa.Table, split: str, salt: str,
              per_class: tuple[int, int] | None = None) -> Subsample:
    """Hash thresholds that let exactly `per_class` rows of each class through (default: the
    minority's count for both, i.e. balance by undersampling)."""
    ids, cls, keep, split_idx = _split_and_class(cfg, table)
    in_split = keep & (split_idx == SPLITS.index(split))
    draw = unit_hash(ids, salt)
    n = [int((in_split & (cls == c)).sum()) for c in (0, 1)]
    want = per_class or (min(n), min(n))
    cuts = []
    for c in (0, 1):
        d = np.sort(draw[in_split & (cls == c)])
        cuts.append(1.0 if n[c] <= want[c] else float(d[want[c]]) if want[c] > 0 else 0.0)
    return Subsample(salt, (cuts[0], cuts[1]))


def balance(cfg: DataConfig, table: pa.Table, epoch: int) -> Subsample:
    """This epoch's undersampling of the training split; redrawn every epoch."""
    return subsample(cfg, table, "train", f"{cfg.seed}/{epoch}/balance")


def stratified(cfg: DataConfig, table: pa.Table, split: str, n: int | None, counts: list[int]) -> Subsample | None:
    """A fixed subset of about n rows with the split's class proportions (None: the whole split)."""
    if n is None or n >= sum(counts):
        return None
    per_class = tuple(max(1, round(n * c / sum(counts))) if c else 0 for c in counts)
    return subsample(cfg, table, split, f"{cfg.seed}/subset/{split}", per_class)


# --------------------------------------------------------------------------- per-row stages


def select_rows(table: pa.Table, cfg: DataConfig, split: str, sample: Subsample | None = None) -> pa.Table:
    """Filter + split + undersample on metadata columns only; image bytes are never copied to Python."""
    labels = table.column("label").to_numpy()
    ids = table.column("img_id").to_pylist()
    cls = class_of(labels, cfg, ids)
    keep = keep_mask(labels, table.column("width").to_numpy(), table.column("height").to_numpy(), cfg)
    if split != "all":  # "all": every row that passes the label and size filters
        u = unit_hash(split_key(ids, cfg.split_group_sep), cfg.split_salt)
        keep &= assign_split(u, cfg.val_fraction, cfg.test_fraction) == SPLITS.index(split)
    if sample is not None:
        draw = unit_hash(ids, sample.salt)
        keep &= np.where(cls == 0, draw < sample.cuts[0], draw < sample.cuts[1]) | (cls < 0)
    out = table.filter(pa.array(keep))
    return out.set_column(out.schema.get_field_index("label"), "label", pa.array(cls[keep], pa.int64()))


def row_rng(seed: int, epoch: int, img_id: str) -> np.random.Generator:
    h = hashlib.blake2b(f"{seed}/{epoch}/{img_id}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def augment(img, aug: AugmentConfig, rng: np.random.Generator):
    """Method 2: random resized crop, flip, colour jitter, then JPEG re-encode; returns (img, quality).

    The seed jittered the full-size image before cropping. Cropping first gives the same
    distribution (flip commutes with the crop; jitter is per-pixel, except that contrast now pulls
    toward the crop's mean grey rather than the whole image's) at 40% of the cost on 1024-px
    inputs, because the expensive hue shift runs on the 512-px crop.
    """
    import torch
    import torchvision.transforms.v2 as T
    from PIL import Image

    torch_gen_seed = int(rng.integers(0, 2**31 - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_gen_seed)
        tf = T.Compose([
            T.RandomResizedCrop(aug.crop_size, scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio),
                                antialias=True),
            T.RandomHorizontalFlip(aug.hflip_p),
            T.ColorJitter(*aug.color_jitter),
        ])
        img = tf(img)
    quality = -1
    if rng.random() < aug.jpeg_p:
        quality = int(rng.integers(aug.jpeg_quality[0], aug.jpeg_quality[1] + 1))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        img = Image.open(buf)
        img.load()
    return img, quality


@lru_cache(maxsize=2)
def cached_processor(path: str, revision: str | None = None):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, revision=revision)


class Collate(NumpyBatchCollateFn):
    """Picklable collate for Ray Data's iter_torch_batches: pads only, no decoding or float maths."""

    def __init__(self, pad_id: int, affine):
        super().__init__()
        self.pad_id = pad_id
        self.affine = affine

    @classmethod
    def of(cls, processor) -> "Collate":
        return cls(processor.tokenizer.pad_token_id, pixel_affine(processor))

    def __call__(self, rows: dict) -> dict:
        return collate(rows, self.pad_id, self.affine)


COUNTER_NAMESPACE = "aigd"


def skip_counter(name: str):
    """A named actor that preprocessing tasks report skipped images to; created by the driver.

    Detached in its own namespace so Ray Data tasks and Train workers (which run under other
    owners) can reach it; the driver kills it when the run ends.
    """
    import ray

    @ray.remote(num_cpus=0)
    class SkipCounter:
        def __init__(self):
            self.counts: dict[str, int] = {}

        def add(self, split: str, n: int) -> None:
            self.counts[split] = self.counts.get(split, 0) + n

        def get(self) -> dict:
            return dict(self.counts)

    return SkipCounter.options(name=name, namespace=COUNTER_NAMESPACE, get_if_exists=True,
                               lifetime="detached").remote()


def skipped_counts(name: str) -> dict:
    import ray

    try:
        return ray.get(ray.get_actor(name, namespace=COUNTER_NAMESPACE).get.remote())
    except ValueError:
        return {}


def _report_skipped(counter: str | None, split: str, n: int) -> None:
    import ray

    if counter is None:
        return  # ad-hoc use: the warning log still names every skipped row
    try:
        ray.get_actor(counter, namespace=COUNTER_NAMESPACE).add.remote(split, n)
    except ValueError:
        log.warning("skip counter %s not found; %d skipped rows only logged", counter, n)


def preprocess(batch: dict, processor: tuple[str, str | None], policy: ImagePolicy, aug: AugmentConfig | None,
               seed: int, epoch: int, max_pixels: int, split: str = "train", counter: str | None = None) -> dict:
    """Decode -> (augment + JPEG) -> policy resize -> processor. Corrupt images are dropped and counted."""
    limits = DecodeLimits.preset("training", max_pixels)
    images, keep, quality = [], [], []
    for i, (img_id, data) in enumerate(zip(batch["img_id"], image_bytes(batch["image"]))):
        try:
            if data is None:
                raise DataError("no image bytes")
            draft = None if aug else target_size(int(batch["width"][i]), int(batch["height"][i]), policy)
            img = decode(data, limits, draft_to=draft)
        except (AigdError, DataError) as e:
            log.warning("skipping %s: %s", img_id, e)
            continue
        q = -1
        if aug is not None:
            img, q = augment(img, aug, row_rng(seed, epoch, str(img_id)))
        images.append(prepare_image(img, policy))
        keep.append(i)
        quality.append(q)
    n_bad = len(batch["img_id"]) - len(keep)
    if n_bad:
        _report_skipped(counter, split, n_bad)
    if not images:
        return {k: [] for k in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw", "img_id",
                                "label", "jpeg_quality")}
    out = encode(cached_processor(*processor), images, policy)
    out["img_id"] = np.asarray([str(batch["img_id"][i]) for i in keep])
    out["label"] = np.asarray(batch["label"])[keep].astype(np.int64)
    out["jpeg_quality"] = np.asarray(quality, dtype=np.int64)
    return out


def configure_execution(cfg: DataConfig) -> None:
    """Driver-side Ray Data options; Ray Train carries them over to the datasets it ingests."""
    import ray.data

    opts = ray.data.DataContext.get_current().execution_options
    opts.preserve_order = cfg.preserve_order
    if cfg.object_store_budget_mb is not None:
        opts.resource_limits = opts.resource_limits.copy(object_store_memory=cfg.object_store_budget_mb * 2**20)


def build_dataset(cfg: DataConfig, split: str, processor: tuple[str, str | None], policy: ImagePolicy,
                  aug: AugmentConfig | None, epoch: int, sample: Subsample | None,
                  batch_size: int = 32, counter: str | None = None):
    """The lazy Ray Dataset of one split for one epoch: ready tensors, one row per image.
    `processor` is (name_or_path, revision) of the base whose processor encodes the images."""
    ds = read_source(cfg, LIGHT_STAGE_CPUS)
    ds = ds.map_batches(select_rows, fn_kwargs=dict(cfg=cfg, split=split, sample=sample),
                        batch_format="pyarrow", batch_size=None, num_cpus=LIGHT_STAGE_CPUS,
                        concurrency=cfg.read_tasks)
    # Parquet reads come in blocks of hundreds of rows (a whole small file is one block); split them
    # so every preprocessing CPU gets work instead of one task decoding a whole file.
    ds = ds.repartition(target_num_rows_per_block=max(batch_size, ROWS_PER_TASK))
    return ds.map_batches(preprocess, fn_kwargs=dict(
        processor=processor, policy=policy, aug=aug if (aug and aug.enabled) else None,
        seed=cfg.seed, epoch=epoch, max_pixels=cfg.max_image_pixels, split=split,
        counter=counter),
        batch_format="numpy", batch_size=batch_size, num_cpus=cfg.preprocess_cpus)
