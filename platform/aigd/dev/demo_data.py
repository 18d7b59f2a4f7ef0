"""A small, offline, deterministic dataset in SID_Set's format (parquet shards).

Real rows are crops of real photographs that ship inside scikit-image and scikit-learn, scaled
DOWN (so they carry no resampling trace). Synthetic rows come in equal shares from the generator
zoo (`aigd.dev.zoo`: a transposed-conv SR GAN, a resize-conv autoencoder, a VAE, a small DDPM and
a plain resampling trace), trained on train-split photos only; a `generator` column names each
row's family. Size, aspect ratio and file format are drawn per real/fake pair, independently of
the label and the family, so none of them is a shortcut (SID_Set itself leaks aspect ratio).

img_id is "<photo>/<index>": splitting on the photo name keeps crops of one photo in one split.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from functools import lru_cache, partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from aigd.config import DataConfig, DemoDataConfig, ZooConfig, to_dict
from aigd.dev import zoo
from aigd.dev.provenance_files import declare
from aigd.dev.zoo import MARGIN, TRAINED, resample
from aigd.images import decode
from aigd.sampling import split_of as data_split

SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
                  "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina",
                  "rocket", "text")
SIZES = ((112, 112), (140, 112), (112, 140), (168, 112), (112, 168))  # on Qwen's 28-px grid
SMALL_SIZES = ((84, 84), (56, 84), (84, 56))


def source_photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {}
    for name in SKIMAGE_PHOTOS:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        photos[name] = arr[..., :3].astype(np.uint8)
    sample = load_sample_images()
    for fname, arr in zip(sample.filenames, sample.images):
        photos[Path(fname).stem] = np.asarray(arr, dtype=np.uint8)
    return photos


def random_crop(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A crop with the target aspect, at least 1.25x the target, resized down with antialiasing."""
    w, h = size
    ph, pw = photo.shape[:2]
    max_scale = min(pw / w, ph / h)
    scale = rng.uniform(min(1.25, max_scale), max_scale)
    cw, ch = int(w * scale), int(h * scale)
    x = int(rng.integers(0, pw - cw + 1))
    y = int(rng.integers(0, ph - ch + 1))
    crop = Image.fromarray(photo[y:y + ch, x:x + cw])
    return crop.resize((w, h), Image.Resampling.LANCZOS)


def encode(img: Image.Image, jpeg_quality: int | None) -> bytes:
    buf = io.BytesIO()
    if jpeg_quality is None:
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def draw_format(rng: np.random.Generator) -> int | None:
    """PNG (None) or a JPEG quality in [90, 98], half and half."""
    return None if rng.random() < 0.5 else int(rng.integers(90, 99))


def tampered(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, bytes]:
    """A real crop with a fingerprinted rectangle pasted in; returns the image and its PNG mask."""
    w, h = img.size
    pw, ph = (w // 4) * 2, (h // 4) * 2
    x, y = int(rng.integers(0, w - pw + 1)) // 2 * 2, int(rng.integers(0, h - ph + 1)) // 2 * 2
    patch = Image.fromarray(resample(np.asarray(img.crop((x, y, x + pw, y + ph))), "nearest"))
    out = img.copy()
    out.paste(patch, (x, y))
    mask = np.zeros((h, w), np.uint8)
    mask[y:y + ph, x:x + pw] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return out, buf.getvalue()


def png_header_bomb(side: int = 30000) -> bytes:
    """83 bytes of PNG that declare side x side pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096, 9))
            + chunk(b"IEND", b""))


def jpeg_scan_bomb(img: Image.Image, repeats: int = 5000) -> bytes:
    """A progressive JPEG with its smallest scan repeated: each scan is another pass over the image
    (5,000 on a smooth 3000x2000 image: ~120 KB that take ~10 s to decode)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, progressive=True)
    data = buf.getvalue()
    sos = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    start, end = min(zip(sos, sos[1:] + [len(data) - 2]), key=lambda se: se[1] - se[0])
    return data[:-2] + data[start:end] * repeats + b"\xff\xd9"


# What a scraped dataset holds besides images, mixed into the demo data (`corrupt_rows`).
BAD_KINDS = ("truncated", "garbage", "empty", "png_header_bomb", "jpeg_scan_bomb")


