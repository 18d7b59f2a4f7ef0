"""Adapter lifecycle against a real Serve app on the local Ray, deployed through the Serve REST API
as `serve deploy` does: promotion and rollback under load, refusals, concurrency, shadow scoring."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import ROOT, make_adapter
from helpers import documented_metrics, free_port, image_bytes, photo, serve_config

from aigd import config as C
from aigd import registry

pytestmark = pytest.mark.timeout(900)

EVALSET = {"id": "test-0123456789ab", "split": "test"}


@pytest.fixture(scope="module")
def versions(tiny_model, tmp_path_factory):
    """A registry: method1 with one version; method2 with old (serving), good and worse candidates,
    one trained for another image policy, and damaged ones."""
    root = tmp_path_factory.mktemp("registry") / "adapters"
    v = {"m1": make_adapter(tiny_model, root / "method1", seed=1, temperature=1.5, method="method1"),
         "old": make_adapter(tiny_model, root / "method2", seed=2, temperature=0.8, method="method2"),
         "new": make_adapter(tiny_model, root / "method2", seed=5, temperature=1.0, method="method2"),
         "worse": make_adapter(tiny_model, root / "method2", seed=6, temperature=1.0, method="method2"),
         "policy": make_adapter(tiny_model, root / "method2", seed=7, temperature=1.0, method="method2",
                                max_pixels=84 * 84),
         "corrupt": make_adapter(tiny_model, root / "method2", seed=8, temperature=1.0, method="method2")}
    v = {k: registry.resolve(str(p)) for k, p in v.items()}
    for key, auc in {"old": 0.97, "new": 0.98, "worse": 0.90, "policy": 0.99, "corrupt": 0.99}.items():
        registry.record_evaluation(v[key], EVALSET, {"clean.roc_auc": auc, "jpeg_q50.roc_auc": auc - 0.02}, "")
    weights = v["corrupt"].uri + "/" + registry.WEIGHTS
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[:-1] + bytes([data[-1] ^ 0xFF]))
    half = root / "method2" / "20991231T000000000Z-0000aaaa"  # a copy that stopped before its manifest
    half.mkdir()
    (half / registry.WEIGHTS).write_bytes(data)
    v["incomplete"] = registry.Version(str(root / "method2"), half.name)
    return root, v


@pytest.fixture(scope="module")
def app(ray_local, tiny_model, versions):
    """The app deployed declaratively (REST PUT), serving method2's old version."""
    from aigd.dev.load import deploy

    root, v = versions
    port = free_port()
    args = serve_config(tiny_model, {"method1": v["m1"].uri, "method2": v["old"].uri})
    dashboard = os.environ["AIGD_DASHBOARD"]
    url = deploy(dashboard, port, args, timeout_s=240)
    cfg = C.from_dict(C.PromoteConfig, {"registry": str(root), "dashboard": dashboard, "timeout_s": 120.0,
                                        "gate": {"floors": {"clean.roc_auc": 0.95}, "max_regression": 0.005}})
    yield url, cfg
    from ray import serve

    serve.shutdown()


def _serving(url: str) -> dict:
    return {n: a["version"] for n, a in requests.get(f"{url}/v1/models", timeout=30).json()["adapters"].items()}


