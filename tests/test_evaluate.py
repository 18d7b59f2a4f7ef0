"""Evaluation: perturbations do what they are named, calibration helps, reports and batch scoring are complete."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from aigd import config as C
from aigd import report as R
from aigd import evaluation as E
from conftest import SERVE_POLICY, calibration


def _photo(seed=0, size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _quant_tables(quality: int, img: Image.Image) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).quantization


def test_perturbations_apply_what_they_name():
    img = _photo()
    q30 = E.jpeg(img, 30)
    assert q30.format == "JPEG" and q30.quantization == _quant_tables(30, img) != _quant_tables(95, img)
    assert np.array_equal(np.asarray(E.perturb(img, "jpeg_q30")), np.asarray(q30))
    assert E.perturb(img, "downscale_0.5").size == (80, 60)
    assert E.perturb(img, "downscale_0.25").size == (40, 30)
    crop = E.perturb(img, "center_crop_0.5")
    assert crop.size == (80, 60) and np.array_equal(np.asarray(crop), np.asarray(img)[30:90, 40:120])
    eq = E.perturb(img, "equalized")
    assert eq.size == (120, 120) and eq.format == "JPEG" and eq.quantization == _quant_tables(95, img.crop((20, 0, 140, 120)))
    assert E.perturb(img, "clean") is img
    with pytest.raises(ValueError, match="unknown perturbation"):
        E.perturb(img, "blur_3")


def _scores(n=400, scale=6.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    margin = scale * ((2 * y - 1) * 0.6 + rng.normal(0, 1, n))  # over-confident: logit gaps far too large
    return y, {"label": y, "z_real_m": np.zeros(n), "z_fake_m": margin, "temperature_m": np.ones(n)}


def test_calibration_lowers_ece_and_is_published_as_a_new_version(tmp_path):
    y, scores = _scores()
    from aigd import registry
    from aigd.manifest import FORMAT_VERSION, read_manifest, recalibrated

    fitted = E.calibration_report(y, scores, ["m"], target_fpr=0.05)["m"]
    assert fitted["temperature"] > 2
    assert fitted["ece_after"] < 0.5 * fitted["ece_before"] == 0.5 * fitted["ece_manifest_temperature"]
    p = 1 / (1 + np.exp(-scores["z_fake_m"] / fitted["temperature"]))
    assert np.mean(p[y == 0] >= fitted["threshold_at_target_fpr"]) <= 0.05 + 1e-9
    files = {registry.WEIGHTS: b"weights", registry.ADAPTER_CONFIG: b"{}"}
    old = registry.publish(str(tmp_path / "m"), files, {"format_version": FORMAT_VERSION,
                                                         "calibration": calibration(1.0, 0.5)})
    before = (tmp_path / "m" / old.version / "manifest.json").read_bytes()
    new = recalibrated(old, fitted, fitted_by="jobs/evaluate.py")
    assert new != old and (tmp_path / "m" / old.version / "manifest.json").read_bytes() == before  # never edited
    manifest = read_manifest(new.uri)
    cal = manifest["calibration"]
    assert cal["temperature"] == fitted["temperature"] and cal["threshold_at_target_fpr"] == fitted["threshold_at_target_fpr"]
    assert cal["fitted_by"] == "jobs/evaluate.py" and "ece_manifest_temperature" not in cal  # one schema
    assert manifest["adapter"]["parent"] == old.version and registry.files_of(new.uri) == files
    assert registry.resolve(str(tmp_path / "m")) == new  # the entry's newest version


def test_report_folder_holds_the_pngs_and_the_html_references_them(tmp_path):
    y, base = _scores(200, scale=1.0)
    perts = ["clean", "jpeg_q50"]
    scores = {k: np.concatenate([v, v]) for k, v in base.items()}
    scores["z_fake_m2"] = scores["z_fake_m"] * 0.5 + 0.3
    scores["z_real_m2"], scores["temperature_m2"] = scores["z_real_m"], scores["temperature_m"]
    scores["perturbation"] = np.asarray(["clean"] * 200 + ["jpeg_q50"] * 200)
    scores.update(width=np.full(400, 112), height=np.full(400, 140), format=np.asarray(["PNG"] * 400))
    cfg = C.from_dict(C.EvalConfig, {"adapters": {"m": "a", "m2": "b"}, "perturbations": perts, "bootstrap": 20})
    summary = E.summarize(scores, cfg)
    assert summary["auc_kept_vs_clean"]["m"]["jpeg_q50"] == pytest.approx(1.0)
    assert set(summary["metrics"]["clean"]) == {"m", "m2", "ensemble"}
    lo, hi = summary["metrics"]["clean"]["m"]["roc_auc_ci95"]
    assert lo <= summary["metrics"]["clean"]["m"]["roc_auc"] <= hi
    report = R.write_report(scores, summary, cfg, {"shortcut_audit": E.shortcut_stats(scores)}, tmp_path)
    doc = report.read_text()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["confusion.png", "reliability.png", "robustness.png", "roc.png"]
    for name in pngs:
        assert f'src="{name}"' in doc and (tmp_path / name).stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["clean"]["m"]["n"] == 200


def _grouped_scores(n_per=60, seed=0):
    """Reals and three generators' fakes: gan separated, vae at chance, tiny too small for an AUC."""
    rng = np.random.default_rng(seed)
    groups = ["real"] * (2 * n_per) + ["gan"] * n_per + ["vae"] * n_per + ["tiny"] * 4
    y = np.asarray([0 if g == "real" else 1 for g in groups])
    shift = {"real": 0.0, "gan": 4.0, "vae": 0.0, "tiny": 4.0}
    z = np.asarray([shift[g] for g in groups]) + rng.normal(0, 1, len(groups))
    n = len(y)
    scores = {"label": np.concatenate([y, y]), "z_real_m": np.zeros(2 * n), "z_fake_m": np.concatenate([z, z - 3]),
              "temperature_m": np.ones(2 * n), "perturbation": np.asarray(["clean"] * n + ["jpeg_q50"] * n),
              E.GROUP + "generator": np.asarray(groups * 2)}
    cfg = C.from_dict(C.EvalConfig, {"adapters": {"m": "a"}, "perturbations": ["clean", "jpeg_q50"],
                                     "bootstrap": 0, "group_by": ["generator"], "min_group_images": 10})
    return scores, cfg


