"""The streamed Ray Data pipeline on the small demo set, on a real local Ray."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from aigd import data as D
from aigd import sampling as S
from aigd.batching import encode
from aigd.config import AugmentConfig, DataConfig, ImagePolicy
from aigd.image_view import prepare_image
from aigd.sources import DataError, metadata, row_blocks, with_images
from conftest import corrupt_by_split

POLICY = ImagePolicy(max_pixels=140 * 140, min_pixels=56 * 56)
AUG = AugmentConfig(enabled=True, crop_size=112, crop_scale=(0.5, 1.0), jpeg_p=1.0, jpeg_quality=(50, 95))


@pytest.fixture(scope="module")
def cfg(demo_data):
    return DataConfig(source="sid_parquet", path=str(demo_data), min_width=112, split_group_sep="/",
                      preprocess_cpus=0.5, preserve_order=True)


@pytest.fixture(scope="module")
def table(demo_data):
    return pq.ParquetDataset(sorted(str(p) for p in (demo_data / "data").glob("*.parquet"))).read()


def _expected_counts(table, cfg):
    """Independent recount in plain Python."""
    labels, widths = table.column("label").to_pylist(), table.column("width").to_pylist()
    ids = table.column("img_id").to_pylist()
    u = S.unit_hash([i.split("/")[0] for i in ids], cfg.split_salt)
    out = {s: [0, 0] for s in S.SPLITS}
    for lab, w, x in zip(labels, widths, u):
        if lab == 2 or w < cfg.min_width:
            continue
        split = "test" if x < cfg.test_fraction else "val" if x < cfg.test_fraction + cfg.val_fraction else "train"
        out[split][lab] += 1
    return out


def test_filter_and_split_counts_are_exact(cfg, table):
    counts = S.Catalog.read(cfg).counts()
    assert counts == _expected_counts(table, cfg)
    assert sum(map(sum, counts.values())) == 2 * 120 + 5  # 120 per class + 5 unreadable; small + tampered dropped
    everything = S.Catalog.of(cfg, table).select("all")  # evaluation of a whole folder: filters, no split
    assert everything.num_rows == 2 * 120 + 5 and set(everything.column("label").to_pylist()) == {0, 1}


def test_an_excluded_generator_leaves_every_split_and_nothing_else_does(cfg, table):
    import dataclasses

    held_out = dataclasses.replace(cfg, exclude={"generator": ["vae"]})
    meta = S.Catalog.read(held_out)  # reads the column the filter needs
    assert "generator" in meta.table.column_names
    gens = dict(zip(table.column("img_id").to_pylist(), table.column("generator").to_pylist()))
    for split in S.SPLITS:
        kept = meta.select(split).column("img_id").to_pylist()
        every = S.Catalog.read(cfg).select(split).column("img_id").to_pylist()
        assert "vae" not in {gens[i] for i in kept}
        assert set(kept) == {i for i in every if gens[i] != "vae"}
    assert meta.counts()["train"][0] == S.Catalog.read(cfg).counts()["train"][0]


def test_tampered_can_count_as_fake(cfg):
    import dataclasses

    counts = S.Catalog.read(dataclasses.replace(cfg, tampered="fake")).counts()
    base = S.Catalog.read(cfg).counts()
    assert sum(c[1] for c in counts.values()) == sum(c[1] for c in base.values()) + 10


def test_split_is_stable_and_disjoint(cfg, table):
    ids = table.column("img_id").to_pylist()
    keys = S.split_key(ids, "/")
    a = S.assign_split(S.unit_hash(keys, cfg.split_salt), cfg.val_fraction, cfg.test_fraction)
    b = S.assign_split(S.unit_hash(list(reversed(keys)), cfg.split_salt), cfg.val_fraction, cfg.test_fraction)
    assert (a == b[::-1]).all()  # depends on the key only, not on order or process
    groups = {s: {k for k, x in zip(keys, a) if x == s} for s in range(3)}
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    # A literal, not a second call: the split must be the same on every machine, process, Python version
    # and hash seed (PYTHONHASHSEED), which only a value computed once elsewhere can check.
    assert S.unit_hash(["astronaut"], "aigd-split-v1")[0] == 0.1800817249154217


def test_label_outside_the_map_is_an_error_naming_the_row(cfg):
    with pytest.raises(DataError, match="row 1: label 7 "):
        S.class_of(np.array([0, 7]), cfg)


def test_balance_is_exact_and_redrawn_per_epoch(cfg, table, ray_local):
    cat = S.Catalog.read(cfg)
    counts = cat.counts()
    n = min(counts["train"])
    picked = []
    for epoch in (0, 1):
        sample = S.balance(cat, epoch)
        ds, _ = D.planned_rows(cat, "train", sample)
        rows = ds.select_columns(["img_id", "label"]).take_all()
        labels = [r["label"] for r in rows]
        assert labels.count(0) == n and labels.count(1) == n
        picked.append({r["img_id"] for r in rows})
    if counts["train"][0] != counts["train"][1]:
        assert picked[0] != picked[1]


def test_planned_blocks_read_exactly_their_rows(cfg, table, tmp_path):
    """Blocks hold <= n rows of one shard; reading a block's images touches only the row groups that
    hold its rows, in order, even when the selection skips rows and groups; a shard rewritten after
    planning is an error, not silently different images."""
    import dataclasses

    import pyarrow as pa

    shard = tmp_path / "data" / "train-00000.parquet"
    shard.parent.mkdir()
    pq.write_table(table.slice(0, 60), shard, row_group_size=7)
    small = dataclasses.replace(cfg, path=str(tmp_path))
    meta = metadata(small)
    assert meta.column("_row").to_pylist() == list(range(60)) and set(meta.column("_file").to_pylist()) == {0}
    picked = meta.filter(pa.array([i % 3 != 1 and not 21 <= i < 35 for i in range(60)]))
    blocks = row_blocks(picked, 5)
    assert all(b.num_rows <= 5 for b in blocks) and pa.concat_tables(blocks).equals(picked)
    want = {r["img_id"]: r["image"] for r in table.slice(0, 60).to_pylist()}
    got = pa.concat_tables([with_images(small, [str(shard)], b) for b in blocks])
    assert got.column("img_id").to_pylist() == picked.column("img_id").to_pylist()
    assert all(img == want[i] for i, img in zip(got.column("img_id").to_pylist(), got.column("image").to_pylist()))
    across = metadata(cfg)  # the demo's shards: blocks never mix two of them
    assert all(len(set(b.column("_file").to_pylist())) == 1 for b in row_blocks(across, 64))
    pq.write_table(table.slice(1, 60), shard, row_group_size=7)
    with pytest.raises(DataError, match="changed after its rows were planned"):
        with_images(small, [str(shard)], blocks[0])


def test_preprocessing_actors_fit_the_cpus_left_and_a_per_worker_cap(cfg, ray_local):
    """On this 2-CPU test cluster: the CPUs the training workers hold are not counted, each actor
    holds preprocess_cpus, at most 4 per training worker, and an explicit count wins."""
    import dataclasses

    assert D.preprocess_actors(cfg) == 4  # 2 CPUs / 0.5
    assert D.preprocess_actors(cfg, reserved_cpus=1.0, train_workers=2) == 2
    light = dataclasses.replace(cfg, preprocess_cpus=0.1)
    assert D.preprocess_actors(light, reserved_cpus=1.0, train_workers=1) == D.ACTORS_PER_TRAIN_WORKER
    assert D.preprocess_actors(light, reserved_cpus=2.0) == 1  # never none
    assert D.preprocess_actors(dataclasses.replace(cfg, preprocess_actors=3), reserved_cpus=2.0) == 3


def test_validation_subset_is_fixed_and_keeps_the_class_proportions(cfg, table):
    cat = S.Catalog.read(cfg)
    counts = cat.counts()["val"]
    n = sum(counts) // 2
    sample = S.stratified(cat, "val", n)
    again = S.stratified(S.Catalog.read(cfg), "val", n)
    rows = S.Catalog.of(cfg, table).select("val", sample)
    labels = rows.column("label").to_pylist()
    want = [round(n * c / sum(counts)) for c in counts]
    assert [labels.count(0), labels.count(1)] == want and sample == again
    assert S.stratified(cat, "val", 10 * sum(counts)) is None  # whole split


def _run(cfg, processor_path, epoch, aug, rows_per_class=None):
    cat = S.Catalog.read(cfg)
    sample = S.subsample(cat, "train", "test-rows", (rows_per_class,) * 2) if rows_per_class else None
    ds = D.build_dataset(cat, "train", (processor_path, None), POLICY, aug, epoch, sample, batch_size=16)
    return {r["img_id"]: r for r in ds.take_all()}


def _preprocess_here(cfg, processor_path, epoch, aug, rows_per_class):
    """What the pipeline's Preprocessor actors do with the blocks of rows it plans, in this process."""
    from aigd.sources import row_blocks, shards

    cat = S.Catalog.read(cfg)
    rows = cat.select("train", S.subsample(cat, "train", "test-rows", (rows_per_class,) * 2))
    actor = D.Preprocessor(cfg, shards(cfg), (processor_path, None), POLICY, aug, epoch, 16, "train", None)
    out = {}
    for batch in (b for block in row_blocks(rows, D.ROWS_PER_TASK) for b in actor(block)):
        out.update({i: {k: batch[k][n] for k in ("pixel_values", "jpeg_quality")} for n, i in enumerate(batch["img_id"])})
    return out


