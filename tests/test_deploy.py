"""Cluster files under deploy/: rendered from the configs, pointing at real files, valid for Ray,
and following the multi-node storage rules the jobs enforce."""

import importlib
import shlex
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
    for path, text in _render().items():
        assert path.read_text() == text, f"{path.name} is stale: run .venv/bin/python deploy/render.py"


@pytest.mark.parametrize("method", ["method1", "method2"])
def test_rayjob_entrypoint_names_real_files_and_its_overrides_load(method, monkeypatch):
    (job,) = _docs(KUBERAY / f"rayjob-{method}.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    script, config = Path(argv[1]), Path(argv[argv.index("--config") + 1])
    local = [ROOT / p.relative_to(APP) for p in (script, config)]
    assert all(p.exists() for p in local), local
    # the pod env, then the recipe's own config loading: unknown keys or wrong types would raise here
    env = {e["name"]: e["value"] for e in
           job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    recipe = importlib.import_module(f"train_{method}")
    cfg = C.load(C.TrainJobConfig, local[1], argv[argv.index("--config") + 2:], base=recipe.PRESET)
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg.scaling.num_workers == workers["replicas"] and cfg.scaling.use_gpu
    assert cfg.optim.batch_size * cfg.optim.grad_accum * cfg.scaling.num_workers == 40  # the seed's batch
    T.check_storage(cfg, n_nodes=workers["replicas"] + 1)  # the multi-node rule the job enforces at start
    assert cfg.run.storage_path.startswith("/mnt/aigd/") and cfg.run.export_dir == f"/mnt/aigd/adapters/{method}"


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

    raw = yaml.safe_load((ROOT / "deploy" / "cluster-vm.yaml").read_text())
    validate_config(prepare_config(raw))
    start = " ".join(raw["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
    assert "--disable-usage-stats" in start
