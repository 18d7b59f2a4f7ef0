"""Score a folder or a SID_Set-format parquet of images into one row per image (parquet or JSONL).

Unreadable or rejected images get a row with `error` (the reason) and no scores, so the output
accounts for every input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from aigd.config import EvalConfig
from aigd.errors import AigdError

COLUMNS_BASE = ("id", "label", "p_fake", "error")


def inputs(path: str) -> Iterator[tuple[str, bytes | None]]:
    """(id, bytes) per image: file paths under a folder, or img_id from parquet shards."""
    p = Path(path)
    if p.is_dir() and not any(p.rglob("*.parquet")):
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            yield str(f), f.read_bytes()
        return
    import pyarrow.parquet as pq

    from aigd.data import image_bytes, _parquet_files

    for shard in _parquet_files(path):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=256, columns=["img_id", "image"]):
            ids = batch.column("img_id").to_pylist()
            for img_id, data in zip(ids, image_bytes(batch.column("image").to_pylist())):
                yield str(img_id), data


def count(path: str) -> int | None:
    p = Path(path)
    if p.is_dir() and not any(p.rglob("*.parquet")):
        return sum(1 for x in p.rglob("*") if x.is_file())
    import pyarrow.parquet as pq

    from aigd.data import _parquet_files

    return sum(pq.ParquetFile(f).metadata.num_rows for f in _parquet_files(path))


def score_path(cfg: EvalConfig, path: str, out: str, batch_size: int = 16) -> dict:
    from tqdm import tqdm

    from aigd.detector import Detector, combine
    from aigd.images import decode
    from aigd.prompt import prepare_image

    detector = Detector(cfg.model, cfg.image, cfg.adapters)
    names = list(cfg.adapters)
    # one member: its own threshold; several: the same weighted mean as their probabilities
    threshold = combine({n: detector.members[n].threshold for n in names}, cfg.ensemble_weights)
    rows: list[dict] = []
    pending: list[tuple[str, object]] = []

    def flush():
        if not pending:
            return
        images = [img for _, img in pending]
        p = {n: detector.score(images, n) for n in names}
        for i, (img_id, _) in enumerate(pending):
            row = {"id": img_id, "error": None, **{f"p_fake_{n}": float(p[n][i]) for n in names}}
            p_final = combine({n: p[n][i] for n in names}, cfg.ensemble_weights)
            row["p_fake"] = float(p_final)
            row["label"] = "fake" if p_final >= threshold else "real"
            rows.append(row)
        pending.clear()

    for img_id, data in tqdm(inputs(path), total=count(path), unit="img", desc="scoring"):
        try:
            if data is None:
                raise AigdError("no image bytes")
            pending.append((img_id, prepare_image(decode(data), cfg.image)))
        except AigdError as e:
            rows.append({"id": img_id, "error": f"{e.code}: {e}", "p_fake": None, "label": None,
                         **{f"p_fake_{n}": None for n in names}})
        if len(pending) >= batch_size:
            flush()
    flush()
    write_rows(rows, Path(out))
    return {"rows": len(rows), "scored": sum(r["error"] is None for r in rows),
            "unreadable": sum(r["error"] is not None for r in rows), "out": out}


def write_rows(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out)
    else:
        raise ValueError(f"output {out} must end in .parquet or .jsonl")