def test_augmentation_redrawn_each_epoch_reproduced_by_seed(cfg, tiny_model):
    e0, e0_again, e1 = (_preprocess_here(cfg, str(tiny_model), e, AUG, rows_per_class=24) for e in (0, 0, 1))
    assert len(e0) >= 40  # 48 drawn, less any corrupt ones
    ids = sorted(set(e0) & set(e1))
    q0 = np.array([e0[i]["jpeg_quality"] for i in ids])
    q1 = np.array([e1[i]["jpeg_quality"] for i in ids])
    assert ((q0 >= 50) & (q0 <= 95)).all() and ((q1 >= 50) & (q1 <= 95)).all()
    assert (q0 != q1).mean() > 0.8
    assert sum(not np.array_equal(e0[i]["pixel_values"], e1[i]["pixel_values"]) for i in ids) > 0.9 * len(ids)
    for i in ids:  # same seed and epoch: identical crops, flips and qualities
        assert e0[i]["jpeg_quality"] == e0_again[i]["jpeg_quality"]
        np.testing.assert_array_equal(e0[i]["pixel_values"], e0_again[i]["pixel_values"])


def test_corrupt_rows_are_skipped_and_counted(cfg, tiny_model, table, ray_local):
    import ray

    counter = "skipped-test"
    D.skip_counter(counter)
    cat = S.Catalog.read(cfg)
    ds = D.build_dataset(cat, "train", (str(tiny_model), None), POLICY, None, 0, None, counter=counter)
    rows = ds.select_columns(["img_id"]).take_all()
    counts = cat.counts()
    skipped = D.skipped_counts(counter)
    ray.kill(ray.get_actor(counter, namespace=D.COUNTER_NAMESPACE))
    corrupt = corrupt_by_split(Path(cfg.path))
    assert sum(map(len, corrupt.values())) == 5  # one of each aigd.dev.demo_data.BAD_KINDS
    corrupt_in_train = len(corrupt["train"])
    assert skipped.get("train", 0) == corrupt_in_train
    assert len(rows) + corrupt_in_train == sum(counts["train"])
    assert not set(corrupt["train"]) & {r["img_id"] for r in rows}