def test_metrics_per_generator_use_every_real_and_hide_an_auc_too_small_to_mean_anything():
    from aigd.metrics import roc_auc

    scores, cfg = _grouped_scores()
    groups = E.summarize(scores, cfg)["groups"]["generator"]
    assert set(groups) == {"real", "gan", "vae", "tiny"}
    clean = scores["perturbation"] == "clean"
    y, z, g = scores["label"][clean], scores["z_fake_m"][clean], scores[E.GROUP + "generator"][clean]
    for name in ("gan", "vae"):
        assert (groups[name]["n_real"], groups[name]["n_fake"], groups[name]["reals"]) == (120, 60, "pooled")
        sel = (g == "real") | (g == name)
        assert groups[name]["metrics"]["clean"]["m"]["roc_auc"] == pytest.approx(roc_auc(y[sel], z[sel]))
    assert groups["gan"]["metrics"]["clean"]["m"]["roc_auc"] > 0.95 > 0.7 > groups["vae"]["metrics"]["clean"]["m"]["roc_auc"]
    assert groups["gan"]["metrics"]["jpeg_q50"]["m"]["recall_fake"] < groups["gan"]["metrics"]["clean"]["m"]["recall_fake"]
    assert groups["tiny"]["n_fake"] == 4 and groups["tiny"]["metrics"]["clean"]["m"]["roc_auc"] is None
    assert groups["real"]["reals"] == "none" and groups["real"]["metrics"]["clean"]["m"]["roc_auc"] is None
    assert groups["real"]["n_real"] == 120 and groups["real"]["metrics"]["clean"]["m"]["n"] == 120


def test_a_group_with_its_own_reals_is_scored_against_them():
    groups = np.asarray(["a"] * 20 + ["b"] * 20)
    y = np.asarray(([0] * 10 + [1] * 10) * 2)
    sel, reals = E.group_negatives(groups, y, "a", min_images=10)
    assert reals == "own" and sel.tolist() == [True] * 20 + [False] * 20
    sel, reals = E.group_negatives(groups, y, "a", min_images=11)
    assert reals == "pooled" and sel.sum() == 30


def _eval_config(tiny_model, adapters, demo_data, out, **extra) -> list[str]:
    cfg = {
        "model": {"name_or_path": str(tiny_model), "load_in_4bit": False, "backend": "hf"},
        "image": dict(SERVE_POLICY),
        "adapters": {k: str(adapters[k]) for k in ("method1", "method2")},
        "data": {"source": "sid_parquet", "path": str(demo_data), "min_width": 112, "split_group_sep": "/"},
        **extra,
    }
    path = out / "eval.yaml"
    path.write_text(json.dumps(cfg))
    return ["--config", str(path), f"out_dir={out / 'report'}"]


