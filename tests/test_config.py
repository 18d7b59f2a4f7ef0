from pathlib import Path

import pytest

from aigd import config as C

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_is_an_error_naming_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(C.ConfigError, match=r"optim\.lrr"):
        C.load(C.TrainJobConfig, p)


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  epochs: two\n")
    with pytest.raises(C.ConfigError, match=r"optim\.epochs.*int"):
        C.load(C.TrainJobConfig, p)
    with pytest.raises(C.ConfigError, match=r"model\.backend"):
        C.load(C.TrainJobConfig, None, ["model.backend=tensorflow"])


def test_dotted_overrides_and_env_expansion(monkeypatch):
    monkeypatch.setenv("AIGD_HOME", "/data/x")
    cfg = C.load(C.TrainJobConfig, ROOT / "configs/method2.yaml", ["optim.lr=1e-4", "augment.jpeg_quality=[60, 90]"],
                 base=_recipe("method2").PRESET)
    assert cfg.optim.lr == 1e-4 and cfg.augment.jpeg_quality == (60, 90)
    assert cfg.run.export_dir == "/data/x/adapters/method2"
    with pytest.raises(C.ConfigError, match="a.b=value"):
        C.load(C.TrainJobConfig, None, ["optim.lr"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#")
    header = "\n".join(l for l in path.read_text().splitlines() if l.startswith("#"))
    if path.stem.startswith("serve"):
        _check_serve_config(path)
        assert "serve " in header
        return
    cls = {"demo_data": C.DemoDataConfig, "promote_demo": C.PromoteConfig}.get(path.stem)
    if cls is None and path.stem.startswith("eval"):
        cls = C.EvalConfig
    cls = cls or C.TrainJobConfig
    if cls is C.TrainJobConfig:
        recipe = "method2" if "method2" in path.stem else "method1"
        assert f"jobs/train_{recipe}.py" in header
        C.load(cls, path, base=_recipe(recipe).PRESET)
    else:
        C.load(cls, path)
    assert ("jobs/" in header or "serve " in header or "aigd " in header)


@pytest.mark.parametrize("method", ["method1", "method2"])
def test_a_methods_preset_is_stated_once_in_its_recipe(method):
    """The YAMLs set what differs for their setting; loss, schedule and the rest come from PRESET."""
    import yaml

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    preset = dict(leaves(_recipe(method).PRESET))
    for path in (ROOT / "configs").glob(f"*{method}.yaml"):
        restated = {k for k, v in leaves(yaml.safe_load(path.read_text())) if preset.get(k, object()) == v}
        assert not restated, f"{path.name} restates the preset's {sorted(restated)}"
    cfg = C.load(C.TrainJobConfig, ROOT / f"configs/{method}.yaml", base=_recipe(method).PRESET)
    want = {"method1": ("ce", "linear", 1, False), "method2": ("focal", "cosine", 2, True)}[method]
    assert (cfg.optim.loss, cfg.optim.scheduler, cfg.optim.epochs, cfg.augment.enabled) == want


def test_rules_across_fields_are_checked_when_a_config_loads():
    with pytest.raises(C.ConfigError, match="cache_preprocessed"):
        C.load(C.TrainJobConfig, None, ["data.cache_preprocessed=true", "augment.enabled=true"])
    with pytest.raises(C.ConfigError, match="name at least one"):
        C.from_dict(C.ServeConfig, {})
    with pytest.raises(C.ConfigError, match=r"ensemble.members \['c'\]"):
        C.from_dict(C.ServeConfig, {"adapters": {"a": "x"}, "ensemble": {"members": ["a", "c"]}})
    with pytest.raises(C.ConfigError, match="blur_3"):
        C.from_dict(C.EvalConfig, {"adapters": {"a": "x"}, "perturbations": ["clean", "blur_3"]})
    with pytest.raises(C.ConfigError, match="must include clean"):
        C.from_dict(C.EvalConfig, {"adapters": {"a": "x"}, "perturbations": ["jpeg_q50"]})


def _recipe(name: str):
    import importlib

    return importlib.import_module(f"train_{name}")


def _check_serve_config(path):
    """A Serve config file whose application args are a valid ServeConfig."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)
    for app in raw["applications"]:
        assert app["import_path"] == "serve.app:build_app"
        cfg = C.from_dict(C.ServeConfig, app["args"])
        assert set(cfg.adapters) == {"method1", "method2"}


def test_seed_hyperparameters_are_the_defaults_of_the_real_configs():
    m1 = C.load(C.TrainJobConfig, ROOT / "configs/method1.yaml", base=_recipe("method1").PRESET)
    m2 = C.load(C.TrainJobConfig, ROOT / "configs/method2.yaml", base=_recipe("method2").PRESET)
    assert (m1.optim.loss, m1.optim.lr, m1.optim.scheduler, m1.optim.epochs) == ("ce", 1e-4, "linear", 1)
    assert (m2.optim.loss, m2.optim.lr, m2.optim.scheduler, m2.optim.epochs) == ("focal", 5e-5, "cosine", 2)
    assert (m2.optim.focal_alpha, m2.optim.focal_gamma) == (0.75, 2.0)
    for m in (m1, m2):
        assert (m.lora.r, m.lora.alpha, m.lora.dropout) == (16, 16, 0.0)
        assert m.optim.batch_size * m.optim.grad_accum * m.scaling.num_workers == 40
        assert m.model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct" and m.data.path == "saberzl/SID_Set"
    assert m2.augment.crop_size == 512 and m2.augment.jpeg_quality == (50, 95)
    assert not m1.augment.enabled and m2.augment.enabled


def test_a_recipe_preset_says_what_the_method_is_and_a_config_may_override_it(tmp_path):
    (tmp_path / "c.yaml").write_text("optim: {lr: 0.001}\n")
    m2 = C.load(C.TrainJobConfig, tmp_path / "c.yaml", ["optim.epochs=3"], base=_recipe("method2").PRESET)
    assert (m2.optim.loss, m2.optim.scheduler, m2.augment.enabled) == ("focal", "cosine", True)
    assert (m2.optim.lr, m2.optim.epochs) == (0.001, 3)


def test_nested_env_defaults(monkeypatch):
    monkeypatch.delenv("AIGD_STORAGE", raising=False)
    monkeypatch.setenv("AIGD_HOME", "/h")
    assert C.load(C.TrainJobConfig).run.storage_path == "/h/runs"
    monkeypatch.setenv("AIGD_STORAGE", "s3://bucket/runs")
    assert C.load(C.TrainJobConfig).run.storage_path == "s3://bucket/runs"


def test_the_configuration_reference_is_generated_from_the_dataclasses():
    from aigd.config_reference import missing, render

    text = render()
    assert (ROOT / "docs" / "config.md").read_text() == text, \
        "docs/config.md is stale: .venv/bin/python -m aigd.config_reference > docs/config.md"
    gaps = missing()
    assert not gaps, f"{len(gaps)} keys without a meaning (a # comment on their field in aigd/config.py): {gaps}"
    for key in ("`optim.focal_alpha`", "`request.body_timeout_s`", "`auth.keys_file`", "`limits.max_jpeg_scans`",
                "`perturbations`", "`rows_per_class`"):
        assert key in text, key


def test_the_demo_configs_split_the_photos_as_the_demo_data_does():
    """The generators train on the demo data's train photos and the samples come from its test photos:
    a job config with another split would train or test on the wrong ones."""
    demo = C.load(C.DemoDataConfig, ROOT / "configs/demo_data.yaml")
    for name, cls in (("demo_method1", C.TrainJobConfig), ("demo_method2", C.TrainJobConfig),
                      ("eval_demo", C.EvalConfig)):
        base = _recipe(name.split("_")[1]).PRESET if cls is C.TrainJobConfig else None
        data = C.load(cls, ROOT / f"configs/{name}.yaml", base=base).data
        assert (data.test_fraction, data.val_fraction, data.split_salt, data.split_group_sep) == (
            demo.test_fraction, C.DataConfig().val_fraction, C.DataConfig().split_salt, "/"), name
