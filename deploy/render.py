"""Writes the KubeRay manifests under deploy/kuberay/ from the project's own configs, so they cannot
drift from them (tests/test_deploy.py checks that the files equal this script's output).

    .venv/bin/python deploy/render.py

Layout on every pod: the image of deploy/Dockerfile (this repository at /home/ray/aigd) and one
shared ReadWriteMany volume at /mnt/aigd (deploy/kuberay/storage.yaml): hf/ (model cache), data/
(SID_Set parquet), runs/ (checkpoints), adapters/ (what the jobs export and Serve loads).
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "deploy" / "kuberay"
APP = "/home/ray/aigd"  # where deploy/Dockerfile puts the repository
IMAGE = "REGISTRY/aigd:0.1.0"  # built from deploy/Dockerfile
RAY_VERSION = "2.60.0"
ENV = {"AIGD_HOME": "/mnt/aigd", "AIGD_STORAGE": "/mnt/aigd/runs", "HF_HOME": "/mnt/aigd/hf",
       "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
# 4 training GPUs, effective batch 40 = batch_size 10 x grad_accum 1 x 4 workers (the seed's)
TRAIN_OVERRIDES = ["data.source=sid_parquet", "data.path=/mnt/aigd/data/SID_Set", "run.shared_storage=true",
                   "scaling.num_workers=4", "optim.batch_size=10", "optim.grad_accum=1"]


class _Block(str):
    """A string YAML writes as a literal block (serveConfigV2 is YAML inside YAML)."""


yaml.SafeDumper.ignore_aliases = lambda self, data: True  # plain YAML, no &anchors
yaml.SafeDumper.add_representer(_Block, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))


def pod(name: str, cpu: int, memory: str, gpu: bool, api_keys: bool) -> dict:
    limits = {"cpu": str(cpu), "memory": memory, **({"nvidia.com/gpu": 1} if gpu else {})}
    mounts = [{"name": "shared", "mountPath": "/mnt/aigd"}]
    volumes = [{"name": "shared", "persistentVolumeClaim": {"claimName": "aigd-shared"}}]
    if api_keys:
        mounts.append({"name": "api-keys", "mountPath": "/mnt/secrets/aigd", "readOnly": True})
        volumes.append({"name": "api-keys", "secret": {"secretName": "aigd-api-keys"}})
    return {"spec": {"containers": [{
        "name": name, "image": IMAGE, "env": [{"name": k, "value": v} for k, v in ENV.items()],
        "resources": {"limits": limits, "requests": limits}, "volumeMounts": mounts}], "volumes": volumes}}


def ray_cluster(workers: tuple[int, int, int], cpu: int, memory: str, serve: bool) -> dict:
    replicas, lo, hi = workers
    spec = {
        "rayVersion": RAY_VERSION,
        # Token auth: whoever reaches the dashboard or the job port can run code on the cluster.
        "authOptions": {"mode": "token"},
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                          "template": pod("ray-head", 4, "16Gi", False, serve)},
        "workerGroupSpecs": [{"groupName": "gpu", "replicas": replicas, "minReplicas": lo, "maxReplicas": hi,
                              "rayStartParams": {}, "template": pod("ray-worker", cpu, memory, True, serve)}],
    }
    if serve:
        spec["enableInTreeAutoscaling"] = True  # GPU pods follow the model replicas' autoscaling
    return spec


def rayjob(method: str) -> tuple[str, dict]:
    header = (f"# Ray Train job for {method} on 4 GPUs (one per worker pod); written by deploy/render.py.\n"
              f"#   kubectl apply -f deploy/kuberay/storage.yaml -f deploy/kuberay/rayjob-{method}.yaml\n"
              f"#   kubectl get rayjob aigd-train-{method}     # logs: the Ray dashboard's Jobs view\n"
              f"# Checkpoints: /mnt/aigd/runs/{method}; the adapter: /mnt/aigd/adapters/{method} (read by\n"
              "# rayservice.yaml). Applying it again after a failure resumes from the last checkpoint.\n")
    entry = " ".join([f"python {APP}/jobs/train_{method}.py --config {APP}/configs/{method}.yaml", *TRAIN_OVERRIDES])
    return header, {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": f"aigd-train-{method}"},
        "spec": {"entrypoint": entry, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
                 "rayClusterSpec": ray_cluster((4, 4, 4), 12, "96Gi", serve=False)}}


def rayservice() -> tuple[str, dict]:
    header = ("# The detector app on GPU pods; written by deploy/render.py. serveConfigV2 IS configs/serve_7b.yaml\n"
              "# (comments dropped): the same ServeConfig args, adapters on /mnt/aigd/adapters, API keys from the\n"
              "# aigd-api-keys Secret (storage.yaml) at /mnt/secrets/aigd/api-keys.\n"
              "#   kubectl apply -f deploy/kuberay/storage.yaml -f deploy/kuberay/rayservice.yaml\n"
              "#   kubectl port-forward svc/aigd-serve-svc 8000:8000\n"
              "#   curl -H 'Authorization: Bearer KEY' -F image=@photo.jpg http://127.0.0.1:8000/v1/ensemble\n"
              "# Each adapter serves its newest registry version at first deploy. A new version (the RayJob\n"
              "# publishes one) goes live through the gate, written into this file, then applied:\n"
              "#   aigd promote method2 VERSION --app URL --rayservice deploy/kuberay/rayservice.yaml\n"
              "#   kubectl apply -f deploy/kuberay/rayservice.yaml   # only the Detector's user_config changes:\n"
              "# KubeRay updates the Serve config in place, Serve reconfigures the replicas (deploy/README.md).\n")
    serve_cfg = "\n".join(line for line in (ROOT / "configs" / "serve_7b.yaml").read_text().splitlines()
                          if not line.lstrip().startswith("#")) + "\n"
    return header, {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "aigd"},
        "spec": {"serveConfigV2": _Block(serve_cfg),
                 "rayClusterConfig": ray_cluster((1, 1, 8), 8, "48Gi", serve=True)}}


def render() -> dict[Path, str]:
    out = {}
    for name, (header, doc) in {"rayjob-method1.yaml": rayjob("method1"), "rayjob-method2.yaml": rayjob("method2"),
                                "rayservice.yaml": rayservice()}.items():
        out[OUT / name] = header + yaml.safe_dump(doc, sort_keys=False, width=120)
    return out


if __name__ == "__main__":
    for path, text in render().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