def test_promotion_and_rollback_under_load_lose_no_request_and_never_mix_versions(app, versions):
    from aigd.dev.load import ClosedLoop, switch_order_ok
    from aigd.lifecycle import promote, rollback

    url, cfg = app
    _, v = versions
    old, new = v["old"].version, v["new"].version
    from aigd.lifecycle import ServeApp

    target = ServeApp(url, cfg.dashboard, cfg.serve_app)
    replicas = {(r["replica_id"], r["pid"]) for r in target.detector()["replicas"]}
    with ClosedLoop(f"{url}/v1/detect?adapter=method2", image_bytes(photo(1)), clients=8) as load:
        time.sleep(3)
        t_promote = time.monotonic()
        logged = []
        rows = promote(cfg, "method2", new, url, log=logged.append)
        t_promoted = time.monotonic()
        time.sleep(3)
        t_rollback = time.monotonic()
        assert rollback(cfg, "method2", url, log=lambda *_: None) == old
        t_rolled = time.monotonic()
        time.sleep(2)
    answers = load.answers
    assert not [m for m in logged if m.startswith("warning")]  # the config names the Detector
    assert len(answers) > 50 and [a for a in answers if a.status != 200] == []
    assert all(r.ok for r in rows) and {r.figure for r in rows} == {"clean.roc_auc", "jpeg_q50.roc_auc"}
    before, during, after = (load.between(0, t_promote), load.between(t_promote, t_rollback),
                             load.between(t_promoted, t_rollback))
    assert {a.version for a in before} == {old} and {a.version for a in after} == {new}
    assert switch_order_ok(during, old, new)
    assert switch_order_ok(load.between(t_rollback, float("inf")), new, old)
    assert {a.version for a in load.between(t_rolled, float("inf"))} == {old}
    history = registry.promotions(v["old"].entry)
    assert [(p["from"], p["to"], p["action"]) for p in history[-2:]] == [(old, new, "promote"), (new, old, "rollback")]
    assert _serving(url) == {"method1": v["m1"].version, "method2": old}
    assert {(r["replica_id"], r["pid"]) for r in target.detector()["replicas"]} == replicas  # in place: no restart


@pytest.mark.parametrize("candidate, error", [
    ("corrupt", "does not match its recorded sha256"),
    ("incomplete", "incomplete version"),
    ("policy", "image_policy.max_pixels"),
    ("worse", "does not pass the gate"),
    ("missing", "no such version"),
])
def test_bad_candidates_are_refused_before_any_replica_switches(app, versions, candidate, error):
    from aigd.lifecycle import promote

    url, cfg = app
    _, v = versions
    version = v[candidate].version if candidate in v else "20990101T000000000Z-deadbeef"
    logged = []
    with pytest.raises(Exception, match=error):
        promote(cfg, "method2", version, url, log=logged.append)
    if candidate == "worse":  # the refusal shows the gate side by side
        assert "0.9000" in logged[0] and "0.9700" in logged[0] and "(serving)" in logged[0]
    assert _serving(url)["method2"] == v["old"].version


def test_a_version_a_replica_cannot_load_is_undone_and_the_app_keeps_serving(app, versions):
    """Past the driver's checks (a version deleted after them): the replica refuses, the switch is undone."""
    from aigd.lifecycle import PromotionRefused, ServeApp, switch

    url, cfg = app
    _, v = versions
    target = ServeApp(url, cfg.dashboard, cfg.serve_app)
    before = target.user_config()
    uc = {"versions": {"method1": v["m1"].version, "method2": "20990101T000000000Z-0badf00d"}}
    with pytest.raises(PromotionRefused, match="refused"):
        switch(cfg, target, "method2", uc, "20990101T000000000Z-0badf00d", "adapters")
    assert target.user_config() in (before, {"versions": _serving(url), "shadow": {}})
    assert _serving(url)["method2"] == v["old"].version
    r = requests.post(f"{url}/v1/detect?adapter=method2", files={"image": ("x.png", image_bytes(photo(2)))}, timeout=60)
    assert r.status_code == 200 and r.json()["model"]["version"] == v["old"].version


def test_a_malformed_user_config_is_refused_by_the_replica_which_keeps_serving(app, versions):
    from aigd.lifecycle import ServeApp

    url, cfg = app
    _, v = versions
    target = ServeApp(url, cfg.dashboard, cfg.serve_app)
    before = target.user_config() or {"versions": _serving(url), "shadow": {}}
    target.set_user_config({"versions": ["not", "a", "mapping"], "typo": 1})
    try:
        deadline, refused = time.monotonic() + 60, {}
        while time.monotonic() < deadline and "user_config" not in refused:
            refused = requests.get(f"{url}/v1/models", timeout=30).json()["refused_versions"]
            time.sleep(0.5)
        assert "unknown key" in refused["user_config"]["error"]
        r = requests.post(f"{url}/v1/detect?adapter=method2", files={"image": ("x.png", image_bytes(photo(3)))},
                          timeout=60)
        assert r.status_code == 200 and r.json()["model"]["version"] == v["old"].version
    finally:
        target.set_user_config(before)


