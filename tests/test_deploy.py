"""Cluster files under deploy/: rendered from the configs, pointing at real files, valid for Ray,
following the multi-node storage rules the jobs enforce, shipping no key, and an image that installs
locked dependencies before the source."""

import fnmatch
import importlib
import inspect
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from aigd import config as C
from aigd import train as T

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
APP = "/home/ray/aigd"  # the repository inside deploy/Dockerfile's image


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _render():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", ROOT / "deploy" / "render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.render()


def test_kuberay_manifests_are_exactly_what_render_writes_from_the_configs():
    rendered = _render()
    for path, text in rendered.items():
        assert path.read_text() == text, f"{path.name} is stale: run .venv/bin/python deploy/render.py"
    hand_written = {"storage.yaml", "redis.yaml"}
    assert {p.name for p in KUBERAY.glob("*.yaml")} == {p.name for p in rendered} | hand_written


def _rayjob(name: str, monkeypatch) -> tuple[dict, list[str], list[Path]]:
    """(the RayJob, its entrypoint's argv, its script and config in this checkout), with the pods' env set."""
    (job,) = _docs(KUBERAY / name)
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    script, config = Path(argv[1]), Path(argv[argv.index("--config") + 1])
    local = [ROOT / p.relative_to(APP) for p in (script, config)]
    assert all(p.exists() for p in local), local
    for key, value in _env(job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]).items():
        monkeypatch.setenv(key, value)
    return job, argv, local


def _env(group: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in group["template"]["spec"]["containers"][0]["env"]}