def bad_bytes(kind: str, img: Image.Image, data: bytes, rng: np.random.Generator) -> bytes:
    if kind == "truncated":  # cut mid-scan, the JPEG end marker kept: libjpeg only warns on it
        return data[: len(data) // 3] + (b"\xff\xd9" if data.startswith(b"\xff\xd8") else b"")
    if kind == "garbage":
        return rng.bytes(2000)
    if kind == "empty":
        return b""
    if kind == "png_header_bomb":
        return png_header_bomb()
    return jpeg_scan_bomb(img, repeats=200)


class Row(NamedTuple):
    """A row before its image exists: what the generators and the encoder need."""

    name: str
    label: int
    size: tuple[int, int]
    fmt: int | None
    family: str  # "real" for real rows; the pasted patch's family for tampered rows
    canvas: np.ndarray  # the crop a generator starts from (the image itself for real rows)
    bad: str | None = None


def split_of(ids: list[str], cfg: DemoDataConfig) -> np.ndarray:
    """0 train, 1 val, 2 test per img_id (or photo name) under the split the demo configs use."""
    return data_split(ids, DataConfig(test_fraction=cfg.test_fraction, split_group_sep="/"))


def train_photos(names: list[str], cfg: DemoDataConfig) -> list[str]:
    """Photos in the demo's TRAIN split: the only ones the generators ever see in training."""
    return [n for n, s in zip(names, split_of(names, cfg)) if s == 0]


def plan_rows(cfg: DemoDataConfig, photos: dict[str, np.ndarray], rng: np.random.Generator) -> list[Row]:
    """Every row's photo, label, size, format and family; each fake's canvas is cropped MARGIN px
    larger on each side than its row (trained families) so generation never needs a resize."""
    names = sorted(photos)
    families = list(cfg.zoo.families)
    rows: list[Row] = []
    fakes = 0

    def add(label: int, size, fmt: int | None, bad: str | None = None):
        nonlocal fakes
        name = names[len(rows) % len(names)]
        family = "real" if label == 0 else "resample"
        if label == 1 and bad is None:
            family = families[fake_order[fakes % len(fake_order)]]
            fakes += 1
        margin = MARGIN if family in TRAINED else 0
        canvas = np.asarray(random_crop(photos[name], (size[0] + 2 * margin, size[1] + 2 * margin), rng))
        rows.append(Row(name, label, size, fmt, family, canvas, bad))

    n_fakes = cfg.rows_per_class + cfg.small_rows // 2
    fake_order = rng.permutation(n_fakes) % len(families)  # equal counts per family, in random order
    # Size and format are drawn once per real/fake PAIR, so the classes match exactly on both.
    for _ in range(cfg.rows_per_class):
        size, fmt = SIZES[int(rng.integers(len(SIZES)))], draw_format(rng)
        for label in (0, 1):
            add(label, size, fmt)
    for _ in range(cfg.tampered_rows):
        add(2, SIZES[int(rng.integers(len(SIZES)))], draw_format(rng))
    for _ in range(cfg.small_rows // 2):
        size, fmt = SMALL_SIZES[int(rng.integers(len(SMALL_SIZES)))], draw_format(rng)
        add(0, size, fmt)
        add(1, size, fmt)
    for i in range(cfg.corrupt_rows):
        add(i % 2, SIZES[0], 95, bad=BAD_KINDS[i % len(BAD_KINDS)])
    return rows


def training_patches(photos: dict[str, np.ndarray], names: list[str], cfg: ZooConfig, seed: int, n: int = 1024):
    """(n, 3, patch, patch) crops of the given photos in [-1, 1], made like the real rows."""
    rng = np.random.default_rng([seed, 1])
    crops = [np.asarray(random_crop(photos[names[i % len(names)]], (cfg.patch, cfg.patch), rng)) for i in range(n)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1


def make_images(cfg: DemoDataConfig, rows: list[Row], photos: dict[str, np.ndarray], log) -> tuple[list, dict]:
    """Each row's image (PIL) and, per family, its count and seconds spent (training + generation),
    logged as each family is done."""
    images: list = [None] * len(rows)
    stats: dict[str, dict] = {}
    names = train_photos(sorted(photos), cfg)
    patches = lru_cache(maxsize=1)(lambda: training_patches(photos, names, cfg.zoo, cfg.seed))
    for family in ["real", *cfg.zoo.families]:
        t0 = time.perf_counter()
        idx = [i for i, r in enumerate(rows) if r.family == family and r.label != 2]
        info: dict = {"rows": len(idx)}
        if family in zoo.TRAINED:
            model, info["cached"] = zoo.load_or_train(
                family, patches, cfg.zoo, cfg.seed, names)
            for j, size in enumerate(sorted({rows[i].size for i in idx})):
                same = [i for i in idx if rows[i].size == size]
                out = zoo.generate(family, model, np.stack([rows[i].canvas for i in same]), cfg.zoo,
                                   seed=cfg.seed * 1000 + j)
                for i, a in zip(same, out):
                    images[i] = Image.fromarray(a[MARGIN:MARGIN + size[1], MARGIN:MARGIN + size[0]])
        else:
            for k, i in enumerate(idx):
                a = rows[i].canvas
                images[i] = Image.fromarray(a if family == "real" else resample(a, ("nearest", "tconv")[k % 2]))
        info["seconds"] = round(time.perf_counter() - t0, 1)
        stats[family] = info
        log(f"  {family:10s} {info['rows']:5d} rows  {info['seconds']:6.1f} s" + (
            "" if "cached" not in info else "  (weights from the cache)" if info["cached"] else "  (trained)"))
    return images, stats


def make_rows(cfg: DemoDataConfig, log=lambda _: None) -> tuple[list[dict], dict]:
    """(SID_Set rows plus `generator`, per-family stats), in a random order."""
    rng = np.random.default_rng(cfg.seed)
    photos = source_photos()
    plan = plan_rows(cfg, photos, rng)
    images, stats = make_images(cfg, plan, photos, log)
    rows: list[dict] = []
    for i, r in enumerate(plan):
        img, mask = images[i], None
        if r.label == 2:
            img, mask = tampered(Image.fromarray(r.canvas), rng)
        data = encode(img, r.fmt)
        if r.bad is not None:
            data = bad_bytes(r.bad, img, data, rng)
        rows.append({
            "img_id": f"{r.name}/{i:06d}",
            "image": {"bytes": data, "path": None},
            "mask": None if mask is None else {"bytes": mask, "path": None},
            "width": img.width, "height": img.height, "label": r.label, "generator": r.family,
        })
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], stats


def write_samples(rows: list[dict], folder: Path, cfg: DemoDataConfig, per_class: int = 6) -> None:
    """Held-out files for trying the API: rows of the demo's TEST split, named for their truth (and
    a fake's family)."""
    def readable(data: bytes) -> bool:
        try:
            decode(data)
            return True
        except Exception:
            return False

    folder.mkdir(exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    test = split_of([r["img_id"] for r in rows], cfg) == 2
    for label, name in ((0, "real"), (1, "fake")):
        picked = [r for r, t in zip(rows, test) if t and r["label"] == label and r["width"] >= 112
                  and readable(r["image"]["bytes"])][::7]
        by_family: dict[str, list] = {}
        for r in picked:
            by_family.setdefault(r["generator"], []).append(r)
        # one of each family in turn, so the samples show every generator
        spread = [r for group in zip(*by_family.values()) for r in group] or picked
        files = {}
        for r in spread[:per_class]:
            data = r["image"]["bytes"]
            ext = "jpg" if data[:3] == b"\xff\xd8\xff" else "png"
            family = "" if label == 0 else f"{r['generator']}-"
            files[f"{name}-{family}{r['img_id'].replace('/', '-')}.{ext}"] = data
        # what the first files (by name) declare, pixels untouched, so the answers' provenance block has
        # something to show: a signed C2PA manifest, a web UI's parameters, camera EXIF
        declarations = ["c2pa", "generator_text"] if label == 1 else ["camera"]
        for i, file in enumerate(sorted(files)):
            data = declare(files[file], declarations[i]) if i < len(declarations) else files[file]
            (folder / file).write_bytes(data)


def _schema():
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([("img_id", pa.string()), ("image", image_type), ("mask", image_type),
                      ("width", pa.int32()), ("height", pa.int32()), ("label", pa.int64()),
                      ("generator", pa.string())])


def write_demo_data(cfg: DemoDataConfig, log=partial(print, flush=True)) -> Path:
    """Write `cfg.shards` parquet shards named like the hub's (data/train-0000i-of-0000n.parquet),
    SID_Set's columns plus `generator`; a folder already written with this config is kept as it is."""
    out = Path(cfg.out_dir)
    data_dir = out / "data"
    summary_file = out / "DEMO_DATA.json"
    files = [data_dir / f"train-{s:05d}-of-{cfg.shards:05d}.parquet" for s in range(cfg.shards)]
    config = json.loads(json.dumps(to_dict(cfg)))  # as it reads back from the JSON
    if summary_file.exists() and all(f.exists() for f in files):
        if json.loads(summary_file.read_text()).get("config") == config:
            log(f"demo data for this config already in {out}: reused")
            return out
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.glob("*.parquet"):
        old.unlink()
    summary_file.unlink(missing_ok=True)
    log(f"demo data -> {out}: real rows and each generator family's fakes (count, seconds)")
    rows, families = make_rows(cfg, log)
    for s, f in enumerate(files):
        pq.write_table(pa.Table.from_pylist(rows[s::cfg.shards], schema=_schema()), f, row_group_size=256)
    write_samples(rows, out / "samples", cfg)
    counts = {str(k): int(v) for k, v in zip(*np.unique([r["label"] for r in rows], return_counts=True))}
    summary_file.write_text(json.dumps({"rows": len(rows), "label_counts": counts, "families": families,
                                        "config": config}, indent=2))
    return out