def test_two_promotions_at_once_one_wins_the_other_is_told(app, versions):
    from aigd.lifecycle import PromotionBusy, promote, rollback

    url, cfg = app
    _, v = versions
    outcome = []

    def attempt():
        try:
            promote(cfg, "method2", v["new"].version, url, log=lambda *_: None)
            outcome.append("promoted")
        except PromotionBusy as e:
            outcome.append(f"busy: {e}")
        except Exception as e:  # the loser may also find the version already serving
            outcome.append(f"refused: {e}")

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.split(":")[0] for o in outcome) in (["busy", "promoted"], ["promoted", "refused"]), outcome
    assert _serving(url)["method2"] == v["new"].version
    rollback(cfg, "method2", url, log=lambda *_: None)
    assert _serving(url)["method2"] == v["old"].version


def test_shadow_scores_a_candidate_without_changing_answers_and_reports_it(app, versions):
    from aigd.lifecycle import set_shadow, shadow_report

    url, cfg = app
    _, v = versions
    images = [image_bytes(photo(s)) for s in range(6)]

    def answers():
        out = []
        for data in images:
            r = requests.post(f"{url}/v1/detect?adapter=method2", files={"image": ("x.png", data)}, timeout=60)
            out.append((r.status_code, r.json()["model"]["version"], r.json()["p_fake"]))
        return out

    plain = answers()
    set_shadow(cfg, "method2", v["new"].version, 1.0, url, log=lambda *_: None)
    assert requests.get(f"{url}/v1/models", timeout=30).json()["shadows"] == {"method2": v["new"].version}
    assert answers() == plain  # the serving version answers, unchanged
    rows, skipped, deadline = [], 0, time.monotonic() + 60
    while time.monotonic() < deadline:  # Ray exports metrics every few seconds
        report = shadow_report(requests.get(os.environ["AIGD_TEST_METRICS"], timeout=30).text)
        rows = [r for r in report if r["candidate"] == v["new"].version]
        skipped = sum(r["skipped"] for r in report if r["candidate"] is None)
        if rows and rows[0]["images"] + skipped >= len(images):  # each sampled image: scored, or skipped (busy)
            break
        time.sleep(2)
    assert rows and rows[0]["images"] >= 1 and rows[0]["images"] + skipped == len(images)
    assert rows[0]["serving"] == v["old"].version and 0 <= rows[0]["agreement"] <= 1
    assert rows[0]["mean_abs_diff"] > 0  # another adapter: other probabilities
    # every shadow metric the docs name is exported, under that name, once its event happened
    text = requests.get(os.environ["AIGD_TEST_METRICS"], timeout=30).text
    happened = {"ray_aigd_shadow_label_flips_total": rows[0]["agreement"] < 1,
                "ray_aigd_shadow_agreements_total": rows[0]["agreement"] > 0,
                "ray_aigd_shadow_skipped_total": skipped > 0}
    names = {n for n in documented_metrics() if n.startswith("ray_aigd_shadow")}
    assert len(names) == 5
    assert not [n for n in names if happened.get(n, True) and not re.search(rf"^{n}(_bucket)?{{", text, re.M)]
    set_shadow(cfg, "method2", None, 0.0, url, log=lambda *_: None)
    assert requests.get(f"{url}/v1/models", timeout=30).json()["shadows"] == {}


def test_the_cli_lists_versions_with_figures_and_what_the_app_serves(app, versions):
    url, cfg = app
    root, v = versions
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    out = subprocess.run([sys.executable, "-m", "aigd.cli", "adapters", "list", "--root", str(root), "--app", url,
                          "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {(r["name"], r["version"]): r for r in json.loads(out.stdout)}
    assert rows[("method2", v["old"].version)]["serving"] == [url]
    assert rows[("method2", v["new"].version)]["serving"] == [] and rows[("method2", v["new"].version)]["clean_auc"] == 0.98
    refused = subprocess.run([sys.executable, "-m", "aigd.cli", "promote", "method2", v["worse"].version, "--app", url,
                              f"registry={root}", "gate.floors={clean.roc_auc: 0.95}"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "promotion_refused" in refused.stderr and "(serving)" in refused.stdout
    unknown = subprocess.run([sys.executable, "-m", "aigd.cli", "promote", "nosuch", v["new"].version, "--app", url,
                              f"registry={root}"], capture_output=True, text=True, env=env, timeout=120)
    assert unknown.returncode == 2 and "serves no adapter 'nosuch'" in unknown.stderr
