"""Streamed Ray Data preprocessing: source -> filter -> split -> balance -> decode/augment/JPEG -> processor.

Decisions that need global knowledge (split cut-offs, class counts, the undersampling threshold)
come from ONE metadata read over the label/width/height columns (`aigd.sampling.Catalog`); the per-row stages then
only compare a row's hash against a scalar, so they scale to any dataset size. Every random choice
is drawn from (seed, epoch, img_id): each epoch redraws crops, flips and JPEG qualities, and a
fixed seed reproduces them on any machine.
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache

import numpy as np
import ray
import ray.data
import torch
import torchvision.transforms.v2 as T
from ray.data.collate_fn import NumpyBatchCollateFn

from aigd.batching import collate, encode, pixel_affine
from aigd.config import AugmentConfig, DataConfig, DecodeLimits, ImagePolicy
from aigd.errors import AigdError
from aigd.image_view import prepare
from aigd.images import jpeg
from aigd.sampling import Catalog, Subsample
from aigd.sources import DataError, image_bytes, row_blocks, shards, with_images

log = logging.getLogger(__name__)

ROWS_PER_TASK = 32
# Short bookkeeping stages (an epoch's sample of cached rows); at a full CPU each they would hold
# back the preprocessing actors whenever they run.
LIGHT_STAGE_CPUS = 0.1
# ...and at most this many at once: Ray starts a worker process per concurrent task, and on a small
# node unbounded 0.1-CPU tasks meant a dozen new processes competing with training every epoch.
LIGHT_STAGE_TASKS = 2


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
        img = jpeg(img, quality)
    return img, quality


@lru_cache(maxsize=2)
def cached_processor(path: str, revision: str | None = None):
    # Imported here: training workers import this module before Unsloth patches transformers
    # (aigd.model.import_backend_first), which must come first.
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
    @ray.remote(num_cpus=0)
    class SkipCounter:
        def __init__(self):
            self.ids: dict[str, set[str]] = {}

        def add(self, split: str, img_ids: list[str]) -> None:
            self.ids.setdefault(split, set()).update(img_ids)

        def get(self) -> dict:
            """Distinct unreadable images per split (an epoch that reads a row again adds nothing)."""
            return {split: len(ids) for split, ids in sorted(self.ids.items())}

    return SkipCounter.options(name=name, namespace=COUNTER_NAMESPACE, get_if_exists=True,
                               lifetime="detached").remote()


def skipped_counts(name: str) -> dict:
    try:
        return ray.get(ray.get_actor(name, namespace=COUNTER_NAMESPACE).get.remote())
    except ValueError:
        return {}


def _report_skipped(counter: str | None, split: str, img_ids: list[str]) -> None:
    if counter is None:
        return  # ad-hoc use: the warning log still names every skipped row
    try:
        ray.get_actor(counter, namespace=COUNTER_NAMESPACE).add.remote(split, img_ids)
    except ValueError:
        log.warning("skip counter %s not found; %d skipped rows only logged", counter, len(img_ids))


def model_view(data: bytes | None, limits: DecodeLimits, policy: ImagePolicy, aug: AugmentConfig | None,
               rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(policy-sized uint8 pixels, JPEG quality drawn or -1). Without augmentation this is the
    serving path itself (aigd.image_view.prepare)."""
    if data is None:
        raise DataError("no image bytes")
    if aug is None:
        return prepare(data, limits, policy), -1
    drawn = {"quality": -1}

    def augmented(img):
        img, drawn["quality"] = augment(img, aug, rng)
        return img

    return prepare(data, limits, policy, augmented), drawn["quality"]


def preprocess(batch: dict, processor: tuple[str, str | None], policy: ImagePolicy, aug: AugmentConfig | None,
               seed: int, epoch: int, max_pixels: int, split: str = "train", counter: str | None = None) -> dict:
    """Decode -> (augment + JPEG) -> policy resize -> processor. Corrupt images are dropped and counted."""
    limits = DecodeLimits.preset("training", max_pixels)
    images, keep, quality = [], [], []
    for i, (img_id, data) in enumerate(zip(batch["img_id"], image_bytes(batch["image"]))):
        try:
            pixels, q = model_view(data, limits, policy, aug, row_rng(seed, epoch, str(img_id)) if aug else None)
        except (AigdError, DataError) as e:
            log.warning("skipping %s: %s", img_id, e)
            continue
        images.append(pixels)
        keep.append(i)
        quality.append(q)
    if len(keep) < len(batch["img_id"]):
        kept = set(keep)
        _report_skipped(counter, split, [str(x) for i, x in enumerate(batch["img_id"]) if i not in kept])
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
    opts = ray.data.DataContext.get_current().execution_options
    opts.preserve_order = cfg.preserve_order
    if cfg.object_store_budget_mb is not None:
        opts.resource_limits = opts.resource_limits.copy(object_store_memory=cfg.object_store_budget_mb * 2**20)


