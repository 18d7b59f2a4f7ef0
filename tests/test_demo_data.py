"""The demo set has SID_Set's columns, the promised label mix, and no size/aspect/format shortcut."""

import io
from collections import Counter

import pyarrow.parquet as pq
from PIL import Image

from conftest import SMALL_DEMO


def test_columns_and_label_mix(demo_data):
    t = pq.ParquetDataset(sorted(str(p) for p in (demo_data / "data").glob("*.parquet"))).read()
    assert t.column_names == ["img_id", "image", "mask", "width", "height", "label"]
    labels = Counter(t.column("label").to_pylist())
    n = SMALL_DEMO["rows_per_class"] + SMALL_DEMO["small_rows"] // 2
    bad = SMALL_DEMO["corrupt_rows"]  # unreadable rows alternate labels, starting with real
    assert labels == {0: n + (bad + 1) // 2, 1: n + bad // 2, 2: SMALL_DEMO["tampered_rows"]}
    masks = [m is not None for m in t.column("mask").to_pylist()]
    assert sum(masks) == SMALL_DEMO["tampered_rows"]
    assert len(set(t.column("img_id").to_pylist())) == t.num_rows


def test_no_size_aspect_or_format_shortcut(demo_data):
    t = pq.ParquetDataset(sorted(str(p) for p in (demo_data / "data").glob("*.parquet"))).read().to_pylist()
    stats = {0: Counter(), 1: Counter()}
    for r in t:
        if r["label"] not in (0, 1) or r["width"] < 112:
            continue
        try:
            fmt = Image.open(io.BytesIO(r["image"]["bytes"])).format
        except Exception:
            continue
        stats[r["label"]][("fmt", fmt)] += 1
        stats[r["label"]][("size", r["width"], r["height"])] += 1
    n0, n1 = sum(v for k, v in stats[0].items() if k[0] == "fmt"), sum(v for k, v in stats[1].items() if k[0] == "fmt")
    for key in set(stats[0]) | set(stats[1]):
        share0, share1 = stats[0][key] / n0, stats[1][key] / n1
        assert abs(share0 - share1) < 0.02, (key, share0, share1)  # paired by construction


def test_deterministic(tmp_path, demo_data):
    from aigd.config import DemoDataConfig
    from aigd.demo_data import write_demo_data

    again = write_demo_data(DemoDataConfig(out_dir=str(tmp_path / "again"), **SMALL_DEMO))
    a = pq.read_table(sorted((demo_data / "data").glob("*.parquet"))[0])
    b = pq.read_table(sorted((again / "data").glob("*.parquet"))[0])
    assert a.equals(b)
