"""Adapter lifecycle against a running app: the registry view, the evaluation gate, promotion and
rollback without downtime, shadow scoring. `aigd adapters ...`, `aigd promote`, `aigd rollback`.

A promotion changes only the Detector deployment's `user_config` (aigd.config.ServingVersions)
through the Serve REST API of the app's cluster: Serve keeps the replicas and calls `reconfigure`
on each, which loads the new version beside the old one and swaps it in between two forwards
(serve/detector.py, aigd.scorer.Scorer.switch). The candidate is checked here first (files,
hashes, base, image policy, gate), so a bad version never reaches a replica; one that still fails
on a replica is undone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

from aigd import config as C
from aigd import registry
from aigd.client import ApiError, Client
from aigd.errors import AigdError
from aigd.manifest import check_compatible, policy_of, read_manifest

DETECTOR = "Detector"  # the model deployment's name in the app (serve/detector.py)
LOWER_IS_BETTER = {"ece", "brier", "ece_before", "ece_after"}


class PromotionRefused(AigdError):
    code = "promotion_refused"


class PromotionBusy(AigdError):
    code = "promotion_in_progress"


# --------------------------------------------------------------------------- the gate


@dataclass
class GateRow:
    figure: str
    candidate: float | None
    serving: float | None
    floor: float | None
    ok: bool
    why: str


def _worse(figure: str, a: float, b: float) -> float:
    """How much worse `a` is than `b` (positive: worse)."""
    return a - b if figure.rsplit(".", 1)[-1] in LOWER_IS_BETTER else b - a


def common_evaluation(candidate: registry.Version, serving: registry.Version, evalset: str | None) -> tuple:
    """(evaluation set id, candidate record, serving record): the newest set both were evaluated on."""
    cand, serv = registry.evaluations(candidate), registry.evaluations(serving)
    shared = [k for k in cand if k in serv] if evalset is None else [evalset] * (evalset in cand and evalset in serv)
    if not shared:
        raise PromotionRefused(
            f"no evaluation of both {candidate} and {serving} on the same evaluation set "
            f"(candidate: {sorted(cand) or 'none'}; serving: {sorted(serv) or 'none'}). Evaluate both on one set: "
            f"python jobs/evaluate.py --config CONFIG adapters='{{{serving.name}: {serving.uri}, "
            f"candidate: {candidate.uri}}}'")
    best = max(shared, key=lambda k: cand[k]["recorded_at"])
    return best, cand[best], serv[best]


def gate(candidate: dict, serving: dict | None, cfg: C.GateConfig) -> list[GateRow]:
    """One row per gated figure: the candidate's value, the serving version's, the floor, the verdict."""
    rows = []
    for figure in dict.fromkeys([*cfg.floors, *cfg.compare]):
        c = candidate.get(figure)
        s = serving.get(figure) if serving is not None else None
        floor = cfg.floors.get(figure)
        why = []
        if c is None or (isinstance(c, float) and math.isnan(c)):
            why.append("not measured")
        else:
            if floor is not None and _worse(figure, c, floor) > 0:
                why.append(f"below the floor {floor:g}")
            if figure in cfg.compare and s is not None and _worse(figure, c, s) > cfg.max_regression:
                why.append(f"{_worse(figure, c, s):.4f} worse than serving (margin {cfg.max_regression:g})")
        rows.append(GateRow(figure, c, s, floor, not why, "; ".join(why) or "ok"))
    return rows


def gate_table(rows: list[GateRow], candidate: str, serving: str) -> str:
    def f(v):
        return "-" if v is None else f"{v:.4f}"

    lines = [f"candidate: {candidate}", f"serving:   {serving}",
             f"{'figure':22s} {'candidate':>10s} {'serving':>10s} {'floor':>7s}  verdict"]
    lines += [f"{r.figure:22s} {f(r.candidate):>10s} {f(r.serving):>10s} {f(r.floor):>7s}  {r.why}" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the app


class ServeApp:
    """One Serve application seen through its HTTP API (what answers) and its cluster's Serve REST
    API (its deployed config, which a promotion changes)."""

    def __init__(self, url: str, dashboard: str, name: str, timeout_s: float = 30.0):
        self.url, self.dashboard, self.name, self.timeout_s = url.rstrip("/"), dashboard.rstrip("/"), name, timeout_s
        self.client = Client(self.url, os.environ.get("AIGD_API_KEY"), timeout_s=timeout_s)

    def models(self) -> dict:
        return self.client.models()

    def serving(self, required: str | None = None) -> dict[str, str]:
        """adapter -> the version the app answers with now; refused when `required` is not among them."""
        now = {n: a["version"] for n, a in self.models()["adapters"].items()}
        if required is not None and required not in now:
            raise PromotionRefused(f"the app serves no adapter {required!r}; it serves {sorted(now)}")
        return now

    def _rest(self, method: str, body: dict | None = None) -> dict:
        try:
            r = requests.request(method, f"{self.dashboard}/api/serve/applications/", json=body, timeout=self.timeout_s)
        except requests.RequestException as e:
            raise PromotionRefused(f"cannot reach the Ray dashboard at {self.dashboard}: {type(e).__name__}") from None
        if r.status_code != 200:
            raise PromotionRefused(f"Serve REST API {method} answered {r.status_code}: {r.text[:300]}")
        return r.json() if r.text else {}

    def details(self) -> dict:
        d = self._rest("GET")
        app = d.get("applications", {}).get(self.name)
        if app is None:
            raise PromotionRefused(f"no Serve application {self.name!r} on {self.dashboard}; "
                                   f"running: {sorted(d.get('applications', {}))}")
        if app.get("source") != "declarative" or app.get("deployed_app_config") is None:
            raise PromotionRefused(f"application {self.name!r} was deployed from Python (serve.run), which restarts "
                                   "every replica on any change; deploy it from a config (serve run / serve deploy "
                                   "CONFIG.yaml) to promote in place")
        return d

    def detector(self, details: dict | None = None) -> dict:
        return (details or self.details())["applications"][self.name].get("deployments", {}).get(DETECTOR, {})

    def has_detector_entry(self) -> bool:
        app = self.details()["applications"][self.name]["deployed_app_config"]
        return any(dep.get("name") == DETECTOR for dep in app.get("deployments") or [])

    def user_config(self) -> dict:
        """The Detector's user_config as the app's config sets it ({} before any promotion)."""
        app = self.details()["applications"][self.name]["deployed_app_config"]
        for dep in app.get("deployments") or []:
            if dep.get("name") == DETECTOR and dep.get("user_config") is not None:
                return dep["user_config"]
        return {}

    def set_user_config(self, user_config: dict) -> None:
        """Redeploy the same config with only the Detector's user_config changed: Serve keeps the
        replicas and calls reconfigure on each, one at a time (a change to `args` would restart
        them all). Every other app deployed from a config is sent back as it is, or the PUT would
        delete it; apps deployed from Python are left alone by a PUT."""
        d = self.details()
        apps = []
        for name, a in d["applications"].items():
            cfg = a.get("deployed_app_config")
            if a.get("source") != "declarative" or cfg is None:
                continue
            if name == self.name:
                deps = [x for x in cfg.get("deployments") or [] if x.get("name") != DETECTOR]
                old = next((x for x in cfg.get("deployments") or [] if x.get("name") == DETECTOR), {"name": DETECTOR})
                cfg = {**cfg, "deployments": [*deps, {**old, "user_config": user_config}]}
            apps.append(cfg)
        body = {"applications": apps, **{k: d[k] for k in ("proxy_location", "target_capacity") if d.get(k) is not None}}
        self._rest("PUT", body)

    def rolled_out(self, user_config: dict) -> bool:
        """Serve is done: the Detector has this user_config, is HEALTHY and every replica RUNNING
        (a replica is UPDATING while its reconfigure runs). A failed rollout raises."""
        d = self.details()
        app, det = d["applications"][self.name], self.detector(d)
        if det.get("status") in ("DEPLOY_FAILED", "UNHEALTHY") or app.get("status") == "DEPLOY_FAILED":
            raise PromotionRefused(f"Serve reports the Detector {det.get('status')}: {det.get('message', '')[:300]}")
        replicas = det.get("replicas", [])
        return (det.get("deployment_config", {}).get("user_config") == user_config
                and det.get("status") in ("HEALTHY", "UPSCALING", "DOWNSCALING")
                and app.get("status") == "RUNNING" and len(replicas) == det.get("target_num_replicas")
                and all(r.get("state") == "RUNNING" for r in replicas))


# --------------------------------------------------------------------------- promotion


class Lock:
    """One promotion per app at a time on this machine: an exclusive flock on a lock file, which
    the OS releases when its holder exits, however it exits."""

    def __init__(self, key: str):
        home = os.path.expanduser(os.environ.get("AIGD_HOME", "~/.cache/aigd"))
        self.path = Path(home) / "locks" / f"promote-{hashlib.sha256(key.encode()).hexdigest()[:12]}.lock"
        self.fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise PromotionBusy(f"another promotion of this app is running ({holder or 'pid unknown'}); retry "
                                f"when it ends (lock: {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def check_candidate(candidate: registry.Version, serving: registry.Version) -> dict:
    """Files, hashes and safetensors (registry.verify), then the same base and image policy as the
    version serving now; returns the candidate's manifest."""
    manifest = registry.verify(candidate)
    current = read_manifest(serving)
    check_compatible(manifest, current["base"], policy_of(current), where=f"{candidate} (serving: {serving})")
    return manifest