def test_batches_match_the_processor_for_the_same_image(cfg, tiny_model, processor, table, ray_local):
    from aigd.images import decode

    out = _run(cfg, str(tiny_model), 0, None, rows_per_class=8)
    by_id = {r["img_id"]: r for r in table.to_pylist()}
    for img_id in sorted(out)[:5]:
        want = encode(processor, [prepare_image(decode(by_id[img_id]["image"]["bytes"]), POLICY)], POLICY)
        got = out[img_id]
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"][0])
        np.testing.assert_array_equal(got["mm_token_type_ids"], want["mm_token_type_ids"][0])
        np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"][0])
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"][0])
        assert got["label"] == by_id[img_id]["label"]


def test_light_stages_and_the_router_never_import_torch():
    """The driver plans the data on metadata, 0.1-CPU tasks draw each epoch's sample of cached rows, and
    Serve runs routers beside the model; a process that imports torch costs seconds of CPU and ~0.5
    GB, which on 2 CPUs stalled training."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import sys; import aigd.sampling, aigd.sources, serve.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_parquet_under_a_uri_reads_like_a_local_folder(cfg, demo_data):
    """s3:// and gs:// go through the same pyarrow filesystem code as this file:// URI."""
    import dataclasses

    from aigd.sources import is_remote, iter_images, parquet_files

    uri = dataclasses.replace(cfg, path=f"file://{demo_data}")
    assert is_remote(uri.path)
    fs, files = parquet_files(uri.path)
    assert len(files) == len(list((demo_data / "data").glob("*.parquet")))
    assert metadata(uri).equals(metadata(cfg))
    assert S.Catalog.read(uri).counts() == S.Catalog.read(cfg).counts()
    assert next(iter_images(uri.path))[0] == next(iter_images(str(demo_data)))[0]
