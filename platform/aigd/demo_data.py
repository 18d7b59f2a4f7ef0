"""A small, offline, deterministic dataset in SID_Set's format (parquet shards).

Real rows are crops of real photographs that ship inside scikit-image and scikit-learn, scaled
DOWN (so they carry no resampling trace). Synthetic rows are a PROXY of generator fingerprints,
not a real generator: other crops of the same photos passed through an upsampling stage like a
generator's last layers (2x box downsample then nearest-neighbour or stride-2 transposed-conv
upsampling), which leaves periodic 2-px artefacts. Size, aspect ratio and file format are drawn
independently of the label, so none of them is a shortcut (SID_Set itself leaks aspect ratio).

img_id is "<photo>/<index>": splitting on the photo name keeps crops of one photo in one split.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from aigd.config import DemoDataConfig

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


def generator_fingerprint(img: Image.Image, kind: str) -> Image.Image:
    """Proxy of a generator's upsampling trace: 2x box down, then 2x nearest or transposed-conv up."""
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape[:2]
    small = a.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    if kind == "nearest":
        up = small.repeat(2, axis=0).repeat(2, axis=1)
    else:  # stride-2 transposed conv with the separable kernel [k, 1, k]
        k = 0.54
        up = np.zeros((h, w, 3), np.float32)
        up[::2, ::2] = small
        rows = up.copy()
        rows[1:-1:2] = k * (up[:-2:2] + up[2::2])
        rows[-1] = k * up[-2]
        out = rows.copy()
        out[:, 1:-1:2] = k * (rows[:, :-2:2] + rows[:, 2::2])
        out[:, -1] = k * rows[:, -2]
        up = out / np.maximum(out.mean(), 1e-6) * a.mean()
    return Image.fromarray(np.clip(up + 0.5, 0, 255).astype(np.uint8))


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
    patch = generator_fingerprint(img.crop((x, y, x + pw, y + ph)), "nearest")
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
    if kind == "truncated":
        return data[: len(data) // 3]
    if kind == "garbage":
        return rng.bytes(2000)
    if kind == "empty":
        return b""
    if kind == "png_header_bomb":
        return png_header_bomb()
    return jpeg_scan_bomb(img, repeats=200)


def make_rows(cfg: DemoDataConfig) -> list[dict]:
    rng = np.random.default_rng(cfg.seed)
    photos = source_photos()
    names = sorted(photos)
    rows: list[dict] = []

    def add(label: int, size, fmt: int | None, bad: str | None = None):
        name = names[len(rows) % len(names)]
        img = random_crop(photos[name], size, rng)
        mask = None
        if label == 1:
            img = generator_fingerprint(img, "nearest" if rng.random() < 0.5 else "tconv")
        elif label == 2:
            img, mask = tampered(img, rng)
        data = encode(img, fmt)
        if bad is not None:
            data = bad_bytes(bad, img, data, rng)
        rows.append({
            "img_id": f"{name}/{len(rows):06d}",
            "image": {"bytes": data, "path": None},
            "mask": None if mask is None else {"bytes": mask, "path": None},
            "width": img.width, "height": img.height, "label": label,
        })

    # Size and format are drawn once per real/fake PAIR, so the classes match exactly on both.
    for i in range(cfg.rows_per_class):
        size, fmt = SIZES[int(rng.integers(len(SIZES)))], draw_format(rng)
        for label in (0, 1):
            add(label, size, fmt)
    for _ in range(cfg.tampered_rows):
        add(2, SIZES[int(rng.integers(len(SIZES)))], draw_format(rng))
    for i in range(cfg.small_rows // 2):
        size, fmt = SMALL_SIZES[int(rng.integers(len(SMALL_SIZES)))], draw_format(rng)
        add(0, size, fmt)
        add(1, size, fmt)
    for i in range(cfg.corrupt_rows):
        add(i % 2, SIZES[0], 95, bad=BAD_KINDS[i % len(BAD_KINDS)])
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def write_samples(rows: list[dict], folder: Path, per_class: int = 6) -> None:
    """Held-out files for trying the API: rows of the demo configs' TEST split (split by photo, with
    DataConfig's default salt and fractions), named for their truth."""
    from aigd.config import DataConfig
    from aigd.sampling import assign_split, split_key, unit_hash
    from aigd.images import decode

    def readable(data: bytes) -> bool:
        try:
            decode(data)
            return True
        except Exception:
            return False

    folder.mkdir(exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    split = DataConfig()
    test = assign_split(unit_hash(split_key([r["img_id"] for r in rows], "/"), split.split_salt),
                        split.val_fraction, split.test_fraction) == 2
    for label, name in ((0, "real"), (1, "fake")):
        picked = [r for r, t in zip(rows, test) if t and r["label"] == label and r["width"] >= 112
                  and readable(r["image"]["bytes"])][::7][:per_class]
        for r in picked:
            ext = "jpg" if r["image"]["bytes"][:3] == b"\xff\xd8\xff" else "png"
            (folder / f"{name}-{r['img_id'].replace('/', '-')}.{ext}").write_bytes(r["image"]["bytes"])


def write_demo_data(cfg: DemoDataConfig) -> Path:
    """Write `cfg.shards` parquet shards named like the hub's (data/train-0000i-of-0000n.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(cfg.out_dir)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.glob("*.parquet"):
        old.unlink()
    rows = make_rows(cfg)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("img_id", pa.string()), ("image", image_type), ("mask", image_type),
                        ("width", pa.int32()), ("height", pa.int32()), ("label", pa.int64())])
    for s in range(cfg.shards):
        part = rows[s::cfg.shards]
        table = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(table, data_dir / f"train-{s:05d}-of-{cfg.shards:05d}.parquet", row_group_size=256)
    write_samples(rows, out / "samples")
    counts = {str(k): int(v) for k, v in zip(*np.unique([r["label"] for r in rows], return_counts=True))}
    (out / "DEMO_DATA.json").write_text(json.dumps({"rows": len(rows), "label_counts": counts,
                                                     "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}},
                                                    indent=2))
    return out
