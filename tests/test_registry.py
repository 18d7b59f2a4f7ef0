"""The adapter registry and the promotion gate: immutable versions on local paths and URIs,
refusals of incomplete, corrupt and old-layout folders, the gate's table, the shadow report."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save

from aigd import config as C
from aigd import registry
from aigd.manifest import FORMAT_VERSION, read_manifest, upgrade


def _files(seed: int = 0) -> dict[str, bytes]:
    gen = torch.Generator().manual_seed(seed)
    return {registry.WEIGHTS: save({"lora_A": torch.randn(4, 8, generator=gen)}),
            registry.ADAPTER_CONFIG: json.dumps({"r": 4}).encode()}


def _manifest(t: float = 1.0) -> dict:
    return {"format_version": FORMAT_VERSION, "method": "method2", "calibration": {"temperature": t}}


def test_versions_are_new_folders_and_never_rewritten(tmp_path):
    entry = str(tmp_path / "method2")
    v1 = registry.publish(entry, _files(0), _manifest())
    before = {p.name: p.read_bytes() for p in (tmp_path / "method2" / v1.version).iterdir()}
    v2 = registry.publish(entry, _files(1), _manifest())
    assert registry.VERSION.fullmatch(v1.version) and v1 != v2 and v1.name == "method2"
    assert {p.name: p.read_bytes() for p in (tmp_path / "method2" / v1.version).iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "method2").iterdir()) == sorted([v1.version, v2.version])  # no temp left
    assert registry.resolve(entry) == v2 and registry.resolve(v1.uri) == v1  # an entry means its newest version
    m = registry.verify(v1)
    assert m["adapter"] == {"name": "method2", "version": v1.version, "parent": None,
                            "sha256": {n: registry._sha256(b) for n, b in _files(0).items()}}
    assert read_manifest(entry)["adapter"]["version"] == v2.version


def test_a_uri_registry_publishes_manifest_last_and_is_copied_down_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGD_HOME", str(tmp_path / "home"))
    entry = f"file://{tmp_path}/bucket/adapters/method1"
    v = registry.publish(entry, _files(2), _manifest())
    assert registry.is_remote(v.uri) and registry.resolve(entry) == v
    local = registry.local_copy(v)
    assert local == tmp_path / "home" / "cache" / "adapters" / "method1" / v.version
    assert (local / registry.WEIGHTS).read_bytes() == _files(2)[registry.WEIGHTS]
    (local / registry.WEIGHTS).write_bytes(b"damaged")  # a damaged cached copy is fetched again
    assert (registry.local_copy(v) / registry.WEIGHTS).read_bytes() == _files(2)[registry.WEIGHTS]
    assert [p.name for p in local.parent.iterdir()] == [v.version]  # no temporary copy left
    # an interrupted publish: weights written, no manifest yet
    half = tmp_path / "bucket" / "adapters" / "method1" / "20991231T000000000Z-00000000"
    half.mkdir()
    (half / registry.WEIGHTS).write_bytes(_files(3)[registry.WEIGHTS])
    assert registry.versions(entry) == [v]  # never the newest while incomplete
    with pytest.raises(registry.VersionError, match="incomplete version"):
        registry.verify(registry.resolve(f"{entry}/{half.name}"))


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its recorded sha256"),
    ("truncate", "does not match its recorded sha256"),
    ("delete", "is missing"),
    ("manifest", "not valid JSON"),
])
def test_damaged_versions_are_refused_before_loading(tmp_path, damage, message):
    v = registry.publish(str(tmp_path / "m"), _files(0), _manifest())
    weights = tmp_path / "m" / v.version / registry.WEIGHTS
    data = weights.read_bytes()
    if damage == "flip":
        weights.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    elif damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        weights.unlink()
    else:
        (tmp_path / "m" / v.version / registry.MANIFEST).write_text("{half")
    with pytest.raises(registry.VersionError, match=message):
        registry.verify(v)


def test_a_file_that_is_not_safetensors_is_refused_even_with_a_matching_hash(tmp_path):
    v = registry.publish(str(tmp_path / "m"), {**_files(0), registry.WEIGHTS: b"\x00" * 64}, _manifest())
    with pytest.raises(registry.VersionError, match="safetensors"):
        registry.verify(v)


def test_the_old_layout_is_refused_with_the_migration_and_migrates(tmp_path):
    old = tmp_path / "adapters" / "method2"
    old.mkdir(parents=True)
    for n, b in _files(0).items():
        (old / n).write_bytes(b)
    (old / registry.MANIFEST).write_text(json.dumps({**_manifest(), "format_version": 2}))
    with pytest.raises(registry.VersionError, match=f"aigd adapters migrate {old}"):
        read_manifest(old)
    v = registry.migrate(str(old), upgrade)
    assert registry.resolve(str(old)) == v and read_manifest(old)["format_version"] == FORMAT_VERSION
    assert sorted(p.name for p in (old / "_unversioned").iterdir()) == sorted([*registry.FILES, registry.MANIFEST])


def test_evaluations_and_promotions_are_sidecars(tmp_path):
    v = registry.publish(str(tmp_path / "m"), _files(0), _manifest())
    registry.record_evaluation(v, {"id": "test-abc"}, {"clean.roc_auc": 0.9}, "r.html")
    registry.record_promotion(v.entry, "http://app", None, v.version, "promote")
    assert registry.evaluations(v)["test-abc"]["metrics"] == {"clean.roc_auc": 0.9}
    assert [p["to"] for p in registry.promotions(v.entry)] == [v.version]
    assert registry.versions(v.entry) == [v] and registry.names(str(tmp_path)) == ["m"]
    registry.verify(v)  # the version folder itself is untouched


def test_the_gate_checks_floors_and_regressions_in_both_directions():
    from aigd.lifecycle import gate, gate_table

    cfg = C.from_dict(C.GateConfig, {"floors": {"clean.roc_auc": 0.9}, "compare": ["clean.roc_auc", "clean.ece"],
                                     "max_regression": 0.01})
    serving = {"clean.roc_auc": 0.95, "clean.ece": 0.05}
    ok = gate({"clean.roc_auc": 0.945, "clean.ece": 0.055}, serving, cfg)
    assert all(r.ok for r in ok)
    bad = gate({"clean.roc_auc": 0.93, "clean.ece": 0.08}, serving, cfg)
    assert [r.ok for r in bad] == [False, False] and "0.0200 worse" in bad[0].why and "0.0300 worse" in bad[1].why
    low = gate({"clean.roc_auc": 0.85}, None, cfg)
    assert "below the floor 0.9" in low[0].why and low[1].why == "not measured"
    table = gate_table(bad, "m@new", "m@old (serving)")
    assert "0.9300" in table and "0.9500" in table and "m@old (serving)" in table
    with pytest.raises(C.ConfigError, match="perturbation"):
        C.from_dict(C.GateConfig, {"floors": {"auc": 0.9}})


def test_a_promotion_needs_both_versions_evaluated_on_one_set(tmp_path):
    from aigd.lifecycle import PromotionRefused, common_evaluation

    a = registry.publish(str(tmp_path / "m"), _files(0), _manifest())
    b = registry.publish(str(tmp_path / "m"), _files(1), _manifest())
    registry.record_evaluation(a, {"id": "test-1"}, {"clean.roc_auc": 0.9}, "")
    registry.record_evaluation(b, {"id": "test-2"}, {"clean.roc_auc": 0.99}, "")
    with pytest.raises(PromotionRefused, match="same evaluation set"):
        common_evaluation(b, a, None)
    registry.record_evaluation(b, {"id": "test-1"}, {"clean.roc_auc": 0.95}, "")
    evalset, cand, serv = common_evaluation(b, a, None)
    assert evalset == "test-1" and cand["metrics"]["clean.roc_auc"] == 0.95 and serv["metrics"]["clean.roc_auc"] == 0.9


def test_one_promotion_at_a_time_and_a_lock_left_behind_holds_nothing(tmp_path, monkeypatch):
    from aigd.lifecycle import Lock, PromotionBusy

    monkeypatch.setenv("AIGD_HOME", str(tmp_path))
    with Lock("app"):
        with pytest.raises(PromotionBusy, match=f"pid {os.getpid()}"):
            with Lock("app"):
                pass
        with Lock("other app"):
            pass
    lock = Lock("app")
    lock.path.write_text("pid 4194303 since 00:00:00")  # the file of a holder that died: no flock on it
    with lock:
        assert lock.path.read_text().startswith(f"pid {os.getpid()} ")


def test_a_version_stamped_in_the_future_does_not_stall_publishing(tmp_path):
    entry = tmp_path / "m"
    future = registry.publish(str(entry), _files(0), _manifest())
    os.rename(entry / future.version, entry / "20991231T235959999Z-0000abcd")  # another machine's clock
    (entry / "20991231T235959999Z-0000abcd" / registry.MANIFEST).write_text(json.dumps(
        {**_manifest(), "adapter": {"version": "20991231T235959999Z-0000abcd"}}))
    v = registry.publish(str(entry), _files(1), _manifest())
    assert v.version.startswith("21000101T000000000Z-") and registry.resolve(str(entry)) == v


def test_the_shadow_report_reads_rays_prometheus_text():
    from aigd.lifecycle import shadow_report

    tags = 'adapter="method2",serving="A",candidate="B"'
    text = "\n".join([
        "# HELP ray_aigd_shadow_images_total images scored in shadow",
        f'ray_aigd_shadow_images_total{{{tags},Component="core_worker"}} 40.0',
        f'ray_aigd_shadow_agreements_total{{{tags}}} 36.0',
        f'ray_aigd_shadow_label_flips_total{{{tags},serving_label="real",candidate_label="fake"}} 3.0',
        f'ray_aigd_shadow_label_flips_total{{{tags},serving_label="fake",candidate_label="real"}} 1.0',
        f'ray_aigd_shadow_p_fake_abs_diff_sum{{{tags}}} 2.0',
        f'ray_aigd_shadow_p_fake_abs_diff_bucket{{{tags},le="0.1"}} 30.0',
        'ray_aigd_shadow_skipped_total{adapter="method2"} 5.0',
        'ray_aigd_requests_total{endpoint="detect"} 9.0'])
    rows = {(r["adapter"], r["candidate"]): r for r in shadow_report(text)}
    r = rows[("method2", "B")]
    assert r["images"] == 40 and r["agreement"] == 0.9 and r["mean_abs_diff"] == 0.05
    assert r["flips"] == {"real->fake": 3.0, "fake->real": 1.0} and rows[("method2", None)]["skipped"] == 5


def test_a_second_rollback_does_not_undo_the_first(tmp_path):
    """promote a->b, promote b->c, rollback c->b: the next rollback goes to a, not back to c."""
    from aigd.lifecycle import previous_version

    entry = str(tmp_path / "m")
    for serving, promoted, action in (("a", "b", "promote"), ("b", "c", "promote"), ("c", "b", "rollback")):
        registry.record_promotion(entry, "http://app", serving, promoted, action)
    assert previous_version(entry, "http://app", "b") == "a"
    assert previous_version(entry, "http://app", "c") == "b"
    assert previous_version(entry, "http://other", "b") is None