def test_batch_scorer_writes_a_row_per_image_and_a_reason_per_unreadable_one(tmp_path, tiny_model, adapters,
                                                                            demo_data):
    from aigd.batch_score import score_path

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        _photo(i).save(folder / f"ok{i}.png")
    good = io.BytesIO()
    _photo(9).save(good, format="JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[:200])
    (folder / "notes.txt").write_text("not an image")
    argv = _eval_config(tiny_model, adapters, demo_data, tmp_path)
    cfg = C.load(C.EvalConfig, argv[1])
    summary = score_path(cfg, str(folder), str(tmp_path / "out.jsonl"), batch_size=2)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary == {"rows": 5, "scored": 3, "unreadable": 2, "out": str(tmp_path / "out.jsonl")}
    by_name = {r["id"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["truncated.jpg"]["error"].startswith("corrupt_image")
    assert by_name["notes.txt"]["error"].startswith("unsupported_media_type")
    for i in range(3):
        r = by_name[f"ok{i}.png"]
        assert r["error"] is None and 0 <= r["p_fake"] <= 1 and r["label"] in ("real", "fake")
        assert r["p_fake"] == pytest.approx((r["p_fake_method1"] + r["p_fake_method2"]) / 2)
        assert r["threshold"] == pytest.approx(0.5)  # the members' thresholds 0.4 and 0.6, equal weights
        assert r["label"] == ("fake" if r["p_fake"] >= 0.5 else "real")


def test_evaluate_job_scores_the_test_split_and_writes_the_report(tmp_path, tiny_model, adapters, demo_data,
                                                                 ray_local, monkeypatch):
    import evaluate as job
    from aigd import sources

    reads = []  # the source's metadata, opened once for the val split (calibration) and the test split
    real = sources.pq.ParquetDataset
    monkeypatch.setattr(sources.pq, "ParquetDataset", lambda *a, **k: reads.append(1) or real(*a, **k))

    work = tmp_path / "adapters"  # registry entries holding one version each
    shutil.copytree(adapters["method1"], work / "method1" / adapters["method1"].name)
    shutil.copytree(adapters["method2"], work / "method2" / adapters["method2"].name)
    argv = _eval_config(tiny_model, {"method1": work / "method1", "method2": work / "method2"}, demo_data, tmp_path,
                        perturbations=["clean", "jpeg_q50", "equalized"], bootstrap=20, calibrate=True,
                        scorer_cpus=0.5, batch_size=32, group_by=["generator"],
                        explain={"enabled": True, "fakes": 4, "tampered": 4, "random_draws": 1, "overlays": 2,
                                 "methods": ["occlusion", "input_x_gradient"]})
    report = job.main(argv)
    assert len(reads) == 1
    metrics = json.loads((report.parent / "metrics.json").read_text())
    clean = metrics["metrics"]["clean"]
    assert set(clean) == {"method1", "method2", "ensemble"}
    counts_test = sum(C_ for C_ in _test_counts(demo_data))
    assert clean["method1"]["n"] == metrics["n_images"] == counts_test - metrics["unreadable_images"]
    assert set(metrics["auc_kept_vs_clean"]["method2"]) == {"clean", "jpeg_q50", "equalized"}
    assert set(metrics["shortcut_audit"]) == {"real", "fake"}
    from aigd import registry
    from aigd.manifest import read_manifest

    for name in ("method1", "method2"):  # calibration: a new version of each, evaluated; the old one untouched
        old, new = registry.versions(str(work / name))
        assert read_manifest(new)["calibration"]["fitted_by"] == "jobs/evaluate.py"
        assert read_manifest(new)["adapter"]["parent"] == old.version and registry.evaluations(old) == {}
        (record,) = registry.evaluations(new).values()
        assert record["evalset"] == metrics["evaluation_set"] and record["evalset"]["n_rows"] == counts_test
        assert record["metrics"]["clean.roc_auc"] == clean[name]["roc_auc"] and "jpeg_q50.roc_auc" in record["metrics"]
    import pyarrow.parquet as pq

    rows = pq.read_table(report.parent / "predictions.parquet").to_pylist()
    assert len(rows) == 3 * metrics["n_images"] and {"p_fake_ensemble", "label_method1", "generator"} <= set(rows[0])
    # each image's bytes identified and what they declare: the same for all its perturbed copies
    by_image = {}
    for r in rows:
        by_image.setdefault(r["img_id"], set()).add((r["image_sha256"], r["provenance_declared"]))
    assert all(len(v) == 1 and None not in next(iter(v)) for v in by_image.values())
    groups = metrics["groups"]["generator"]
    assert sum(g["n_fake"] for g in groups.values()) == clean["method1"]["confusion"]["tp"] + clean["method1"]["confusion"]["fn"]
    assert groups["real"]["reals"] == "none" and {g["reals"] for k, g in groups.items() if k != "real"} == {"pooled"}
    doc = report.read_text()
    assert all(f"<td>{family}</td>" in doc for family in groups)  # the per-generator table
    # the maps: deletion curves on 4 test fakes, localization on 4 tampered rows with masks, both methods
    ex = metrics["explanations"]
    assert set(ex["methods"]) == {"method1", "method2"} and ex["unreadable"] == 0
    for name, methods in ex["methods"].items():
        assert set(methods) == {"occlusion", "input_x_gradient"}
        for m in methods.values():
            f, loc = m["faithfulness"], m["localization"]
            assert f["n"] == 4 and len(f["p_fake_top"]) == len(f["p_fake_random"]) == len(f["fractions"]) == 5
            assert f["p_fake_top"][0] == pytest.approx(f["p_fake_random"][0]) and f["at"] == 0.2
            assert loc["n"] == 4 and 0 <= loc["pixel_auc_mean"] <= 1 and 0 <= loc["iou_mean"] <= 1
    assert ex["tampered_verdicts"]["method1"]["n"] == 4
    assert "Explanations: faithfulness and localization" in doc
    assert all((report.parent / f"explain_tampered_{i}.png").exists() for i in range(4))


def _test_counts(demo_data):
    from aigd.config import DataConfig
    from aigd.sampling import Catalog

    cfg = DataConfig(source="sid_parquet", path=str(demo_data), min_width=112, split_group_sep="/")
    return Catalog.read(cfg).counts()["test"]