def wait_applied(app: ServeApp, name: str, version: str | None, user_config: dict, timeout_s: float,
                 field: str = "adapters") -> None:
    """Until Serve has rolled the user_config out and every Detector replica has answered with
    `version` (each /v1/models answer names its replica); a replica that refused it raises
    (replicas never raise in reconfigure: Serve would stop them)."""
    deadline, seen = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            info = app.models()
        except ApiError:  # a busy or restarting router: ask again
            time.sleep(0.5)
            continue
        refused = info.get("refused_versions", {}).get(name if field == "adapters" else f"{name} (shadow)")
        if refused and refused.get("version") == version:
            raise PromotionRefused(f"replica {info.get('replica')} refused {name}@{version}: {refused['error']}")
        now = info["adapters"].get(name, {}).get("version") if field == "adapters" else info["shadows"].get(name)
        seen[info.get("replica")] = now
        replicas = {r.get("replica_id") for r in app.detector().get("replicas", [])}
        if replicas and all(seen.get(r) == version for r in replicas) and app.rolled_out(user_config):
            return
        time.sleep(0.2)
    raise PromotionRefused(f"{name}@{version} not serving on every replica after {timeout_s:g} s")


def switch(cfg: C.PromoteConfig, app: ServeApp, name: str, user_config: dict, version: str | None, field: str) -> None:
    """Apply a new user_config; undo it when a replica refuses the version, it never lands, or
    the wait is interrupted."""
    # Explicit versions, not {}: an undo must also switch back a replica that did take the new one.
    before = app.user_config() or {"versions": app.serving(), "shadow": {}}
    app.set_user_config(user_config)
    try:
        wait_applied(app, name, version, user_config, cfg.timeout_s, field)
    except BaseException:
        app.set_user_config(before)
        raise


