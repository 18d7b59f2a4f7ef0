"""The demo set has SID_Set's columns, the promised label mix, and no size/aspect/format shortcut."""

import io
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import SMALL_DEMO, small_zoo


def test_columns_and_label_mix(demo_data):
    t = pq.ParquetDataset(sorted(str(p) for p in (demo_data / "data").glob("*.parquet"))).read()
    assert t.column_names == ["img_id", "image", "mask", "width", "height", "label", "generator"]
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
    from aigd.dev.demo_data import write_demo_data

    again = write_demo_data(DemoDataConfig(out_dir=str(tmp_path / "again"), zoo=small_zoo(), **SMALL_DEMO))
    a = pq.read_table(sorted((demo_data / "data").glob("*.parquet"))[0])
    b = pq.read_table(sorted((again / "data").glob("*.parquet"))[0])
    assert a.equals(b)


@pytest.mark.slow  # a model or process group of its own: seconds, not the edit loop
def test_every_family_makes_an_equal_share_of_the_fakes(demo_data):
    t = pq.ParquetDataset(sorted(str(p) for p in (demo_data / "data").glob("*.parquet"))).read().to_pylist()
    fakes = Counter(r["generator"] for r in t if r["label"] == 1 and r["img_id"] not in _unreadable(t))
    assert set(fakes) == set(small_zoo().families)
    assert max(fakes.values()) - min(fakes.values()) <= 1
    assert {r["generator"] for r in t if r["label"] == 0} == {"real"}
    assert {r["generator"] for r in t if r["label"] == 2} == {"resample"}  # the pasted patch's family


def _unreadable(rows) -> set:
    out = set()
    for r in rows:
        try:
            Image.open(io.BytesIO(r["image"]["bytes"])).load()
        except Exception:
            out.add(r["img_id"])
    return out


def test_generators_never_see_a_val_or_test_photo(tmp_path, monkeypatch):
    from aigd.dev import zoo
    from aigd.config import DataConfig, DemoDataConfig
    from aigd.dev.demo_data import source_photos, write_demo_data
    from aigd.sampling import assign_split, unit_hash

    seen = {}
    real = zoo.load_or_train

    def spy(family, patches_fn, cfg, seed, photos):
        seen[family] = list(photos)
        return real(family, patches_fn, cfg, seed, photos)

    monkeypatch.setattr(zoo, "load_or_train", spy)
    write_demo_data(DemoDataConfig(out_dir=str(tmp_path / "d"), rows_per_class=20, tampered_rows=0, small_rows=0,
                                   shards=1, zoo=small_zoo()), log=lambda _: None)
    names = sorted(source_photos())
    split = DataConfig(test_fraction=DemoDataConfig().test_fraction)
    which = assign_split(unit_hash(names, split.split_salt), split.val_fraction, split.test_fraction)
    train = {n for n, s in zip(names, which) if s == 0}
    assert 0 < len(train) < len(names) and (which == 2).sum() >= 3  # a test split of several photos
    assert set(seen) == set(zoo.TRAINED)
    for family, photos in seen.items():
        assert photos and set(photos) == train, family


def test_a_second_run_reuses_the_data_and_the_trained_weights(tmp_path, demo_data):
    from aigd.config import DemoDataConfig
    from aigd.dev.demo_data import write_demo_data

    cfg = DemoDataConfig(out_dir=str(demo_data), zoo=small_zoo(), **SMALL_DEMO)
    said = []
    write_demo_data(cfg, log=said.append)
    assert said == [f"demo data for this config already in {demo_data}: reused"]
    said.clear()
    write_demo_data(DemoDataConfig(out_dir=str(tmp_path / "other"), zoo=small_zoo(), **SMALL_DEMO), log=said.append)
    assert sum("(weights from the cache)" in line for line in said) == 4 and not any("(trained)" in x for x in said)