def planned_rows(cat: Catalog, split: str, sample: Subsample | None):
    """(Ray Dataset of the split's metadata rows, shard paths): selection happens here, on the
    job's catalog; each block is <= ROWS_PER_TASK rows of one shard, whose bytes the decoding stage reads.

    Planned on the driver instead of Ray Data's parquet reader: its file-listing task and a
    repartition task each held a whole CPU for the run, so on a small node preprocessing got one
    CPU of two, and the repartition buffered every image's bytes in the object store.
    """
    kept = cat.select(split, sample)
    return ray.data.from_arrow(row_blocks(kept, ROWS_PER_TASK) or [kept]), shards(cat.cfg)


class Preprocessor:
    """Ray Data actor: reads a block's image bytes, then decode -> augment -> processor in batches.

    A fixed pool of these lives for the whole epoch, so torch, the processor and the transforms load
    once per actor rather than in every task process Ray starts."""

    def __init__(self, cfg: DataConfig, files: list[str], processor: tuple[str, str | None], policy: ImagePolicy,
                 aug: AugmentConfig | None, epoch: int, batch_size: int, split: str, counter: str | None):
        self.cfg, self.files, self.batch_size = cfg, files, batch_size
        self.kwargs = dict(processor=processor, policy=policy, aug=aug, seed=cfg.seed, epoch=epoch,
                           max_pixels=cfg.max_image_pixels, split=split, counter=counter)
        cached_processor(*processor)

    def __call__(self, rows):
        table = with_images(self.cfg, self.files, rows)
        for start in range(0, table.num_rows, self.batch_size):
            part = table.slice(start, self.batch_size)
            batch = {"img_id": part.column("img_id").to_pylist(), "image": part.column("image").to_pylist(),
                     "label": part.column("label").to_numpy()}
            yield preprocess(batch, **self.kwargs)


# One GPU trains on ~10 (5-16) Method-2 samples/s, which needs < 0.5 CPU of preprocessing (docs/benchmarks.md,
# "Scaling on paper"); 4 per training worker leaves room for costlier PNG sources. Each actor holds
# torch (~1 GB resident), so a big shared cluster must not get one per free CPU.
ACTORS_PER_TRAIN_WORKER = 4


def preprocess_actors(cfg: DataConfig, reserved_cpus: float = 0.0, train_workers: int | None = None) -> int:
    """data.preprocess_actors, or as many as the cluster's CPUs hold after `reserved_cpus` (the
    training workers' share), at most ACTORS_PER_TRAIN_WORKER per training worker."""
    if cfg.preprocess_actors is not None:
        return cfg.preprocess_actors
    free = ray.cluster_resources().get("CPU", 1.0) - reserved_cpus
    n = max(1, int(free / cfg.preprocess_cpus + 1e-9))
    return min(n, ACTORS_PER_TRAIN_WORKER * train_workers) if train_workers else n


def build_dataset(cat: Catalog, split: str, processor: tuple[str, str | None], policy: ImagePolicy,
                  aug: AugmentConfig | None, epoch: int, sample: Subsample | None,
                  batch_size: int = 32, counter: str | None = None, reserved_cpus: float = 0.0,
                  train_workers: int | None = None):
    """The lazy Ray Dataset of one split for one epoch: ready tensors, one row per image.
    `processor` is (name_or_path, revision) of the base whose processor encodes the images."""
    rows, files = planned_rows(cat, split, sample)
    return rows.map_batches(
        Preprocessor, fn_constructor_kwargs=dict(
            cfg=cat.cfg, files=files, processor=processor, policy=policy,
            aug=aug if (aug and aug.enabled) else None, epoch=epoch, batch_size=batch_size, split=split,
            counter=counter),
        batch_format="pyarrow", batch_size=None, num_cpus=cat.cfg.preprocess_cpus,
        compute=ray.data.ActorPoolStrategy(size=preprocess_actors(cat.cfg, reserved_cpus, train_workers)))