def promote(cfg: C.PromoteConfig, name: str, version: str, app_url: str, *, action: str = "promote",
            evalset: str | None = None, gate_on: bool = True, rayservice: str | None = None, log=print) -> list[GateRow]:
    """Gate, then switch `name` of the app at `app_url` to `version` with no request lost; with
    `rayservice`, write the switch into that RayService manifest for `kubectl apply` instead."""
    app = ServeApp(app_url, cfg.dashboard, cfg.serve_app, cfg.timeout_s)
    entry = f"{cfg.registry.rstrip('/')}/{name}"
    with Lock(f"{rayservice or cfg.dashboard}|{cfg.serve_app}"):
        serving_now = app.serving(name)
        candidate, serving = registry.Version(entry, version), registry.Version(entry, serving_now[name])
        if candidate == serving:
            raise PromotionRefused(f"{candidate} is already serving")
        check_candidate(candidate, serving)
        rows = []
        if gate_on:
            evalset, cand_rec, serv_rec = common_evaluation(candidate, serving, evalset)
            rows = gate(cand_rec["metrics"], serv_rec["metrics"], cfg.gate)
            log(f"gate on evaluation set {evalset}:\n{gate_table(rows, str(candidate), str(serving) + ' (serving)')}")
            if not all(r.ok for r in rows):
                raise PromotionRefused(f"{candidate} does not pass the gate: " +
                                       "; ".join(f"{r.figure} {r.why}" for r in rows if not r.ok))
        current = rayservice_user_config(rayservice, cfg.serve_app) if rayservice else app.user_config()
        if not rayservice and not app.has_detector_entry():
            log(f"warning: the config of {cfg.serve_app!r} has no `deployments: [{{name: {DETECTOR}}}]` entry; "
                "Serve may replace the replicas on this first promotion instead of reconfiguring them (add the "
                "entry to the app's config, as configs/serve_*.yaml have it)")
        uc = {**current, "versions": {**serving_now, name: version}}
        uc["shadow"] = {n: s for n, s in (current.get("shadow") or {}).items()
                        if not (n == name and s.get("version") == version)}  # a shadow promoted stops shadowing
        t0 = time.perf_counter()
        if rayservice:
            write_rayservice(rayservice, cfg.serve_app, uc)
            log(f"{action}: {name} {serving.version} -> {version} written into {rayservice}; apply it with: "
                f"kubectl apply -f {rayservice} (KubeRay updates the Serve config in place)")
            action += " (rayservice)"
        else:
            switch(cfg, app, name, uc, version, "adapters")
            log(f"{action}: {name} {serving.version} -> {version} on {app.url} in {time.perf_counter() - t0:.1f} s")
        registry.record_promotion(entry, app.url, serving.version, version, action)
        return rows


