"""Where images come from: SID_Set parquet shards (local or s3:// / gs://), a `save_to_disk` folder,
an image folder (real/ and fake/, or one folder per generator as GenImage ships them), or the hub;
read by training, evaluation and batch scoring.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from aigd.config import DataConfig

META_COLUMNS = ["img_id", "width", "height", "label"]

log = logging.getLogger(__name__)


class DataError(ValueError):
    pass


def is_remote(path: str) -> bool:
    return "://" in path


def _filesystem(path: str):
    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def parquet_files(path: str) -> tuple[object, list[str]]:
    """(filesystem, sorted shard paths) under a folder or URI, or the one file named."""
    fs, root = _filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return fs, [root]
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path} does not exist")
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    if not files:
        raise DataError(f"no parquet shards under {path}")
    return fs, files


def resolve_source(cfg: DataConfig) -> DataConfig:
    """`hub` becomes a local parquet folder (downloaded once); offline, a clear error says what to do."""
    if cfg.source != "hub":
        if not is_remote(cfg.path) and not Path(cfg.path).exists():
            raise DataError(f"data.path {cfg.path!r} does not exist (source {cfg.source})")
        return cfg
    hint = (f"download it where the network allows: `hf download {cfg.path} --repo-type dataset "
            f"--local-dir DIR` (DIR on storage every node mounts, or an s3:// / gs:// copy), then set "
            f"data.source=sid_parquet data.path=DIR")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"data.source=hub but HF_HUB_OFFLINE=1: {hint}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(cfg.path, repo_type="dataset", allow_patterns=["*.parquet"])
    except Exception as e:
        raise DataError(f"cannot reach the hub for {cfg.path} ({type(e).__name__}): {hint}") from None
    return dataclasses.replace(cfg, source="sid_parquet", path=local)


# Class folder names: SID_Set-style real/fake, GenImage's nature/ai, AIGCDetectBenchmark's 0_real/1_fake.
CLASS_FOLDERS = {"real": 0, "0_real": 0, "nature": 0, "fake": 1, "1_fake": 1, "ai": 1}
FOLDER_LAYOUTS = ("<root>/real/* and <root>/fake/* (also 0_real/1_fake, nature/ai), or by generator: "
                  "<root>/<generator>/0_real/* and <root>/<generator>/1_fake/*, deeper nesting allowed "
                  "(<root>/<generator>/val/nature/*)")


def _folder_class(rel: Path) -> tuple[int, str] | None:
    """(label, generator) from the nearest class folder above a file (path relative to root); None
    when it is under none. The generator is the first folder when the class folder sits deeper."""
    folders = rel.parts[:-1]
    for depth in range(len(folders) - 1, -1, -1):
        label = CLASS_FOLDERS.get(folders[depth].lower())
        if label is not None:
            return label, folders[0] if depth > 0 else "unknown"
    return None


def _image_size(f: Path) -> tuple[int, int]:
    try:
        with Image.open(f) as im:  # header only
            return im.size
    except Exception:
        return 0, 0  # unreadable: kept so the decode stage counts it


def image_folder_table(path: str) -> pa.Table:
    """One row per file under a class folder (see FOLDER_LAYOUTS); `image` is the file's path."""
    root = Path(path)
    found, ignored = [], 0
    for f in root.rglob("*"):
        if not f.is_file():
            continue
        rel = f.relative_to(root)
        cls = _folder_class(rel)
        if cls is None:
            ignored += 1
        else:
            found.append((cls[0], rel, cls[1]))
    if not found:
        raise DataError(f"image folder {path} has no files under a class folder ({ignored} files "
                        f"elsewhere); accepted layouts: {FOLDER_LAYOUTS}")
    if ignored:
        log.warning("image folder %s: %d files under no class folder ignored", path, ignored)
    found.sort()  # real rows first, each class in path order: the plain layout's order is unchanged
    sizes = [_image_size(root / rel) for _, rel, _ in found]
    return pa.table({"img_id": [str(rel) for _, rel, _ in found],
                     "image": [str(root / rel) for _, rel, _ in found],
                     "width": [w for w, _ in sizes], "height": [h for _, h in sizes],
                     "label": [label for label, _, _ in found],
                     "generator": [gen for _, _, gen in found]})


@lru_cache(maxsize=2)
def hf_disk_table(path: str) -> pa.Table:
    from datasets import load_from_disk

    ds = load_from_disk(path)
    if hasattr(ds, "keys"):  # DatasetDict: take train
        ds = ds["train"]
    return ds.data.table


def shards(cfg: DataConfig) -> list[str]:
    """What metadata's `_file` indexes: the parquet shards, or the one folder."""
    return parquet_files(cfg.path)[1] if cfg.source == "sid_parquet" else [cfg.path]


def _located(table: pa.Table, rows_per_file: list[int]) -> pa.Table:
    """Where each row's image lives: `_file` indexes shards(cfg), `_row` is the row in that shard."""
    file_idx = np.repeat(np.arange(len(rows_per_file), dtype=np.int32), rows_per_file)
    rows = (np.concatenate([np.arange(n, dtype=np.int64) for n in rows_per_file]) if rows_per_file
            else np.zeros(0, np.int64))
    return table.append_column("_file", pa.array(file_idx)).append_column("_row", pa.array(rows))


def _meta_columns(cfg: DataConfig, available: list[str], extra) -> list[str]:
    missing = [c for c in extra if c not in available]
    if missing:
        raise DataError(f"{cfg.source} {cfg.path} has no column {', '.join(missing)} "
                        f"(its columns: {', '.join(available)})")
    return list(dict.fromkeys(META_COLUMNS + list(extra)))


