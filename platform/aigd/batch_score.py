"""Score a folder or a SID_Set-format parquet of images into one row per image (parquet or JSONL).

Unreadable or rejected images get a row with `error` (the reason) and no scores, so the output
accounts for every input. Rows are written chunk by chunk, in input order: memory stays flat
however many images there are.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from aigd.config import DecodeLimits, ScoringConfig
from aigd.errors import AigdError
from aigd.provenance import TABLE_COLUMNS, origin, table_columns
from aigd.sources import count_images, iter_images

SUFFIXES = (".parquet", ".jsonl")
# Parquet row groups of one scoring chunk each (16 rows) would make a slow, bloated file.
ROW_GROUP = 4096


class OutputError(ValueError):
    """An output path rows cannot be written to."""


def row(img_id: str, answer: dict | None, names: list[str], error: str | None = None,
        traced: dict | None = None) -> dict:
    """Flat columns: the final answer (ensemble when there are several members), each member's
    P(fake), and what traces the image (its SHA-256, what it declares: aigd.provenance)."""
    traced = table_columns(traced)
    if answer is None:
        return {"id": img_id, "error": error, "p_fake": None, "label": None, "threshold": None,
                **{f"p_fake_{n}": None for n in names}, **traced}
    members = answer.get("members", {answer["adapter"]: answer})
    return {"id": img_id, "error": None, "p_fake": answer["p_fake"], "label": answer["label"],
            "threshold": answer["threshold"], **{f"p_fake_{n}": members[n]["p_fake"] for n in names}, **traced}


def row_schema(names: list[str]) -> pa.Schema:
    """Declared up front: a chunk whose images all failed has only nulls to infer types from."""
    return pa.schema([("id", pa.string()), ("error", pa.string()), ("p_fake", pa.float64()), ("label", pa.string()),
                      ("threshold", pa.float64()), *[(f"p_fake_{n}", pa.float64()) for n in names],
                      *[(c, pa.string()) for c in TABLE_COLUMNS]])


def check_out(out: str) -> Path:
    path = Path(out)
    if path.suffix not in SUFFIXES:
        raise OutputError(f"output {out} must end in {' or '.join(SUFFIXES)}")
    if path.is_dir():
        raise OutputError(f"output {out} is a folder; name a file")
    return path


class _Jsonl:
    def __init__(self, path: Path):
        self.file = path.open("w")

    def write(self, rows: list[dict]) -> None:
        self.file.writelines(json.dumps(r) + "\n" for r in rows)

    def close(self) -> None:
        self.file.close()


class _Parquet:
    def __init__(self, path: Path, names: list[str]):
        self.schema, self.pending = row_schema(names), []
        self.writer = pq.ParquetWriter(path, self.schema)

    def write(self, rows: list[dict]) -> None:
        self.pending += rows
        if len(self.pending) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        self.writer.write_table(pa.Table.from_pylist(self.pending, schema=self.schema))
        self.pending = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


@contextmanager
def row_writer(out: Path, names: list[str]):
    """`write(rows)`, into OUT.partial, renamed to OUT once every row is in: a run that dies midway
    never leaves a file that looks complete."""
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = _Parquet(partial, names) if out.suffix == ".parquet" else _Jsonl(partial)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        yield writer.write
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    partial.replace(out)


def chunks(items, size: int):
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def score_chunk(scorer, cfg: ScoringConfig, chunk: list[tuple[str, bytes | None]], names: list[str]) -> list[dict]:
    """The chunk's rows in input order, its readable images scored in one batch."""
    limits = DecodeLimits.preset("batch")
    prepared, errors, traced = {}, {}, {}
    for i, (img_id, data) in enumerate(chunk):
        try:
            if data is None:
                raise AigdError("no image bytes")
            traced[i] = origin(data, cfg.provenance)
            prepared[i] = scorer.prepare(data, limits)
        except AigdError as e:
            errors[i] = f"{e.code}: {e}"
    answers = dict(zip(prepared, scorer.answers(list(prepared.values()), cfg.ensemble))) if prepared else {}
    return [row(img_id, answers.get(i), names, errors.get(i), traced.get(i)) for i, (img_id, _) in enumerate(chunk)]


def score_path(cfg: ScoringConfig, path: str, out: str, batch_size: int = 16) -> dict:
    """Raises OutputError or DataError for a bad `out` or `path` before the model loads."""
    from tqdm import tqdm

    target = check_out(out)
    total = count_images(path)
    from aigd.scorer import Scorer  # only now: a bad `out` or `path` is reported without waiting for torch

    names = list(cfg.ensemble.members or cfg.adapters)
    summary = {"rows": 0, "scored": 0, "unreadable": 0, "out": out}
    with row_writer(target, names) as write:
        scorer = Scorer(cfg)
        for chunk in chunks(tqdm(iter_images(path), total=total, unit="img", desc="scoring"), batch_size):
            rows = score_chunk(scorer, cfg, chunk, names)
            write(rows)
            summary["rows"] += len(rows)
            summary["unreadable"] += sum(r["error"] is not None for r in rows)
    summary["scored"] = summary["rows"] - summary["unreadable"]
    return summary
