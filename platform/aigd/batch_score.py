"""Score a folder or a SID_Set-format parquet of images into one row per image (parquet or JSONL).

Unreadable or rejected images get a row with `error` (the reason) and no scores, so the output
accounts for every input.
"""

from __future__ import annotations

import json
from pathlib import Path

from aigd.config import DecodeLimits, ScoringConfig
from aigd.errors import AigdError
from aigd.scorer import Scorer
from aigd.sources import count_images, iter_images


def row(img_id: str, answer: dict | None, names: list[str], error: str | None = None) -> dict:
    """Flat columns: the final answer (ensemble when there are several members) and each member's P(fake)."""
    if answer is None:
        return {"id": img_id, "error": error, "p_fake": None, "label": None, "threshold": None,
                **{f"p_fake_{n}": None for n in names}}
    members = answer.get("members", {answer["adapter"]: answer})
    return {"id": img_id, "error": None, "p_fake": answer["p_fake"], "label": answer["label"],
            "threshold": answer["threshold"], **{f"p_fake_{n}": members[n]["p_fake"] for n in names}}


def score_path(cfg: ScoringConfig, path: str, out: str, batch_size: int = 16) -> dict:
    from tqdm import tqdm

    scorer = Scorer(cfg)
    names = list(cfg.ensemble.members or scorer.members)
    limits = DecodeLimits.preset("batch")
    rows: list[dict] = []
    pending: list[tuple[str, object]] = []

    def flush():
        if pending:
            answers = scorer.answers([img for _, img in pending], cfg.ensemble)
            rows.extend(row(img_id, a, names) for (img_id, _), a in zip(pending, answers))
            pending.clear()

    for img_id, data in tqdm(iter_images(path), total=count_images(path), unit="img", desc="scoring"):
        try:
            if data is None:
                raise AigdError("no image bytes")
            pending.append((img_id, scorer.prepare(data, limits)))
        except AigdError as e:
            rows.append(row(img_id, None, names, f"{e.code}: {e}"))
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
