"""The `aigd` command as people run it: real processes, real files, exit codes and stderr; `score --api`
against the Serve app on a local Ray (slow: it uses ray_local)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import SERVE_POLICY
from helpers import free_port, image_bytes, photo, serve_config

ROOT = Path(__file__).resolve().parents[1]
AIGD = Path(sys.executable).parent / "aigd"  # the installed entry point, as a user runs it
KEY = "cli-k3y-0123456789abcdef"


def aigd(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(AIGD), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _images(folder: Path) -> dict[str, Path]:
    """Two photos, one truncated JPEG and one name that is no file."""
    folder.mkdir(exist_ok=True)
    paths = {"a": folder / "a.png", "b": folder / "b.jpg", "broken": folder / "broken.jpg",
             "missing": folder / "missing.png"}
    paths["a"].write_bytes(image_bytes(photo(1)))
    paths["b"].write_bytes(image_bytes(photo(2), "JPEG", quality=90))
    paths["broken"].write_bytes(image_bytes(photo(3), "JPEG")[:200])
    return paths


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def _eval_config(tmp_path: Path, tiny_model, adapters: dict) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": str(tiny_model), "load_in_4bit": False},
                                "image": dict(SERVE_POLICY), "adapters": {k: str(v) for k, v in adapters.items()}}))
    return path


def test_version_is_the_installed_packages():
    out = aigd("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"aigd {metadata.version('aigd')}"


def test_every_subcommand_shows_examples_that_parse():
    from aigd.cli import EXAMPLES, parse_args

    top = aigd("--help").stdout
    for name, examples in EXAMPLES.items():
        own = aigd(name, "--help").stdout
        assert examples and all(line in top and line in own for line in examples), name
        for line in examples:
            words = shlex.split(line)  # an env var before `aigd` is the shell's
            args = parse_args(words[words.index("aigd") + 1:])
            assert args.cmd == name, line
    assert "exit status: 0" in aigd("score", "--help").stdout


def test_score_batch_checks_its_output_and_input_before_loading_the_model(tmp_path):
    """The model does not exist: an error about the output or the input came before loading it."""
    config = _eval_config(tmp_path, tmp_path / "no-model", {"method1": tmp_path / "no-adapter"})
    images = _images(tmp_path / "imgs")["a"].parent
    (tmp_path / "folder.jsonl").mkdir()
    cases = {
        tmp_path / "scores.csv": "must end in .parquet or .jsonl",
        tmp_path / "folder.jsonl": "is a folder",
        images / "a.png" / "scores.jsonl": "cannot write",  # under a file
    }
    for out, says in cases.items():
        run = aigd("score-batch", "--config", config, "--input", images, "--out", out)
        assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr
    run = aigd("score-batch", "--config", config, "--input", tmp_path / "nowhere", "--out", tmp_path / "s.jsonl")
    assert run.returncode == 2 and "nowhere does not exist" in run.stderr, run.stderr
    run = aigd("score-batch", "--config", config, "--input", images, "--out", tmp_path / "s.jsonl")
    assert run.returncode == 2 and "backend_unavailable" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not list(tmp_path.glob("s.jsonl*")) and not (tmp_path / "scores.csv").exists()


@pytest.mark.slow  # a model or process group of its own: seconds, not the edit loop
def test_score_batch_streams_rows_in_input_order_into_parquet(tmp_path, tiny_model, adapters):
    images = _images(tmp_path / "imgs")
    (images["a"].parent / "notes.txt").write_text("not an image")
    config = _eval_config(tmp_path, tiny_model, {k: adapters[k] for k in ("method1", "method2")})
    out = tmp_path / "out" / "scores.parquet"
    run = aigd("score-batch", "--config", config, "--input", images["a"].parent, "--out", out, "--batch-size", "2")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"rows": 4, "scored": 2, "unreadable": 2, "out": str(out)}
    table = pq.read_table(out)
    assert str(table.schema.field("p_fake_method2").type) == "double"  # typed even in an all-error chunk
    rows = table.to_pylist()
    assert [Path(r["id"]).name for r in rows] == ["a.png", "b.jpg", "broken.jpg", "notes.txt"]
    assert [r["error"] is None for r in rows] == [True, True, False, False]
    assert rows[2]["error"].startswith("corrupt_image") and rows[3]["p_fake"] is None
    assert rows[0]["image_sha256"] == hashlib.sha256(images["a"].read_bytes()).hexdigest()
    assert rows[0]["provenance_declared"] == "none" and json.loads(rows[0]["provenance"])["c2pa"] == {"present": False}
    assert rows[2]["image_sha256"] is not None  # an unreadable image is still identified
    assert os.listdir(out.parent) == ["scores.parquet"]  # the .partial file became the output


@pytest.mark.slow  # a model or process group of its own: seconds, not the edit loop
def test_score_exits_1_when_an_image_fails_and_still_prints_every_answer(tmp_path, adapters):
    images = _images(tmp_path / "imgs")
    adapter = f"method1={adapters['method1']}"
    run = aigd("score", "--adapter", adapter, images["a"], images["broken"], images["missing"], images["b"])
    assert run.returncode == 1, run.stderr
    lines = _lines(run.stdout)
    assert [x["image"] for x in lines] == [str(images[k]) for k in ("a", "broken", "missing", "b")]
    assert lines[1]["error"]["code"] == "corrupt_image" and lines[2]["error"]["code"] == "unreadable"
    assert lines[0]["adapter"] == lines[3]["adapter"] == "method1" and 0 <= lines[3]["p_fake"] <= 1
    run = aigd("score", "--adapter", adapter, images["a"], images["b"])
    assert run.returncode == 0 and len(_lines(run.stdout)) == 2, run.stderr


def test_the_client_imports_without_torch_or_ray():
    """The web page's environment has neither; the CLI and the page share this client."""
    code = "import sys, aigd.client, aigd.ui; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    pythons = [sys.executable] + [str(p) for p in [ROOT / ".venv-ui" / "bin" / "python"] if p.exists()]
    for python in pythons:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "[]", (python, out.stderr)