def rollback(cfg: C.PromoteConfig, name: str, app_url: str, rayservice: str | None = None, log=print) -> str:
    """Promote the version this one replaced on this app (the promotion records say which); no gate."""
    app = ServeApp(app_url, cfg.dashboard, cfg.serve_app, cfg.timeout_s)
    current = app.serving().get(name)
    entry = f"{cfg.registry.rstrip('/')}/{name}"
    previous = previous_version(entry, app.url, current)
    if previous is None:
        raise PromotionRefused(f"no promotion to {name}@{current} on {app.url} is recorded; nothing to roll back "
                               f"(promote an older version by name instead)")
    promote(cfg, name, previous, app_url, action="rollback", gate_on=False, rayservice=rayservice, log=log)
    return previous


def previous_version(entry: str, app_url: str, current: str) -> str | None:
    """The version the newest promotion to `current` on this app replaced (a rollback's `from` is
    the version it rolled back, never a target)."""
    found = [p["from"] for p in registry.promotions(entry) if p["app"] == app_url and p["to"] == current
             and p["from"] and not p["action"].startswith("rollback")]
    return found[-1] if found else None


def set_shadow(cfg: C.PromoteConfig, name: str, version: str | None, share: float, app_url: str,
               budget_ms: float = 50.0, log=print) -> None:
    """Put a candidate in shadow of `name` (None: end the shadow); answers never change."""
    app = ServeApp(app_url, cfg.dashboard, cfg.serve_app, cfg.timeout_s)
    entry = f"{cfg.registry.rstrip('/')}/{name}"
    with Lock(f"{cfg.dashboard}|{cfg.serve_app}"):
        serving_now = app.serving(name)
        uc = app.user_config() or {"versions": serving_now}
        shadow = dict(uc.get("shadow", {}))
        if version is None:
            shadow.pop(name, None)
        else:
            check_candidate(registry.Version(entry, version), registry.Version(entry, serving_now[name]))
            shadow[name] = C.to_dict(C.ShadowConfig(version=version, share=share, budget_ms=budget_ms))
        switch(cfg, app, name, {**uc, "versions": uc.get("versions", serving_now), "shadow": shadow}, version,
               "shadows")
        log(f"shadow of {name}: {version or 'off'}" + (f" on {share:.0%} of its images" if version else ""))


# --------------------------------------------------------------------------- RayService manifests


class _BlockDumper(yaml.SafeDumper):
    """serveConfigV2 (YAML inside YAML) stays a readable literal block."""


_BlockDumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                                  style="|" if "\n" in s else None))


def _rayservice(path: str) -> tuple[str, dict, dict]:
    text = Path(path).read_text()
    header = "".join(line for line in text.splitlines(keepends=True)[:50] if line.startswith("#"))
    doc = yaml.safe_load(text)
    if doc.get("kind") != "RayService":
        raise PromotionRefused(f"{path} is not a RayService manifest")
    return header, doc, yaml.safe_load(doc["spec"]["serveConfigV2"])


