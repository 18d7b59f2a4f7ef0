"""One scoring front door: `aigd score`, `aigd score-batch`, jobs/evaluate.py and POST /v1/detect give
the same answer for the same image, adapter and ensemble (to 1e-6), because all four score through
aigd.scorer.Scorer and aigd.decision. Its own Serve app, so the evaluation job finds free CPUs."""

from __future__ import annotations

import json

import pytest

from helpers import free_port as _free_port
from helpers import image_bytes as _bytes
from helpers import photo as _photo
from helpers import post_image as _post
from helpers import serve_config as _config


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, adapters):
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    good = {k: adapters[k] for k in ("method1", "method2")}
    serve.run(build_app(_config(tiny_model, good, ensemble={"weights": {"method1": 3.0, "method2": 1.0}})),
              name="main", route_prefix="/main")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_cli_batch_scoring_evaluation_and_the_api_give_the_same_answer(server, tiny_model, adapters, tmp_path,
                                                                      capsys):
    """The four ways to score an image go through one Scorer and one set of decision rules."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import evaluate as eval_job
    from aigd import cli
    from aigd.batch_score import score_path
    from aigd.config import EvalConfig, load

    img = _photo(21, size=(140, 112))
    data = _bytes(img)
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "x.png").write_bytes(data)
    shard = tmp_path / "sid" / "data"
    shard.mkdir(parents=True)
    pq.write_table(pa.table({"img_id": ["x/0"], "image": [{"bytes": data, "path": None}], "mask": [None],
                             "width": [140], "height": [112], "label": [1]}), shard / "train-0.parquet")
    good = {k: str(adapters[k]) for k in ("method1", "method2")}
    weights = {"method1": 3.0, "method2": 1.0}  # the `main` app's ensemble
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(json.dumps({
        "model": {"name_or_path": str(tiny_model), "load_in_4bit": False}, "adapters": good,
        "ensemble": {"weights": weights}, "split": "all", "perturbations": ["clean"], "bootstrap": 0,
        "scorer_cpus": 0.25, "decode_cpus": 0.25,
        "data": {"source": "sid_parquet", "path": str(tmp_path / "sid"), "min_width": 28},
        "out_dir": str(tmp_path / "eval")}))

    api = {a: _post(f"{server}/main/v1/detect?adapter={a}", data).json() for a in good}
    api["ensemble"] = _post(f"{server}/main/v1/ensemble", data).json()
    cli_answers = {}
    for a, path in good.items():
        cli.main(["score", "--adapter", f"{a}={path}", str(folder / "x.png")])
        cli_answers[a] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    score_path(load(EvalConfig, cfg_path), str(folder), str(tmp_path / "b.jsonl"), batch_size=1)
    batch = json.loads((tmp_path / "b.jsonl").read_text().splitlines()[0])
    eval_job.main(["--config", str(cfg_path)])
    ev = pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()[0]

    for a in good:
        p = api[a]["p_fake"]
        assert cli_answers[a]["p_fake"] == pytest.approx(p, abs=1e-6)
        assert batch[f"p_fake_{a}"] == pytest.approx(p, abs=1e-6)
        assert ev[f"p_fake_{a}"] == pytest.approx(p, abs=1e-6)
        assert api[a]["label"] == cli_answers[a]["label"] == ev[f"label_{a}"]
    e = api["ensemble"]
    assert batch["p_fake"] == pytest.approx(e["p_fake"], abs=1e-6) and batch["threshold"] == e["threshold"]
    assert ev["p_fake_ensemble"] == pytest.approx(e["p_fake"], abs=1e-6)
    assert e["label"] == batch["label"] == ev["label_ensemble"]


def test_the_demo_sample_client_reports_verdicts_and_the_share_correct(server, tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
    import try_samples

    for i, truth in enumerate(("real", "fake", "fake")):
        (tmp_path / f"{truth}-{i}.png").write_bytes(_bytes(_photo(30 + i)))
    (tmp_path / "fake-broken.png").write_bytes(b"not an image")
    files = sorted(str(p) for p in tmp_path.glob("*.png"))
    assert try_samples.main(["--url", f"{server}/main", *files]) == 0
    out = capsys.readouterr().out
    assert out.count(" real ") + out.count(" fake ") >= 3 and "error: not a JPEG" in out
    assert "answered correctly" in out