@pytest.fixture(scope="module")
def api(ray_local, tiny_model, adapters, tmp_path_factory):
    """The detector app behind an API key, on its own Serve instance."""
    from ray import serve

    from serve.app import build_app

    keys = tmp_path_factory.mktemp("secrets") / "api-keys"
    keys.write_text(f"{KEY}\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    good = {k: adapters[k] for k in ("method1", "method2")}
    serve.run(build_app(serve_config(tiny_model, good, auth={"enabled": True, "keys_file": str(keys)})), name="cli",
              route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_score_through_the_api_prints_what_local_scoring_prints(api, adapters, tmp_path, capsys):
    from aigd import cli

    images = _images(tmp_path / "imgs")
    files = [images["a"], images["broken"], images["b"]]
    remote = aigd("score", "--api", api, "--adapter", "method1", *files, env={"AIGD_API_KEY": KEY})
    assert remote.returncode == 1, remote.stderr
    remote_ensemble = aigd("score", "--api", api, "--api-key", KEY, images["a"], images["b"])
    assert remote_ensemble.returncode == 0, remote_ensemble.stderr
    cli.main(["score", "--adapter", f"method1={adapters['method1']}", *map(str, files)])
    cli.main(["score", *(f"--adapter={k}={adapters[k]}" for k in ("method1", "method2")), str(images["a"]),
              str(images["b"])])
    local = _lines(capsys.readouterr().out)

    for got, want in zip(_lines(remote.stdout) + _lines(remote_ensemble.stdout), local):
        assert got.keys() - {"request_id"} == want.keys() and got["image"] == want["image"]
        assert got.get("error", {}).get("code") == want.get("error", {}).get("code")
        if "p_fake" in want:
            assert got["p_fake"] == pytest.approx(want["p_fake"], abs=1e-6) and got["label"] == want["label"]
            assert (got["image_sha256"], got["provenance"]) == (want["image_sha256"], want["provenance"])
            assert got["request_id"]  # the API's answer says which request it was
    assert _lines(remote_ensemble.stdout)[0]["members"].keys() == {"method1", "method2"}


def test_score_through_the_api_refuses_clearly(api, tmp_path):
    image = _images(tmp_path / "imgs")["a"]
    cases = {
        (): "401 unauthorized",
        ("--api-key", "wrong"): "403 forbidden",
        ("--api-key", KEY, "--adapter", "nope"): "404 unknown_adapter",
        ("--api-key", KEY, "--adapter", "method1", "--adapter", "method2"): "names one of the API's adapters",
    }
    for extra, says in cases.items():
        run = aigd("score", "--api", api, *extra, image, env={"AIGD_API_KEY": ""})
        assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, (extra, run.stderr)
        assert run.stdout == ""
    run = aigd("score", "--api", f"http://127.0.0.1:{free_port()}", image)
    assert run.returncode == 2 and "cannot reach the API" in run.stderr


def test_the_web_pages_calls_through_the_shared_client(api):
    from aigd.client import ApiError, Client

    client = Client(api, KEY)
    assert client.models()["ensemble"]["members"] == ["method1", "method2"]
    results = client.batch([("a.png", image_bytes(photo(4))), ("junk.bin", b"junk")])["results"]
    assert 0 <= results[0]["p_fake"] <= 1 and results[1]["status"] == 415
    with pytest.raises(ApiError) as refused:
        Client(api).models()
    assert refused.value.status == 401 and str(refused.value).startswith("API error 401 unauthorized")


def test_explain_here_and_through_the_api_draw_the_same_map(api, adapters, tmp_path, capsys):
    from aigd import cli

    images = _images(tmp_path / "imgs")
    here, there = tmp_path / "here.png", tmp_path / "there.png"
    remote = aigd("explain", "--api", api, "--adapter", "method1", images["a"], "--out", there, "--json",
                  env={"AIGD_API_KEY": KEY})
    assert remote.returncode == 0, remote.stderr
    local = [f"--adapter=method1={adapters['method1']}"]
    assert cli.main(["explain", *local, str(images["a"]), "--out", str(here), "--json"]) == 0
    mine, theirs = json.loads(capsys.readouterr().out), json.loads(remote.stdout)
    assert mine["p_fake"] == pytest.approx(theirs["p_fake"], abs=1e-6)
    assert (mine["image_sha256"], mine["provenance"]) == (theirs["image_sha256"], theirs["provenance"])
    assert "overlay_png_base64" not in mine["explanation"] and mine["overlay"] == str(here)
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(mine["explanation"]["grid"], theirs["explanation"]["grid"], atol=2e-3)
    assert here.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and there.stat().st_size > 0
    assert cli.main(["explain", *local, str(images["b"])]) == 0
    text = capsys.readouterr().out
    assert "where the evidence for fake is" in text and "map (" in text
    assert cli.main(["explain", *local, str(images["broken"])]) == 2
    err = capsys.readouterr().err
    assert "corrupt_image" in err and "Traceback" not in err
