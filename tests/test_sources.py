"""Where images come from: image folder layouts and extra metadata columns, on tiny files in tmp_path."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aigd.config import DataConfig
from aigd.sources import DataError, count_images, iter_images, metadata


def write_image(path, size=(8, 6), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, fmt)


def folder(path):
    return DataConfig(source="image_folder", path=str(path))


def by_id(table):
    return {r["img_id"]: r for r in table.to_pylist()}


def test_plain_real_fake_layout(tmp_path):
    write_image(tmp_path / "real" / "b.png", (10, 4))
    write_image(tmp_path / "real" / "sub" / "a.jpg", fmt="JPEG")
    write_image(tmp_path / "fake" / "c.png")
    (tmp_path / "fake" / "broken.png").write_bytes(b"not an image")
    meta = metadata(folder(tmp_path))
    assert meta.column_names == ["img_id", "width", "height", "label", "_file", "_row"]
    # Real rows first, each class in path order, as before the generator layouts.
    ids = ["real/b.png", "real/sub/a.jpg", "fake/broken.png", "fake/c.png"]
    assert meta.column("img_id").to_pylist() == ids
    assert meta.column("label").to_pylist() == [0, 0, 1, 1]
    assert meta.column("_row").to_pylist() == [0, 1, 2, 3]
    rows = by_id(meta)
    assert (rows["real/b.png"]["width"], rows["real/b.png"]["height"]) == (10, 4)
    assert (rows["fake/broken.png"]["width"], rows["fake/broken.png"]["height"]) == (0, 0)  # decode counts it
    generators = metadata(folder(tmp_path), extra=("generator",)).column("generator")
    assert set(generators.to_pylist()) == {"unknown"}


def test_generator_layout(tmp_path):
    for gen, n_real, n_fake in (("sdv4", 2, 3), ("midjourney", 1, 2)):
        for i in range(n_real):
            write_image(tmp_path / gen / "0_real" / f"r{i}.png")
        for i in range(n_fake):
            write_image(tmp_path / gen / "1_fake" / f"f{i}.jpg", fmt="JPEG")
    meta = metadata(folder(tmp_path), extra=["generator"])
    assert meta.num_rows == 8
    counts = {}
    for r in meta.to_pylist():
        assert r["img_id"].split("/")[0] == r["generator"]  # img_id stays relative to root
        assert r["label"] == (0 if "/0_real/" in r["img_id"] else 1)
        counts[r["generator"], r["label"]] = counts.get((r["generator"], r["label"]), 0) + 1
    assert counts == {("sdv4", 0): 2, ("sdv4", 1): 3, ("midjourney", 0): 1, ("midjourney", 1): 2}


def test_nested_generator_layout_and_nearest_class_folder(tmp_path):
    write_image(tmp_path / "ADM" / "val" / "nature" / "n.png")
    write_image(tmp_path / "ADM" / "val" / "ai" / "a.png")
    write_image(tmp_path / "BigGAN" / "car" / "Real" / "x.png")  # class folder names are case-insensitive
    write_image(tmp_path / "BigGAN" / "real" / "1_fake" / "y.png")  # the nearest class folder wins
    rows = by_id(metadata(folder(tmp_path), extra=("generator",)))
    assert {k: (r["label"], r["generator"]) for k, r in rows.items()} == {
        "ADM/val/nature/n.png": (0, "ADM"), "ADM/val/ai/a.png": (1, "ADM"),
        "BigGAN/car/Real/x.png": (0, "BigGAN"), "BigGAN/real/1_fake/y.png": (1, "BigGAN")}


def test_files_outside_class_folders_are_ignored(tmp_path, caplog):
    write_image(tmp_path / "gen" / "0_real" / "r.png")
    write_image(tmp_path / "gen" / "1_fake" / "f.png")
    write_image(tmp_path / "gen" / "preview.png")
    (tmp_path / "README.txt").write_text("notes")
    with caplog.at_level("WARNING", logger="aigd.sources"):
        meta = metadata(folder(tmp_path))
    assert sorted(meta.column("img_id").to_pylist()) == ["gen/0_real/r.png", "gen/1_fake/f.png"]
    assert "2 files under no class folder" in caplog.text


def test_no_class_folder_is_an_error(tmp_path):
    write_image(tmp_path / "cats" / "a.png")
    write_image(tmp_path / "dogs" / "b.png")
    with pytest.raises(DataError, match=r"no files under a class folder \(2 files") as e:
        metadata(folder(tmp_path))
    assert "<root>/real/*" in str(e.value) and "<root>/<generator>/0_real/*" in str(e.value)


def test_missing_extra_column_on_a_folder(tmp_path):
    write_image(tmp_path / "real" / "a.png")
    with pytest.raises(DataError, match="no column camera .*generator"):
        metadata(folder(tmp_path), extra=("camera",))


def test_batch_scoring_reads_every_file_of_a_generator_folder(tmp_path):
    write_image(tmp_path / "gen" / "0_real" / "r.png")
    write_image(tmp_path / "gen" / "1_fake" / "f.png")
    write_image(tmp_path / "unsorted" / "u.png")  # unlabelled images are scored too
    assert count_images(str(tmp_path)) == 3
    got = dict(iter_images(str(tmp_path)))
    files = ("gen/0_real/r.png", "gen/1_fake/f.png", "unsorted/u.png")
    assert sorted(got) == sorted(str(tmp_path / p) for p in files)
    assert all(data.startswith(b"\x89PNG") for data in got.values())


def write_sid_parquet(path, generator=None):
    """A SID_Set-like shard: img_id, image struct{bytes, path}, mask, width, height, label."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {"img_id": pa.array(["a", "b", "c"]),
            "image": pa.array([{"bytes": buf.getvalue(), "path": None}] * 3, image),
            "mask": pa.array([None, None, {"bytes": buf.getvalue(), "path": None}], image),
            "width": pa.array([4, 4, 4], pa.int32()), "height": pa.array([4, 4, 4], pa.int32()),
            "label": pa.array([0, 1, 2], pa.int64())}
    if generator is not None:
        cols["generator"] = pa.array(generator)
    pq.write_table(pa.table(cols), path)
    return DataConfig(source="sid_parquet", path=str(path))


def test_parquet_extra_generator_column(tmp_path):
    cfg = write_sid_parquet(tmp_path / "with.parquet", ["real", "sdxl", "sdxl"])
    meta = metadata(cfg, extra=("generator",))
    assert meta.column_names == ["img_id", "width", "height", "label", "generator", "_file", "_row"]
    assert meta.column("generator").to_pylist() == ["real", "sdxl", "sdxl"]
    assert metadata(cfg).equals(meta.drop_columns(["generator"]))  # no extra: the columns of before


def test_parquet_without_the_column(tmp_path):
    cfg = write_sid_parquet(tmp_path / "plain.parquet")
    assert metadata(cfg).column_names == ["img_id", "width", "height", "label", "_file", "_row"]
    with pytest.raises(DataError, match=r"no column generator \(its columns: img_id, image, mask"):
        metadata(cfg, extra=("generator",))