def _detector_entry(serve_cfg: dict, app_name: str) -> tuple[dict, dict]:
    app = next((a for a in serve_cfg.get("applications", []) if a.get("name") == app_name), None)
    if app is None:
        raise PromotionRefused(f"the RayService has no Serve application {app_name!r}")
    deps = app.setdefault("deployments", [])
    entry = next((d for d in deps if d.get("name") == DETECTOR), None)
    if entry is None:
        entry = {"name": DETECTOR}
        deps.append(entry)
    return app, entry


def rayservice_user_config(path: str, app_name: str) -> dict:
    return _detector_entry(_rayservice(path)[2], app_name)[1].get("user_config") or {}


def write_rayservice(path: str, app_name: str, user_config: dict) -> None:
    """Set the Detector's user_config in the manifest's serveConfigV2: applied, KubeRay updates the
    running cluster's Serve config in place and Serve reconfigures the replicas (no restart)."""
    header, doc, serve_cfg = _rayservice(path)
    _detector_entry(serve_cfg, app_name)[1]["user_config"] = user_config
    doc["spec"]["serveConfigV2"] = yaml.dump(serve_cfg, Dumper=_BlockDumper, sort_keys=False, width=120)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(header + yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=120))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- views


def listing(root: str, apps: list[str], dashboard: str, serve_app: str, warn=print) -> list[dict]:
    """One row per version: identity, recorded figures (the newest evaluation), serving where."""
    serving: dict[str, set] = {}
    for url in apps:
        try:
            for n, v in ServeApp(url, dashboard, serve_app).serving().items():
                serving.setdefault(f"{n}@{v}", set()).add(url)
        except (ApiError, AigdError, KeyError) as e:
            warn(f"{url}: cannot tell what it serves ({e})")
    if not registry.exists(root):
        raise registry.VersionError(f"no adapter registry at {root} (a training job creates it: run.export_dir)")
    rows = []
    for name in registry.names(root):
        for v in registry.versions(f"{root.rstrip('/')}/{name}"):
            m = registry.read_manifest(v)
            evals = registry.evaluations(v)
            last = max(evals.values(), key=lambda e: e["recorded_at"]) if evals else {"metrics": {}, "evalset": {}}
            fig = last["metrics"]
            rows.append({"name": name, "version": v.version, "created": m.get("created_at"),
                         "method": m.get("method"), "base": (m.get("base") or {}).get("fingerprint"),
                         "parent": m["adapter"].get("parent"), "evaluation_set": last["evalset"].get("id"),
                         "clean_auc": fig.get("clean.roc_auc"), "jpeg_q50_auc": fig.get("jpeg_q50.roc_auc"),
                         "coverage": fig.get("clean.coverage"), "serving": sorted(serving.get(str(v), ()))})
    return rows


SAMPLE = re.compile(r'^ray_aigd_shadow_(\w+?)(_total|_sum|_count)?\{([^}]*)\}\s+([0-9.eE+-]+)$')


def shadow_report(metrics_text: str) -> list[dict]:
    """Per (adapter, serving, candidate): images scored in shadow, agreement, label flips, mean
    |P(fake) difference|, skipped, from Prometheus text (Ray's metrics endpoint)."""
    out: dict[tuple, dict] = {}
    for line in metrics_text.splitlines():
        m = SAMPLE.match(line.strip())
        if not m:
            continue
        metric, suffix, labels, value = m.group(1), m.group(2) or "", m.group(3), float(m.group(4))
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = (tags.get("adapter"), tags.get("serving"), tags.get("candidate"))
        row = out.setdefault(key, {"adapter": key[0], "serving": key[1], "candidate": key[2], "images": 0.0,
                                   "agreements": 0.0, "flips": {}, "abs_diff_sum": 0.0, "skipped": 0.0})
        if metric == "images":
            row["images"] += value
        elif metric == "agreements":
            row["agreements"] += value
        elif metric == "label_flips":
            flip = f"{tags.get('serving_label')}->{tags.get('candidate_label')}"
            row["flips"][flip] = row["flips"].get(flip, 0.0) + value
        elif metric == "p_fake_abs_diff" and suffix == "_sum":
            row["abs_diff_sum"] += value
        elif metric == "skipped":
            row["skipped"] += value
    rows = []
    for row in out.values():
        n = row["images"]
        rows.append({**row, "agreement": row["agreements"] / n if n else None,
                     "mean_abs_diff": row.pop("abs_diff_sum") / n if n else None})
    return [r for r in rows if r["candidate"] or r["skipped"]]