def _train_config(method: str):
    """The training job's config as its RayJob loads it (call with the pods' env set)."""
    (job,) = _docs(KUBERAY / f"rayjob-{method}.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    path = ROOT / Path(argv[argv.index("--config") + 1]).relative_to(APP)
    recipe = importlib.import_module(f"train_{method}")
    return C.load(C.TrainJobConfig, path, argv[argv.index("--config") + 2:], base=recipe.PRESET)


@pytest.mark.parametrize("method", ["method1", "method2"])
def test_rayjob_entrypoint_names_real_files_and_its_overrides_load(method, monkeypatch):
    job, argv, local = _rayjob(f"rayjob-{method}.yaml", monkeypatch)
    assert local[0].name == f"train_{method}.py"
    # the recipe's own config loading: unknown keys or wrong types would raise here
    cfg = _train_config(method)
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg.scaling.num_workers == workers["replicas"] and cfg.scaling.use_gpu
    assert cfg.optim.batch_size * cfg.optim.grad_accum * cfg.scaling.num_workers == 40  # the seed's batch
    T.check_storage(cfg, n_nodes=workers["replicas"] + 1)  # the multi-node rule the job enforces at start
    assert cfg.run.storage_path.startswith("/mnt/aigd/") and cfg.run.export_dir == f"/mnt/aigd/adapters/{method}"


# What decides which rows there are and which split each falls in: equal, the same test rows.
SPLIT_FIELDS = ("source", "path", "label_map", "tampered", "min_width", "min_height", "max_rows", "val_fraction",
                "test_fraction", "split_salt", "split_group_sep")


def test_eval_rayjob_scores_what_the_training_jobs_export_on_their_held_out_rows(monkeypatch):
    job, argv, local = _rayjob("rayjob-eval.yaml", monkeypatch)
    assert local[0] == ROOT / "jobs" / "evaluate.py"
    cfg = C.load(C.EvalConfig, local[1], argv[argv.index("--config") + 2:])  # what jobs/evaluate.py loads
    trained = {m: _train_config(m) for m in ("method1", "method2")}
    assert cfg.adapters == {m: t.run.export_dir for m, t in trained.items()}
    assert set(cfg.ensemble.weights) == set(trained)
    for t in trained.values():
        assert cfg.model.name_or_path == t.model.name_or_path and cfg.model.load_in_4bit == t.model.load_in_4bit
        assert {f: getattr(cfg.data, f) for f in SPLIT_FIELDS} == {f: getattr(t.data, f) for f in SPLIT_FIELDS}
    assert cfg.split == "test" and cfg.out_dir.startswith("/mnt/aigd/")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert cfg.scorers == workers["replicas"] and cfg.scorer_gpus == gpus  # one model copy per GPU pod


@pytest.mark.parametrize("name", ["rayjob-method1.yaml", "rayjob-method2.yaml", "rayjob-eval.yaml"])
def test_a_rayjob_retries_on_a_new_cluster_and_frees_its_gpus_soon(name):
    """A finished RayJob is terminal: KubeRay's backoffLimit is the retry, and the header says how to re-run
    it and where its log stays (the submitter Job's) once the cluster is gone."""
    text = (KUBERAY / name).read_text()
    (job,) = _docs(KUBERAY / name)
    spec, job_name = job["spec"], job["metadata"]["name"]
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True and 60 <= spec["ttlSecondsAfterFinished"] <= 300
    assert f"kubectl logs -f job/{job_name}" in text and f"kubectl delete rayjob {job_name}" in text


def test_rayservice_carries_serve_7b_and_validates_with_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    (svc,) = _docs(KUBERAY / "rayservice.yaml")
    assert svc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert serve_cfg == yaml.safe_load((ROOT / "configs" / "serve_7b.yaml").read_text())
    ServeDeploySchema.model_validate(serve_cfg)
    args = C.from_dict(C.ServeConfig, serve_cfg["applications"][0]["args"])
    assert args.auth.enabled and all(p.startswith("/mnt/aigd/adapters/") for p in args.adapters.values())
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert {"/mnt/aigd", str(Path(args.auth.keys_file).parent)} <= mounts


def test_a_promotion_written_into_the_rayservice_changes_only_the_detectors_user_config(tmp_path):
    """What `aigd promote --rayservice` writes: a valid Serve config whose only change is the Detector's
    user_config (Serve reconfigures in place) and the same cluster spec (KubeRay updates in place)."""
    from ray.serve.schema import ServeDeploySchema

    from aigd.lifecycle import rayservice_user_config, write_rayservice

    path = tmp_path / "rayservice.yaml"
    path.write_text((KUBERAY / "rayservice.yaml").read_text())
    assert rayservice_user_config(str(path), "aigd") == {}
    uc = {"versions": {"method1": "20261201T101500123Z-1a2b3c4d", "method2": "20261202T080000000Z-5e6f7a8b"},
          "shadow": {"method2": {"version": "20261203T000000000Z-99999999", "share": 0.2}}}
    write_rayservice(str(path), "aigd", uc)
    (before,), (after,) = _docs(KUBERAY / "rayservice.yaml"), _docs(path)
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    old, new = yaml.safe_load(before["spec"]["serveConfigV2"]), yaml.safe_load(after["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(new)
    (deployment,) = new["applications"][0].pop("deployments")
    assert old["applications"][0].pop("deployments") == [{"name": "Detector"}]  # there from the first deploy
    assert new == old and deployment == {"name": "Detector", "user_config": uc}
    assert C.from_dict(C.ServingVersions, deployment["user_config"]).shadow["method2"].share == 0.2
    assert rayservice_user_config(str(path), "aigd") == uc
    assert path.read_text().startswith("# The detector app on GPU pods")  # the header stays


def test_every_cluster_uses_token_auth_and_mounts_the_shared_volume():
    for path in KUBERAY.glob("ray*.yaml"):
        (doc,) = _docs(path)
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        assert cluster["authOptions"] == {"mode": "token"}, path.name
        ray_minor = ".".join(__import__("ray").__version__.split(".")[:2])
        assert cluster["rayVersion"].rsplit(".", 1)[0] == ray_minor, path.name  # the release pyproject pins
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            spec = group["template"]["spec"]
            assert {"name": "shared", "persistentVolumeClaim": {"claimName": "aigd-shared"}} in spec["volumes"]
            assert {"name": "shared", "mountPath": "/mnt/aigd"} in spec["containers"][0]["volumeMounts"]
    claims = [d for d in _docs(KUBERAY / "storage.yaml") if d["kind"] == "PersistentVolumeClaim"]
    assert claims[0]["metadata"]["name"] == "aigd-shared" and claims[0]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_vm_cluster_config_validates_with_the_ray_cluster_launchers_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (ROOT / "deploy" / "cluster-vm.yaml").read_text()
    raw = yaml.safe_load(text)
    validate_config(prepare_config(raw))
    start = " ".join(raw["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
    assert "--disable-usage-stats" in start
    # the code is shipped, not assumed: the checkout (as Git sees it) to where PYTHONPATH points
    ((remote, local),) = raw["file_mounts"].items()
    assert local == "." and raw["rsync_filter"] == [".gitignore"] and ".git" in raw["rsync_exclude"]
    assert f"PYTHONPATH={remote}:{remote}/jobs" in start
    # every pip runs in a virtual environment (PEP 668), made before any install, and ray starts from it
    setup = raw["setup_commands"]
    venv = next(i for i, c in enumerate(setup) if " venv " in c)
    on_path = next(i for i, c in enumerate(setup) if "aigd-venv/bin:$PATH" in c and ".bashrc" in c)
    pips = [i for i, c in enumerate(setup) if "pip install" in c]
    assert pips and venv < on_path < min(pips)
    assert _torch_pins(" ".join(setup)) == _torch_pins((ROOT / "deploy" / "Dockerfile").read_text())
    # the client side of token auth: the submit example sends the token the cluster was started with
    submit = next(line for line in text.splitlines() if "ray job submit" in line)
    assert "RAY_AUTH_MODE=token" in submit and "RAY_AUTH_TOKEN_PATH=" in submit
    header = text.split("cluster_name:")[0]  # which also says where to put the cluster's copy
    assert "RAY_AUTH_TOKEN_PATH=/mnt/aigd/secrets/ray-token" in start and "/mnt/aigd/secrets/ray-token" in header


def test_no_deploy_file_ships_a_secret_and_the_api_keys_secret_is_one_you_create():
    """No key in the repository (an example key is a key the app may accept), so no header that applies a
    file can overwrite the Secret you made. The RayService mounts the Secret storage.yaml tells you to create."""
    for path in [*KUBERAY.glob("*.yaml"), ROOT / "deploy" / "cluster-vm.yaml"]:
        for doc in _docs(path):
            assert doc.get("kind") != "Secret" and not {"data", "stringData"} & set(doc), path.name
    (svc,) = _docs(KUBERAY / "rayservice.yaml")
    keys_file = Path(C.from_dict(C.ServeConfig, yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"])
                     .auth.keys_file)
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (volume,) = [v for v in head["volumes"] if "secret" in v]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == str(keys_file.parent) and mount["readOnly"]
    storage = (KUBERAY / "storage.yaml").read_text()
    assert (f"kubectl create secret generic {volume['secret']['secretName']} --from-file={keys_file.name}="
            in storage) and "openssl rand" in storage


def test_the_staging_job_fills_the_paths_that_the_jobs_and_the_app_read():
    from huggingface_hub.cli.download import download

    (stage,) = _docs(KUBERAY / "stage-data.yaml")
    assert (stage["apiVersion"], stage["kind"]) == ("batch/v1", "Job")
    spec = stage["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "aigd-shared"}} in spec["volumes"]
    assert {"name": "shared", "mountPath": "/mnt/aigd"} in container["volumeMounts"]
    # online here only: every Ray pod reads the same cache offline
    (job,) = _docs(KUBERAY / "rayjob-eval.yaml")
    pods = job["spec"]["rayClusterSpec"]
    for group in [pods["headGroupSpec"], *pods["workerGroupSpecs"]]:
        assert _env(group)["HF_HUB_OFFLINE"] == "1" and _env(group)["HF_HOME"] == env["HF_HOME"]
    assert env["HF_HUB_OFFLINE"] != "1"
    assert container["command"][:2] == ["bash", "-c"]
    downloads = [shlex.split(line) for line in container["command"][2].splitlines() if line.startswith("hf ")]
    # `hf download`: huggingface_hub 1.x's `huggingface-cli` only prints that it no longer works
    options = set(inspect.signature(download).parameters)
    for argv in downloads:
        assert argv[:2] == ["hf", "download"], argv
        assert {a[2:].replace("-", "_") for a in argv if a.startswith("--")} <= options, argv
    models = {a[2] for a in downloads if "--repo-type" not in a}
    (data,) = [a for a in downloads if "--repo-type" in a]
    # what the jobs and the app load: the base (Unsloth's 4-bit copy beside it), SID_Set where the jobs read it
    staged = data[data.index("--local-dir") + 1]
    for method in ("method1", "method2"):
        raw = yaml.safe_load((ROOT / "configs" / f"{method}.yaml").read_text())
        assert raw["model"]["name_or_path"] in models
        assert (raw["data"]["source"], raw["data"]["path"]) == ("hub", data[2])  # the RayJobs override it: staged
        assert _train_config(method).data.path == staged
    assert C.load(C.EvalConfig, ROOT / "configs" / "eval_7b.yaml").data.path == staged
    serve = yaml.safe_load((ROOT / "configs" / "serve_7b.yaml").read_text())["applications"][0]["args"]
    assert serve["model"]["name_or_path"] in models
    assert {m for m in models if m.startswith("unsloth/")} == {"unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit"}
    assert data[data.index("--repo-type") + 1] == "dataset" and data[data.index("--include") + 1] == "*.parquet"


def _dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps PATH (relative to the root) out of the build context (its last match wins)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]  # a folder's match takes its files
        suffixes = ["/".join(p.split("/")[i:]) for p in prefixes for i in range(len(p.split("/")))]
        candidates = suffixes if pattern.startswith("**/") else prefixes
        if any(fnmatch.fnmatchcase(c, pattern.removeprefix("**/")) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_environments_state_and_history_out_of_the_image():
    for path in (".venv/bin/python", ".venv-ui/bin/python", ".aigd/adapters/method1", ".git/HEAD",
                 "platform/aigd/__pycache__/config.cpython-311.pyc", "platform/aigd.egg-info/PKG-INFO",
                 ".pytest_cache/v/cache", "build/lib/aigd/x.py", "web/node_modules/x/index.js"):
        assert _dockerignored(path), path
    for path in ("pyproject.toml", "README.md", "deploy/requirements-gpu.lock", "platform/aigd/config.py",
                 "jobs/evaluate.py", "serve/app.py", "configs/eval_7b.yaml"):
        assert (ROOT / path).exists() and not _dockerignored(path), path


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    lines = re.sub(r"\\\n", " ", dockerfile).splitlines()
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in lines if line.strip() and
            not line.lstrip().startswith("#")]


def _torch_pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|torchvision)==([0-9.]+)\+", text))


def test_the_image_installs_locked_dependencies_before_it_copies_the_source():
    """Layer caching: an edit of the source rebuilds the last layers only, never torch or the lock."""
    steps = _instructions((ROOT / "deploy" / "Dockerfile").read_text())
    copies = [i for i, (op, _) in enumerate(steps) if op == "COPY"]
    source = next(i for i in copies if steps[i][1].split()[-2:] == [".", "."])
    assert [steps[i][1].split()[-2] for i in copies if i < source] == ["deploy/requirements-gpu.lock"]
    runs = [(i, arg) for i, (op, arg) in enumerate(steps) if op == "RUN"]
    torch = next(i for i, arg in runs if "torch==" in arg and "--index-url https://download.pytorch.org/whl/" in arg)
    lock = next(i for i, arg in runs if "--require-hashes -r deploy/requirements-gpu.lock" in arg)
    assert torch < lock < source and "--no-deps" in steps[lock][1] and "pip check" in steps[lock][1]
    assert [arg for i, arg in runs if i > source and "pip install" in arg] == [
        "pip install --no-cache-dir --no-deps --no-build-isolation -e ."]
    # torch at the versions CI tests: pyproject.toml's caps
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    caps = dict(re.findall(r"^(torch|torchvision)\b.*<=([0-9.]+)", "\n".join(project["dependencies"]), re.M))
    assert _torch_pins(steps[torch][1]) == caps


def test_the_lock_pins_every_dependency_of_the_gpu_extra_within_pyproject_ranges():
    """deploy/requirements-gpu.lock (deploy/lock.sh) against pyproject.toml: a range changed there and
    not re-locked fails here. The torch stack comes from PyTorch's index instead (deploy/Dockerfile)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = (ROOT / "deploy" / "requirements-gpu.lock").read_text()
    pins = {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", text, re.M)}
    assert len(pins) == len(re.findall(r"^\S+==", text, re.M)) and text.count("--hash=sha256:") >= len(pins)
    assert not [n for n in pins if re.match(r"(torch|torchvision|triton|nvidia-|cuda-)", n) and n != "torchao"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in [*project["dependencies"], *project["optional-dependencies"]["gpu"]]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name in ("torch", "torchvision"):
            continue
        assert name in pins and req.specifier.contains(pins[name], prereleases=True), (spec, pins.get(name))


def test_the_rayservice_keeps_its_head_state_in_the_redis_that_redis_yaml_runs():
    """GCS fault tolerance as KubeRay >= 1.5 takes it: gcsFaultToleranceOptions naming redis.yaml's Service
    and the Secret its Redis reads the password from; none of what KubeRay refuses beside it (validation.go:
    the ft-enabled annotation, a redis-password start param, RAY_REDIS_ADDRESS or REDIS_PASSWORD set by
    hand); a proxy on every node and no replica on the head, so that the worker pods answer without it."""
    (svc,) = _docs(KUBERAY / "rayservice.yaml")
    cluster = svc["spec"]["rayClusterConfig"]
    ft = cluster["gcsFaultToleranceOptions"]
    redis = {d["kind"]: d for d in _docs(KUBERAY / "redis.yaml")}
    service = redis["Service"]
    assert ft["redisAddress"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    (container,) = redis["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["selector"] == redis["Deployment"]["spec"]["template"]["metadata"]["labels"]
    env = {e["name"]: e for e in container["env"]}
    args = container["args"]
    # Kubernetes substitutes $(VAR) in args only for a variable the container declares
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env["REDIS_PASSWORD"]["valueFrom"] == ft["redisPassword"]["valueFrom"]
    # a restarted Redis keeps the cluster: append-only file on the claimed volume
    assert args[args.index("--appendonly") + 1] == "yes"
    (mount,) = container["volumeMounts"]
    assert args[args.index("--dir") + 1] == mount["mountPath"]
    (volume,) = redis["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == redis["PersistentVolumeClaim"]["metadata"]["name"]
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert (f"kubectl create secret generic {secret['name']} --from-literal={secret['key']}="
            in (KUBERAY / "redis.yaml").read_text())
    head = cluster["headGroupSpec"]
    assert "redis-password" not in head["rayStartParams"] and head["rayStartParams"]["num-cpus"] == "0"
    assert "ray.io/ft-enabled" not in svc["metadata"].get("annotations", {})
    for group in [head, *cluster["workerGroupSpecs"]]:
        names = {e["name"] for e in group["template"]["spec"]["containers"][0]["env"]}
        assert not names & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "RAY_external_storage_namespace"}
    assert yaml.safe_load(svc["spec"]["serveConfigV2"])["proxy_location"] == "EveryNode"
    # a RayJob's cluster lives for one job: it retries on a new cluster instead
    for path in KUBERAY.glob("rayjob-*.yaml"):
        (job,) = _docs(path)
        assert "gcsFaultToleranceOptions" not in job["spec"]["rayClusterSpec"], path.name


def test_the_vm_head_starts_on_redis_with_the_password_from_the_shared_volume_and_workers_wait_for_it():
    raw = yaml.safe_load((ROOT / "deploy" / "cluster-vm.yaml").read_text())
    head, worker = " ".join(raw["head_start_ray_commands"]), " ".join(raw["worker_start_ray_commands"])
    env = dict(re.findall(r"\b(RAY_[A-Za-z_]+)=(\S+)", head))
    host, port = env["RAY_REDIS_ADDRESS"].rsplit(":", 1)
    assert host != raw["provider"]["head_ip"] and port.isdigit()  # Redis must outlive the head
    assert env["RAY_external_storage_namespace"]  # the restarted head reads the same keys
    assert '--redis-password="$(cat /mnt/aigd/secrets/redis-password)"' in head
    assert "RAY_REDIS_ADDRESS" not in worker and "redis-password" not in worker
    (timeout,) = re.findall(r"RAY_gcs_rpc_server_reconnect_timeout_s=(\d+)", worker)
    assert int(timeout) >= 600
