"""Writes the KubeRay manifests under deploy/kuberay/ from the project's own configs, so they cannot
drift from them (tests/test_deploy.py checks that the files equal this script's output).

    .venv/bin/python deploy/render.py

Layout on every pod: the image of deploy/Dockerfile (this repository at /home/ray/aigd) and one
shared ReadWriteMany volume at /mnt/aigd (deploy/kuberay/storage.yaml): hf/ (model cache), data/
(SID_Set parquet), runs/ (checkpoints), adapters/ (what the jobs export and Serve loads), eval/.
storage.yaml (the volume) is written by hand; so is the API-key Secret, by you (no key ships here).
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "deploy" / "kuberay"
APP = "/home/ray/aigd"  # where deploy/Dockerfile puts the repository
IMAGE = "REGISTRY/aigd:0.1.0"  # built from deploy/Dockerfile
RAY_VERSION = "2.60.0"
SHARED = "/mnt/aigd"
HF_HOME = f"{SHARED}/hf"
DATA = f"{SHARED}/data/SID_Set"  # SID_Set's parquet files, as stage-data.yaml downloads them
ENV = {"AIGD_HOME": SHARED, "AIGD_STORAGE": f"{SHARED}/runs", "HF_HOME": HF_HOME,
       "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
# 4 training GPUs, effective batch 40 = batch_size 10 x grad_accum 1 x 4 workers (the seed's)
TRAIN_OVERRIDES = ["data.source=sid_parquet", f"data.path={DATA}", "run.shared_storage=true",
                   "scaling.num_workers=4", "optim.batch_size=10", "optim.grad_accum=1"]
EVAL_OVERRIDES = ["scorers=4"]  # one model copy per GPU worker
# What Ray Train's own restarts (run.max_failures) cannot survive, the head pod or the driver lost, KubeRay
# retries on a new cluster; the same run.name resumes from the checkpoints on the shared volume.
BACKOFF_LIMIT = 2
TTL_S = 120  # a finished job's cluster (4 GPU pods) lingers this long: enough to look, not to idle
# The RayService's GCS state lives in Redis (GCS fault tolerance): the Service of kuberay/redis.yaml, or a
# managed Redis's endpoint; its password from the Secret you create (redis.yaml says how).
REDIS_ADDRESS = "aigd-redis:6379"
REDIS_SECRET = {"name": "aigd-redis", "key": "password"}
# What Unsloth loads for the base with load_in_4bit (its unsloth/models/mapper.py), so the cache needs it too.
UNSLOTH_4BIT = {"Qwen/Qwen2.5-VL-7B-Instruct": "unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit"}


class _Block(str):
    """A string YAML writes as a literal block (serveConfigV2 is YAML inside YAML)."""


yaml.SafeDumper.ignore_aliases = lambda self, data: True  # plain YAML, no &anchors
yaml.SafeDumper.add_representer(_Block, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))


def _config(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def _shared_volume() -> dict:
    return {"name": "shared", "persistentVolumeClaim": {"claimName": "aigd-shared"}}


def pod(name: str, cpu: int, memory: str, gpu: bool, api_keys: bool) -> dict:
    limits = {"cpu": str(cpu), "memory": memory, **({"nvidia.com/gpu": 1} if gpu else {})}
    mounts = [{"name": "shared", "mountPath": SHARED}]
    volumes = [_shared_volume()]
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
        # A head pod lost (GCS, node, eviction) no longer takes the app down: the worker pods' proxies and
        # replicas keep answering, KubeRay starts a new head on the same Redis and the Serve controller
        # comes back with its applications. KubeRay gives the worker pods 600 s to reconnect, and names the
        # storage after the RayCluster, so a new cluster (an upgrade) never reads an old one's state.
        # The RayJobs' clusters live for one job and retry on a new cluster instead (backoffLimit).
        spec["gcsFaultToleranceOptions"] = {"redisAddress": REDIS_ADDRESS,
                                            "redisPassword": {"valueFrom": {"secretKeyRef": REDIS_SECRET}}}
    return spec


def rayjob(name: str, file: str, entry: list[str], about: str) -> tuple[str, dict]:
    header = (f"# {about}; written by deploy/render.py.\n"
              "# Needs, once: storage.yaml applied and the data staged (stage-data.yaml).\n"
              f"#   kubectl apply -f deploy/kuberay/{file}\n"
              f"#   kubectl get rayjob {name}\n"
              f"#   kubectl logs -f job/{name}   # the driver's log (KubeRay's submitter Job), kept after the cluster goes\n"
              f"# A failure is retried up to {BACKOFF_LIMIT} times, each on a new cluster (a retry replaces the log).\n"
              f"# A finished RayJob never runs again, applied or not: `kubectl delete rayjob {name}`, then apply it.\n")
    return header, {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name},
        "spec": {"entrypoint": " ".join(entry), "backoffLimit": BACKOFF_LIMIT,
                 "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": TTL_S,
                 "rayClusterSpec": ray_cluster((4, 4, 4), 12, "96Gi", serve=False)}}


def train_job(method: str) -> tuple[str, dict]:
    header, doc = rayjob(f"aigd-train-{method}", f"rayjob-{method}.yaml",
                         [f"python {APP}/jobs/train_{method}.py --config {APP}/configs/{method}.yaml", *TRAIN_OVERRIDES],
                         f"Ray Train job for {method} on 4 GPUs (one per worker pod)")
    return header + (
        f"# Checkpoints: {SHARED}/runs/{method}; a retry, or a re-run with the same run.name, resumes from the\n"
        f"# last one. The adapter: {SHARED}/adapters/{method} (read by rayservice.yaml and rayjob-eval.yaml).\n"), doc


def eval_job() -> tuple[str, dict]:
    header, doc = rayjob("aigd-eval", "rayjob-eval.yaml",
                         [f"python {APP}/jobs/evaluate.py --config {APP}/configs/eval_7b.yaml", *EVAL_OVERRIDES],
                         "Evaluation of both 7B adapters and their ensemble on 4 GPUs (configs/eval_7b.yaml)")
    return header + (f"# Run it after both training RayJobs; a retry starts over. The report goes to\n"
                     f"# {_config('eval_7b.yaml')['out_dir']}, the figures beside each adapter version (for `aigd promote`).\n"), doc


def stage_job() -> tuple[str, dict]:
    """A plain Kubernetes Job (no Ray) that fills the shared volume: the only pod that goes online."""
    method1 = _config("method1.yaml")
    base, data = method1["model"]["name_or_path"], method1["data"]["path"]  # data.source: hub
    script = "\n".join(["set -eu", f"hf download {base}", f"hf download {UNSLOTH_4BIT[base]}",
                        f"hf download {data} --repo-type dataset --include '*.parquet' --local-dir {DATA}"]) + "\n"
    header = ("# Fills the shared volume once: the base model and Unsloth's 4-bit copy into the Hugging Face cache\n"
              f"# ({HF_HOME}, which every Ray pod reads offline) and SID_Set's parquet files into {DATA}\n"
              "# (data.source=sid_parquet); written by deploy/render.py. The only pod with HF_HUB_OFFLINE off.\n"
              "#   kubectl apply -f deploy/kuberay/storage.yaml -f deploy/kuberay/stage-data.yaml\n"
              "#   kubectl logs -f job/aigd-stage-data\n"
              "# `hf download` skips what is already there: to re-run (after a failure, or for new files), delete\n"
              "# the Job and apply it again. A token for gated or rate-limited downloads, if you have one:\n"
              "#   kubectl create secret generic aigd-hf-token --from-literal=token=hf_...\n")
    env = [{"name": "HF_HOME", "value": HF_HOME},
           {"name": "HF_HUB_OFFLINE", "value": "0"},  # the image sets 1: the Ray pods never download
           {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "aigd-hf-token", "key": "token",
                                                               "optional": True}}}]
    limits = {"cpu": "2", "memory": "8Gi"}
    return header, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "aigd-stage-data"},
        "spec": {"backoffLimit": 4, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "stage", "image": IMAGE, "command": ["bash", "-c", _Block(script)], "env": env,
                            "resources": {"limits": limits, "requests": limits},
                            "volumeMounts": [{"name": "shared", "mountPath": SHARED}]}],
            "volumes": [_shared_volume()]}}}}


def rayservice() -> tuple[str, dict]:
    header = ("# The detector app on GPU pods; written by deploy/render.py. serveConfigV2 IS configs/serve_7b.yaml\n"
              "# (comments dropped): the same ServeConfig args, adapters on /mnt/aigd/adapters, API keys from the\n"
              "# aigd-api-keys Secret at /mnt/secrets/aigd/api-keys, which you create once (storage.yaml says how;\n"
              "# no key ships with this repository). The head's state is in Redis (redis.yaml, applied first):\n"
              "# the app keeps answering while a head pod is replaced.\n"
              "#   kubectl apply -f deploy/kuberay/redis.yaml && kubectl apply -f deploy/kuberay/rayservice.yaml\n"
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
    for name, (header, doc) in {"rayjob-method1.yaml": train_job("method1"), "rayjob-method2.yaml": train_job("method2"),
                                "rayjob-eval.yaml": eval_job(), "stage-data.yaml": stage_job(),
                                "rayservice.yaml": rayservice()}.items():
        out[OUT / name] = header + yaml.safe_dump(doc, sort_keys=False, width=120)
    return out


if __name__ == "__main__":
    for path, text in render().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