def metadata(cfg: DataConfig, extra: tuple[str, ...] | list[str] = ()) -> pa.Table:
    """img_id/width/height/label, the `extra` columns asked for and those `cfg.exclude` filters on,
    and the row's location for every row, without reading image bytes."""
    extra = [*extra, *cfg.exclude]
    if cfg.source == "sid_parquet":
        fs, files = parquet_files(cfg.path)
        ds = pq.ParquetDataset(files, filesystem=fs)
        columns = _meta_columns(cfg, ds.schema.names, extra)  # parquet reads only these columns
        table = _located(ds.read(columns=columns), [f.metadata.num_rows for f in ds.fragments])
    elif cfg.source in ("hf_disk", "image_folder"):
        table = hf_disk_table(cfg.path) if cfg.source == "hf_disk" else image_folder_table(cfg.path)
        table = table.select(_meta_columns(cfg, table.column_names, extra))
        table = _located(table, [table.num_rows])
    else:
        raise DataError(f"source {cfg.source} must be resolved first")
    if cfg.max_rows is not None:
        table = table.slice(0, cfg.max_rows)
    return table


def row_blocks(rows: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Selected metadata rows cut into blocks of at most `rows_per_block` rows of one shard each:
    the unit of work of the stage that reads and decodes the images."""
    file_idx = rows.column("_file").to_numpy()
    starts = np.flatnonzero(np.diff(file_idx, prepend=-1))
    ends = np.append(starts[1:], len(file_idx))
    return [rows.slice(s, min(rows_per_block, e - s)) for a, e in zip(starts, ends)
            for s in range(a, e, rows_per_block)]


def _parquet_columns(path: str, shard: str, row_idx, columns: list[str]) -> dict[str, list]:
    """The given columns of the given rows of one shard (None for a column it lacks), reading only
    the row groups that hold them."""
    fs = _filesystem(path)[0]
    with fs.open_input_file(shard) as fh:
        pf = pq.ParquetFile(fh)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        group = np.searchsorted(starts, row_idx, side="right") - 1
        wanted = np.unique(group)
        before = np.concatenate([[0], np.cumsum([sizes[g] for g in wanted])])  # offsets in the read table
        pos = before[np.searchsorted(wanted, group)] + (row_idx - starts[group])
        stored = [c for c in columns if c in pf.schema_arrow.names]
        part = pf.read_row_groups(wanted.tolist(), columns=stored).take(pa.array(pos))
    return {c: part.column(c).to_pylist() if c in stored else [None] * len(row_idx) for c in columns}


def with_images(cfg: DataConfig, files: list[str], rows: pa.Table, columns: tuple[str, ...] = ("image",)) -> pa.Table:
    """A block from row_blocks plus its `image` column (bytes structs, bytes, or file paths), and
    any other stored column asked for (`mask`: None where a source holds none)."""
    ids = rows.column("img_id").to_pylist()
    if not ids:
        for c in columns:
            rows = rows.append_column(c, pa.array([], pa.binary()))
        return rows
    shard = files[rows.column("_file")[0].as_py()]
    row_idx = rows.column("_row").to_numpy()
    if cfg.source == "sid_parquet":
        got = _parquet_columns(cfg.path, shard, row_idx, ["img_id", *columns])
    elif cfg.source == "hf_disk":
        table = hf_disk_table(shard)
        got = {c: table.column(c).take(pa.array(row_idx)).to_pylist() if c in table.column_names else [None] * len(ids)
               for c in ["img_id", *columns]}
    else:
        got = {"img_id": ids, **{c: [None] * len(ids) for c in columns}, "image": [str(Path(shard) / i) for i in ids]}
    found = got["img_id"]
    if [str(x) for x in found] != [str(x) for x in ids]:
        raise DataError(f"{shard} changed after its rows were planned (img_id {found[0]!r} where {ids[0]!r} "
                        f"was expected): rerun the job")
    for c in columns:
        rows = rows.append_column(c, pa.array(got[c]))
    return rows


def image_bytes(col) -> list:
    """SID_Set stores {bytes, path} structs; plain binary and file paths work too."""
    out = []
    for v in col:
        if isinstance(v, dict):
            data = v.get("bytes")
            if data is None and v.get("path"):
                data = Path(v["path"]).read_bytes()
            out.append(data)
        elif isinstance(v, str):
            out.append(Path(v).read_bytes())
        else:
            out.append(v)
    return out


def _is_image_folder(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and not any(p.rglob("*.parquet"))


def iter_images(path: str) -> Iterator[tuple[str, bytes | None]]:
    """(id, bytes) per image: file paths under a folder, or img_id from parquet shards."""
    if _is_image_folder(path):
        for f in sorted(x for x in Path(path).rglob("*") if x.is_file()):
            yield str(f), f.read_bytes()
        return
    fs, files = parquet_files(path)
    for shard in files:
        with fs.open_input_file(shard) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=256, columns=["img_id", "image"]):
                ids = batch.column("img_id").to_pylist()
                for img_id, data in zip(ids, image_bytes(batch.column("image").to_pylist())):
                    yield str(img_id), data


def count_images(path: str) -> int:
    if _is_image_folder(path):
        return sum(1 for x in Path(path).rglob("*") if x.is_file())
    fs, files = parquet_files(path)
    return pq.ParquetDataset(files, filesystem=fs).read(columns=["img_id"]).num_rows
