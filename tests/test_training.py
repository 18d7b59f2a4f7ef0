"""Training: LoRA-only updates, the Ray Train recipes end to end, exact resume, worker restart."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aigd import train as T
from aigd.config import ImagePolicy, LoraConfig, ModelConfig, OptimConfig
from aigd.losses import binary_focal
from aigd.model import load_for_training
from aigd.prompt import Collate, encode, label_token_ids
from aigd.scoring import answer_logits, pair_logits

ROOT = Path(__file__).resolve().parents[1]


def test_lora_weights_change_and_base_weights_stay_bit_identical(tiny_model):
    import numpy as np
    from PIL import Image

    model, proc, _ = load_for_training(ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False,
                                                   gradient_checkpointing=False), LoraConfig(), torch.device("cpu"))
    base0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora0 and all("lora_" in n for n in lora0)
    assert any(".visual." in n for n in lora0) and any("language_model" in n for n in lora0)
    assert not any("merger" in n or "lm_head" in n for n in lora0)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(4)]
    rows = encode(proc, imgs, ImagePolicy(max_pixels=112 * 112))
    rows["label"] = [0, 1, 0, 1]
    batch = Collate.of(proc)(rows)
    opt, sched = T.make_optimizer(model, OptimConfig(lr=1e-3, warmup_ratio=0.0), 10)
    ids = label_token_ids(proc.tokenizer)
    for _ in range(3):
        loss = binary_focal(pair_logits(answer_logits(model, batch), ids), batch["label"])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, lora0[n]) or "lora_A" in n, n
        else:
            assert torch.equal(p, base0[n]), n
    assert sum(not torch.equal(p, lora0[n]) for n, p in model.named_parameters() if p.requires_grad) > len(lora0) // 2


def _args(tiny_model, demo_data, tmp, name, *extra, config="configs/demo_method1.yaml"):
    return ["--config", str(ROOT / config), f"model.name_or_path={tiny_model}", f"data.path={demo_data}",
            f"run.storage_path={tmp}/runs", f"run.name={name}", f"run.export_dir={tmp}/adapters/{name}",
            "optim.batch_size=8", "optim.log_every=5", "optim.eval_every=1000", "data.preserve_order=true",
            *extra]


def _latest(storage: Path) -> Path:
    ckpts = [p for p in storage.glob("checkpoint_*") if p.is_dir()]
    return max(ckpts, key=lambda p: json.loads((p / "loop_state.json").read_text())["global_step"])


ONE_WORKER = ("scaling.num_workers=1", "scaling.cpus_per_worker=1.0", "optim.epochs=2")


def test_resume_after_a_crash_gives_bit_identical_adapter(tiny_model, demo_data, tmp_path, ray_local):
    import train_method1

    out = train_method1.main(_args(tiny_model, demo_data, tmp_path, "straight", *ONE_WORKER))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "method1" and manifest["base_fingerprint"]
    assert manifest["calibration"]["temperature"] > 0 and (out / "adapter_model.safetensors").exists()
    straight = _latest(tmp_path / "runs" / "straight")
    history = json.loads((straight / "loop_state.json").read_text())["history"]
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]  # training loss falls
    steps = json.loads((straight / "loop_state.json").read_text())["global_step"] // 2
    # crash one step into epoch 2, with no retries: the run fails after its epoch-1 checkpoint
    with pytest.raises(Exception, match="injected failure"):
        train_method1.main(_args(tiny_model, demo_data, tmp_path, "resumed", *ONE_WORKER,
                                 f"optim.fail_at_step={steps + 1}", "run.max_failures=0"))
    # the same job name and storage path resumes from that checkpoint
    train_method1.main(_args(tiny_model, demo_data, tmp_path, "resumed", *ONE_WORKER))
    resumed = _latest(tmp_path / "runs" / "resumed")
    a, b = load_file(str(straight / "trainable.safetensors")), load_file(str(resumed / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight / "training_state.pt", weights_only=False)
    sb = torch.load(resumed / "training_state.pt", weights_only=False)
    assert sa["scheduler"] == sb["scheduler"]


def test_two_workers_restart_from_checkpoint_after_worker_failure(tiny_model, demo_data, tmp_path, ray_local):
    import train_method2

    out = train_method2.main(_args(tiny_model, demo_data, tmp_path, "faulty", "optim.epochs=2",
                                   "optim.eval_every=5", "optim.fail_at_step=8", "run.max_failures=1",
                                   config="configs/demo_method2.yaml"))
    last = json.loads((_latest(tmp_path / "runs" / "faulty") / "loop_state.json").read_text())
    plan_steps = last["global_step"]
    assert last["epoch"] == 2 and plan_steps > 8  # finished both epochs after the restart
    steps_seen = [h["step"] for h in last["history"]]
    assert steps_seen == sorted(set(steps_seen))  # restored step counter: no step trained twice
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "method2" and manifest["training"]["loss"] == "focal"


def test_manifest_mismatch_is_refused(tmp_path):
    from aigd.errors import ManifestMismatch
    from aigd.manifest import check_compatible, read_manifest

    with pytest.raises(ManifestMismatch, match="safetensors"):
        read_manifest(tmp_path)
    manifest = {"format_version": 1, "base_fingerprint": "abc", "base_model": "x",
                "image_policy": {"prompt": "Real/Fake?", "prompt_version": "v1", "max_pixels": 100, "min_pixels": 1}}
    policy = ImagePolicy(max_pixels=100, min_pixels=1)
    check_compatible(manifest, "abc", policy)
    with pytest.raises(ManifestMismatch, match="fingerprint"):
        check_compatible(manifest, "other", policy)
    with pytest.raises(ManifestMismatch, match="max_pixels"):
        check_compatible(manifest, "abc", ImagePolicy(max_pixels=200, min_pixels=1))
