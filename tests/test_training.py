"""Training: LoRA-only updates, the shared loop end to end through both recipes (exact resume with
cross-entropy, worker restart with focal loss), and the rules the GPU cluster path depends on."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aigd import checkpoint as K
from aigd import config as C
from aigd import loop as L
from aigd import train as T
from aigd import validation as V
from aigd.batching import collate, encode, pixel_affine
from aigd.config import ImagePolicy, LoraConfig, ModelConfig, OptimConfig
from aigd.dev.faults import FailAtStep
from aigd.losses import binary_focal
from aigd.model import load_for_training
from aigd.forward import answer_logits, pair_logits
from aigd.prompt import label_token_ids
from conftest import corrupt_by_split
from helpers import pids_by_cmdline

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("patch_embed", [False, True], ids=["seed-targets", "with-patch-embed"])
def test_lora_weights_change_and_base_weights_stay_bit_identical(tiny_model, patch_embed):
    import numpy as np

    model, proc, base = load_for_training(ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False,
                                                      gradient_checkpointing=False), LoraConfig(patch_embed=patch_embed),
                                          torch.device("cpu"))
    assert base["backend"] == "hf" and base["quantization"] is None and base["layout"]
    base0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora0 and all("lora_" in n for n in lora0)
    assert any(".visual." in n for n in lora0) and any("language_model" in n for n in lora0)
    assert not any("merger" in n or "lm_head" in n for n in lora0)
    assert any("patch_embed" in n for n in lora0) == patch_embed
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(4)]
    rows = encode(proc, imgs, ImagePolicy(max_pixels=112 * 112))
    rows["label"] = [0, 1, 0, 1]
    batch = collate(rows, proc.tokenizer.pad_token_id, pixel_affine(proc))
    opt, sched = L.make_optimizer(model, OptimConfig(lr=1e-3, warmup_ratio=0.0), 10)
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
            "optim.batch_size=8", "optim.log_every=5", "optim.eval_every_samples=100000", "data.preserve_order=true",
            "data.test_fraction=0.15",  # the small test set's split (DataConfig's), which its step counts assume
            *extra]


def _latest(storage: Path) -> Path:
    ckpts = [p for p in storage.glob("checkpoint_*") if p.is_dir()]
    return max(ckpts, key=lambda p: (json.loads((p / "loop_state.json").read_text())["global_step"],
                                     (p / "adapter").exists()))


ONE_WORKER = ("scaling.num_workers=1", "scaling.cpus_per_worker=1.0", "optim.epochs=2")


def test_a_training_job_reads_the_metadata_once(tiny_model, demo_data, tmp_path, ray_local, monkeypatch):
    """Planning (counts, each epoch's balance, the val subset) and building every dataset of a
    2-epoch Method 2 job open the source's metadata once; the datasets come from the plan's catalog."""
    import pyarrow.parquet as pq

    import train_method2
    from aigd import sources

    reads = []
    real = pq.ParquetDataset
    monkeypatch.setattr(sources.pq, "ParquetDataset", lambda *a, **k: reads.append(1) or real(*a, **k))
    cfg = T.load_config("test", train_method2.PRESET,
                        _args(tiny_model, demo_data, tmp_path, "reads", "optim.epochs=2", "optim.eval_samples=20",
                              config="configs/demo_method2.yaml"))
    cfg, plan = T.plan_data(cfg)
    datasets = T.make_datasets(cfg, plan)
    assert sorted(datasets) == ["train_0", "train_1", "val", "val_full"] and len(reads) == 1
    assert plan.balance[0] != plan.balance[1] and plan.val_subset is not None


@pytest.fixture(scope="module")
def straight(tiny_model, demo_data, tmp_path_factory, ray_local) -> tuple[Path, Path]:
    """An uninterrupted 1-worker Method 1 run: (exported adapter, its final checkpoint)."""
    import train_method1

    tmp = tmp_path_factory.mktemp("straight")
    out = train_method1.main(_args(tiny_model, demo_data, tmp, "straight", *ONE_WORKER))
    return out, _latest(tmp / "runs" / "straight")


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    bx, by = load_file(str(a / "best.safetensors")), load_file(str(b / "best.safetensors"))
    return (x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
            and all(torch.equal(bx[k], by[k]) for k in bx))


def test_resume_after_a_crash_gives_bit_identical_adapter(tiny_model, demo_data, tmp_path, straight):
    import train_method1

    out, straight = straight
    manifest = json.loads((Path(out.uri) / "manifest.json").read_text())
    assert manifest["method"] == "method1" and manifest["base"]["fingerprint"] and manifest["training"]["loss"] == "ce"
    assert manifest["calibration"]["temperature"] > 0 and (Path(out.uri) / "adapter_model.safetensors").exists()
    state = json.loads((straight / "loop_state.json").read_text())
    history = state["history"]
    assert state["finished"] and (straight / "adapter").exists()  # the final checkpoint holds the export
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]  # training loss falls
    # calibrated on the WHOLE val split, with the best weights
    corrupt = corrupt_by_split(demo_data)
    n_val = sum(manifest["data"]["class_counts"]["val"]) - len(corrupt["val"])
    assert manifest["calibration"]["n"] == manifest["val_metrics"]["n"] == n_val
    # ~2 % unreadable rows (truncated, garbage, empty, header and scan bombs): each skipped and counted
    # once per split it was read in (the train split is read once here, val in full at the end)
    assert manifest["data"]["skipped_unreadable"] == {s: len(ids) for s, ids in corrupt.items() if ids and s != "test"}
    steps = json.loads((straight / "loop_state.json").read_text())["global_step"] // 2
    # crash one step into epoch 2, with no retries: the run fails after its epoch-1 checkpoint
    with pytest.raises(Exception, match="injected failure"):
        train_method1.main(_args(tiny_model, demo_data, tmp_path, "resumed", *ONE_WORKER, "run.max_failures=0"),
                           hooks=[FailAtStep(steps + 1)])
    # the same job name and storage path resumes from that checkpoint
    train_method1.main(_args(tiny_model, demo_data, tmp_path, "resumed", *ONE_WORKER))
    resumed = _latest(tmp_path / "runs" / "resumed")
    assert _same_weights(straight, resumed)
    sa = torch.load(straight / "training_state.pt", weights_only=True)
    sb = torch.load(resumed / "training_state.pt", weights_only=True)
    assert sa["scheduler"] == sb["scheduler"]


def test_sigkill_of_a_train_worker_mid_epoch_restarts_from_the_checkpoint(tiny_model, demo_data, tmp_path,
                                                                          straight):
    """A real SIGKILL of the worker process as soon as epoch 1's checkpoint exists: Ray Train restarts
    the worker from it and the final weights equal the uninterrupted run's, bit for bit."""
    import os
    import signal
    import threading
    import time

    import train_method1

    runs, killed = tmp_path / "runs" / "killed", []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if any((c / K.COMPLETE).exists() for c in runs.glob("checkpoint_*")):
                time.sleep(1.0)  # let Ray finish copying and registering it; epoch 2 is under way
                for pid in pids_by_cmdline("RayTrainWorker"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = train_method1.main(_args(tiny_model, demo_data, tmp_path, "killed", *ONE_WORKER, "run.max_failures=1"))
    thread.join(timeout=1)
    assert killed, "no train worker was found to kill"
    final = _latest(runs)
    assert json.loads((final / "loop_state.json").read_text())["finished"]
    assert _same_weights(straight[1], final)
    assert (Path(out.uri) / "manifest.json").exists()


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tiny_model, demo_data, tmp_path,
                                                                               straight):
    """The worker is SIGKILLed with half of epoch 2's checkpoint written (in its local folder, before
    Ray Train copies and registers it): the restart resumes from the last registered, complete one
    (epoch 1's) and the result equals the straight run; a half-written folder is refused by name."""
    import train_method1

    steps = json.loads((straight[1] / "loop_state.json").read_text())["global_step"]
    train_method1.main(_args(tiny_model, demo_data, tmp_path, "torn", *ONE_WORKER, "run.max_failures=1"),
                       hooks=[FailAtStep(steps, "sigkill_in_checkpoint")])
    ckpts = sorted(p for p in (tmp_path / "runs" / "torn").glob("checkpoint_*") if p.is_dir())
    for c in ckpts:
        K.check_complete(c)  # raises on a half-written one
    assert _same_weights(straight[1], _latest(tmp_path / "runs" / "torn"))
    # and a half-written folder is refused with a clear error, never loaded
    torn = tmp_path / "half"
    torn.mkdir()
    (torn / "trainable.safetensors").write_bytes((straight[1] / "trainable.safetensors").read_bytes())
    with pytest.raises(K.IncompleteCheckpoint, match="mid-write"):
        K.check_complete(torn)
    (torn / K.COMPLETE).write_text((straight[1] / K.COMPLETE).read_text())
    with pytest.raises(K.IncompleteCheckpoint, match="missing or truncated"):
        K.check_complete(torn)


def test_two_workers_restart_from_checkpoint_after_worker_failure(tiny_model, demo_data, tmp_path, ray_local):
    import train_method2

    out = train_method2.main(_args(tiny_model, demo_data, tmp_path, "faulty", "optim.epochs=2",
                                   "optim.eval_every_samples=80", "run.max_failures=1",
                                   "optim.eval_samples=20", config="configs/demo_method2.yaml"),
                             hooks=[FailAtStep(8)])
    last = json.loads((_latest(tmp_path / "runs" / "faulty") / "loop_state.json").read_text())
    plan_steps = last["global_step"]
    assert last["epoch"] == 2 and plan_steps > 8  # finished both epochs after the restart
    steps_seen = [h["step"] for h in last["history"]]
    assert steps_seen == sorted(set(steps_seen))  # restored step counter: no step trained twice
    # evaluated every 80 samples (2 workers x batch 8 x 5 steps) on the fixed 20-image subset
    val_n = {h["val_n"] for h in last["history"]}
    assert steps_seen[:2] == [5, 10] and len(val_n) == 1 and 18 <= val_n.pop() <= 20  # (minus corrupt ones)
    manifest = json.loads((Path(out.uri) / "manifest.json").read_text())
    assert manifest["method"] == "method2" and manifest["training"]["loss"] == "focal"


def test_manifest_refuses_another_base_or_policy(tmp_path):
    from aigd.errors import ManifestMismatch
    from aigd.manifest import check_compatible, read_manifest

    with pytest.raises(ManifestMismatch, match="no published adapter version"):
        read_manifest(tmp_path)
    nf4 = {"quant_method": "bitsandbytes", "bnb_4bit_quant_type": "nf4", "llm_int8_skip_modules": ["lm_head"]}
    trained = {"checkpoint": "unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit", "revision": None, "backend": "unsloth",
               "fingerprint": "abc", "layout": "L1", "quantization": {**nf4, "llm_int8_skip_modules": ["merger"]}}
    manifest = {"base": trained, "image_policy": {"prompt": "Real/Fake?", "prompt_version": "v1", "max_pixels": 100,
                                                  "min_pixels": 1}}
    policy = ImagePolicy(max_pixels=100, min_pixels=1)
    check_compatible(manifest, {**trained, "backend": "hf"}, policy)  # same checkpoint through transformers
    plain_nf4 = {"checkpoint": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": None, "backend": "hf",
                 "fingerprint": "abc", "layout": "L2", "quantization": nf4}
    with pytest.raises(ManifestMismatch) as e:
        check_compatible(manifest, plain_nf4, policy)
    for both in ("unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit", "Qwen/Qwen2.5-VL-7B-Instruct", "quantized"):
        assert both in str(e.value)
    with pytest.raises(ManifestMismatch, match="fingerprint"):
        check_compatible(manifest, {**trained, "fingerprint": "other"}, policy)
    with pytest.raises(ManifestMismatch, match="max_pixels"):
        check_compatible(manifest, trained, ImagePolicy(max_pixels=200, min_pixels=1))


# --------------------------------------------------------------------------- rules of the GPU cluster path


def test_collectives_get_cpu_tensors_and_gpu_runs_add_gloo_beside_nccl():
    """NCCL refuses CPU tensors; the loop's own collectives (validation gather, fed counts) use CPU
    tensors, so a GPU process group must carry gloo for them."""
    assert T.dist_backend(C.ScalingConfig(use_gpu=True)) == "cpu:gloo,cuda:nccl"
    assert T.dist_backend(C.ScalingConfig(use_gpu=True, gpus_per_worker=2)) == "cpu:gloo,cuda:nccl"
    assert T.dist_backend(C.ScalingConfig(use_gpu=False)) == "gloo"
    # ranks sharing one GPU: NCCL refuses two ranks on one device
    assert T.dist_backend(C.ScalingConfig(use_gpu=True, gpus_per_worker=0.5)) == "gloo"
    assert T.dist_backend(C.ScalingConfig(use_gpu=True, backend="gloo")) == "gloo"
    with pytest.raises(C.ConfigError, match="not one of"):
        C.load(C.TrainJobConfig, None, ["scaling.backend=nccl"])


def test_gpu_precision_is_one_rule_for_both_backends_with_loss_scaling_for_fp16():
    """Autocast on CUDA whatever the backend (Unsloth's LoRA rewrite otherwise runs activations in
    fp32); fp16 (GPUs without bf16) scales the loss; CPU runs fp32 with neither."""
    import warnings

    from aigd.model import autocast, needs_loss_scaling, precision

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for dtype in ("bfloat16", "float16"):
        cfg = ModelConfig(dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CUDA is not available": the rule, not the kernel, is tested here
            amp = autocast(cfg, cuda)
        assert isinstance(amp, torch.autocast) and (amp.device, amp.fast_dtype) == ("cuda", getattr(torch, dtype))
        assert needs_loss_scaling(cfg, cuda) == (dtype == "float16")
        assert not needs_loss_scaling(cfg, cpu) and not isinstance(autocast(cfg, cpu), torch.autocast)
    assert precision(ModelConfig(dtype="float16"), cuda) == "float16 autocast + loss scaling"
    assert precision(ModelConfig(dtype="bfloat16"), cuda) == "bfloat16 autocast"
    assert precision(ModelConfig(), cpu) == "float32"


QWEN, UNSLOTH_4BIT = "Qwen/Qwen2.5-VL-7B-Instruct", "unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit"
# unsloth 2026.10.9's mapper.py entries for the 7B, as its build_mappers() derives them (keys lower-cased)
UNSLOTH_TABLES = {"FLOAT_TO_INT_MAPPER": {QWEN.lower(): UNSLOTH_4BIT},
                  "INT_TO_FLOAT_MAPPER": {UNSLOTH_4BIT.lower(): "unsloth/Qwen2.5-VL-7B-Instruct"},
                  "MAP_TO_UNSLOTH_16bit": {QWEN.lower(): "unsloth/Qwen2.5-VL-7B-Instruct"}}


def test_the_unsloth_backend_checks_the_repo_unsloth_loads_and_refuses_a_revision_it_would_drop(tmp_path,
                                                                                                  monkeypatch):
    from aigd import model as M
    from aigd.errors import BackendUnavailable

    assert M.unsloth_checkpoint(QWEN, True, UNSLOTH_TABLES) == UNSLOTH_4BIT
    assert M.unsloth_checkpoint(UNSLOTH_4BIT, True, UNSLOTH_TABLES) == UNSLOTH_4BIT
    assert M.unsloth_checkpoint(QWEN, False, UNSLOTH_TABLES) == "unsloth/Qwen2.5-VL-7B-Instruct"
    assert M.unsloth_checkpoint(str(tmp_path), True, UNSLOTH_TABLES) == str(tmp_path)  # a folder loads as it is
    monkeypatch.setattr(M, "unsloth_tables", lambda: UNSLOTH_TABLES)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    pinned = ModelConfig(name_or_path=QWEN, revision="a" * 40)
    with pytest.raises(BackendUnavailable, match=f"model.revision={'a' * 40} cannot be honoured") as e:
        M.check_available(pinned, "unsloth")
    assert UNSLOTH_4BIT in str(e.value) and "--local-dir DIR" in str(e.value)
    with pytest.raises(BackendUnavailable, match=f"hf download {UNSLOTH_4BIT}"):
        M.check_available(ModelConfig(name_or_path=QWEN), "unsloth")
    with pytest.raises(BackendUnavailable, match=f"hf download {QWEN} --revision"):
        M.check_available(pinned, "hf")  # transformers honours revisions: only the cache is missing


def _hub_snapshot(cache: Path, repo: str, folder: Path, commit: str) -> None:
    """`folder` as snapshot `commit` of `repo` in a Hugging Face cache, as `hf download` leaves it."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)


@pytest.mark.slow  # loads a model twice
def test_two_snapshots_of_one_repo_are_two_bases(tiny_model, tmp_path, monkeypatch):
    """The tensor layout and config fingerprint cannot tell two snapshots apart; the commit read can."""
    from aigd.errors import ManifestMismatch
    from aigd.manifest import check_compatible, policy_dict
    from aigd.model import base_info, load_base

    old, new = "1" * 40, "2" * 40
    for commit in (old, new):
        _hub_snapshot(tmp_path, "acme/tiny-vl", tiny_model, commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bases = {}
    for commit in (old, new):
        cfg = ModelConfig(name_or_path="acme/tiny-vl", revision=commit, load_in_4bit=False)
        model, _, backend = load_base(cfg, torch.device("cpu"), training=False)
        bases[commit] = base_info(model, cfg, backend)
    assert bases[old]["commit"] == old and bases[new]["commit"] == new
    assert bases[old]["layout"] == bases[new]["layout"] and bases[old]["fingerprint"] == bases[new]["fingerprint"]
    policy = ImagePolicy()
    manifest = {"base": bases[old], "image_policy": policy_dict(policy)}
    check_compatible(manifest, bases[old], policy)
    with pytest.raises(ManifestMismatch, match=f"snapshot differs \\(commit {old[:12]} vs {new[:12]}\\)"):
        check_compatible(manifest, {**bases[new], "revision": old}, policy)  # even under the same revision name


def _gather_worker(rank: int, world: int, port: int, out) -> None:
    import numpy as np
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seen = []
    real = dist.all_gather
    dist.all_gather = lambda tensors, t, *a, **k: (seen.append(t.device.type), real(tensors, t, *a, **k))[1]
    rows = np.column_stack([np.arange(rank, 7, world) * 1.0, np.full((len(range(rank, 7, world)), 3), rank)])
    got = V.merge_shares(V.gather_rows(rows, world))
    out.put((rank, got[:, 0].tolist(), sorted(set(seen))))
    dist.destroy_process_group()


@pytest.mark.slow  # a model or process group of its own: seconds, not the edit loop
def test_validation_gather_over_a_real_process_group_with_uneven_shares():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    for _, order, devices in results:
        assert order == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # rank 0 held 4 rows, rank 1 held 3
        assert devices == ["cpu"]


def test_sharded_validation_equals_the_unsharded_result(tiny_model, monkeypatch):
    """However the rows are split between ranks, the gathered result is the one-rank result: rows
    are ordered by their image id's key, not by which rank scored them."""
    import numpy as np

    model, proc, _ = load_for_training(ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False,
                                                   gradient_checkpointing=False), LoraConfig(), torch.device("cpu"))
    rng = np.random.default_rng(1)
    ids = label_token_ids(proc.tokenizer)
    policy = ImagePolicy(max_pixels=112 * 112)
    batches = []
    for b in range(5):
        rows = encode(proc, [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(3)], policy)
        rows["label"], rows["img_id"] = [b % 2, 1, 0], [f"gen/{b}-{i}" for i in range(3)]
        batches.append(collate(rows, proc.tokenizer.pad_token_id, pixel_affine(proc)))
    amp = contextlib.nullcontext()
    whole = V.validate(model, batches, ids, world=1, amp=amp)
    shares = []

    def keep_own_share(rows, world):  # what each rank contributes to the gather
        shares.append(rows)
        return [rows]

    monkeypatch.setattr(V, "gather_rows", keep_own_share)
    V.validate(model, [batches[i] for i in (4, 0, 3)], ids, world=2, amp=amp)  # Ray Data's split keeps no order
    V.validate(model, [batches[i] for i in (2, 1)], ids, world=2, amp=amp)
    merged = V.merge_shares([shares[1], shares[0]])
    assert len(shares[0]) == 9 and len(shares[1]) == 6
    np.testing.assert_array_equal(merged[:, 1:3], whole["pair_logits"])
    np.testing.assert_array_equal(merged[:, 3], whole["labels"])
    assert len(np.unique(whole["pair_logits"][:, 1])) == 15  # 15 different images, not one score repeated


def test_validation_sets_are_split_without_dropping_rows_and_training_sets_equally(ray_local):
    """Ray Train's own split (equal=True) drops rows to even out the ranks: fine for training, not for
    validation, where every row must be scored exactly once, by one rank, at every evaluation."""
    import threading

    import ray
    import ray.data

    from aigd.ingest import ValidationSplit

    train, val = ray.data.range(40, override_num_blocks=8), ray.data.range(23, override_num_blocks=7)
    config = ValidationSplit(train=["train_0"], validation=["val"])
    node = ray.get_runtime_context().get_node_id()
    parts = config.configure({"train_0": train, "val": val}, world_size=3, worker_handles=None,
                             worker_node_ids=[node] * 3)  # as Ray Train passes them: with locality hints

    def epoch(name: str) -> list[list[int]]:
        seen = [[] for _ in parts]

        def consume(rank: int):  # the ranks of a split read at once, as the workers do
            for batch in parts[rank][name].iter_batches(batch_size=4):
                seen[rank].extend(batch["id"].tolist())

        threads = [threading.Thread(target=consume, args=(r,), daemon=True) for r in range(3)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert not any(t.is_alive() for t in threads), f"{name}: a rank never finished its part"
        return seen

    for _ in range(2):  # one evaluation, then the next: each is a new pass over the same split
        val_parts = epoch("val")
        assert sorted(sum(val_parts, [])) == list(range(23))  # every row once, none dropped, none twice
        assert all(val_parts), val_parts  # each rank scored a part
    assert len({len(rows) for rows in epoch("train_0")}) == 1  # training: equal shares per rank


@pytest.mark.slow  # a model and a process group of its own
def test_ddp_broadcasts_only_the_lora_weights(tiny_model, monkeypatch):
    """DDP's start-up sync sends rank 0's tensors to every rank: the frozen base (5-8 GB of 4-bit
    weights on the 7B) must not be among them; every rank loads it from the same files."""
    import torch.distributed as dist

    from helpers import free_port

    model, _, _ = load_for_training(ModelConfig(name_or_path=str(tiny_model), load_in_4bit=False,
                                                gradient_checkpointing=False), LoraConfig(), torch.device("cpu"))
    lora = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    sent = []
    real = dist._broadcast_coalesced
    monkeypatch.setattr(dist, "_broadcast_coalesced", lambda pg, tensors, *a: (sent.extend(tensors),
                                                                              real(pg, tensors, *a))[1])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.nn.parallel.DistributedDataParallel(L.ddp_trainable_only(model))
        only_lora, sent[:] = list(sent), []
        del model._ddp_params_and_buffers_to_ignore
        torch.nn.parallel.DistributedDataParallel(model)  # what plain DDP would send
    finally:
        dist.destroy_process_group()
    assert only_lora and {t.data_ptr() for t in only_lora} == lora
    assert len(sent) > 2 * len(only_lora) and lora < {t.data_ptr() for t in sent}


def test_a_multi_node_run_refuses_storage_that_only_one_node_sees():
    local = C.load(C.TrainJobConfig, None, ["run.storage_path=/tmp/runs", "data.source=sid_parquet",
                                            "data.path=/data/sid"])
    T.check_storage(local, n_nodes=1)  # one machine: local is fine
    with pytest.raises(C.ConfigError, match="AIGD_STORAGE=s3://") as e:
        T.check_storage(local, n_nodes=2)
    assert "run.storage_path=/tmp/runs" in str(e.value) and "data.path=/data/sid" in str(e.value)
    with pytest.raises(C.ConfigError, match="data.source=hub"):
        T.check_storage(C.replace(local, data=C.DataConfig(source="hub")), n_nodes=3)
    remote = C.load(C.TrainJobConfig, None, ["run.storage_path=s3://b/runs", "data.source=sid_parquet",
                                             "data.path=gs://b/sid"])
    T.check_storage(remote, n_nodes=4)
    T.check_storage(C.load(C.TrainJobConfig, None, ["run.storage_path=/nfs/runs", "data.path=/nfs/sid",
                                                    "run.shared_storage=true"]), n_nodes=4)


def test_a_job_whose_workers_hold_every_cpu_is_refused_before_it_waits_forever():
    """Ray Data preprocesses and samples beside the workers: 1 worker x 2 CPUs on a 2-CPU node used to
    hang at the first batch ("Cluster resources are not enough"); now it is a clear error at start."""
    cfg = C.from_dict(C.TrainJobConfig, {"model": {"name_or_path": "x"}, "data": {"path": "x", "preprocess_cpus": 0.5}})

    def scaled(workers, cpus):
        return C.replace(cfg, scaling=C.replace(cfg.scaling, num_workers=workers, cpus_per_worker=cpus))

    with pytest.raises(C.ConfigError, match=r"hold 2 of this cluster's 2 CPUs.*1\.5 CPUs each would fit"):
        T.check_cpus(scaled(1, 2.0), 2.0)
    with pytest.raises(C.ConfigError, match="Ray Data needs 0.5"):
        T.check_cpus(scaled(2, 0.8), 2.0)
    T.check_cpus(scaled(1, 1.5), 2.0)  # half a CPU left: fits
    T.check_cpus(scaled(2, 0.5), 2.0)  # the demo
    T.check_cpus(scaled(4, 1.0), 2.0)  # the workers do not fit yet: the autoscaler's (and Ray Train's) business
    # ...and a worker's threads are its share rounded up, so 1.5 CPUs still run 2 threads.
    assert [L.cpu_threads(scaled(1, c).scaling) for c in (0.5, 1.0, 1.5, 2.0)] == [1, 1, 2, 2]


def test_the_loop_counts_the_time_it_waits_for_batches():
    import time

    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    progress = L.Progress(total_steps=3, every=1)
    assert list(progress.waited(slow())) == [0, 1, 2]
    assert 0.14 < progress.data_wait < 1.0
    busy = L.Progress(total_steps=3, every=1)
    assert list(busy.waited(range(3))) == [0, 1, 2] and busy.data_wait < 0.01


def test_cached_epochs_are_drawn_ahead_when_they_fit_and_hold_the_same_rows_either_way(ray_local):
    """Drawing each epoch's sample while it streams cost the demo ~45 % of its training throughput; drawn
    ahead (materialized) they must be the very rows the streamed draw gives, and a store too small for
    them all keeps the streamed draw."""
    import ray
    from ray.data.dataset import MaterializedDataset

    from aigd.sampling import Subsample

    every = ray.data.from_items([{"img_id": f"r{i}", "label": i % 2} for i in range(200)]).materialize()
    balance = [Subsample(f"s/{e}/balance", (0.5, 0.3)) for e in range(3)]
    ahead = T.cached_epochs(every, balance, kept=0.4)
    streamed = T.cached_epochs(every, balance, kept=0.4, store_share=0.0)
    for e in range(3):
        assert isinstance(ahead[f"train_{e}"], MaterializedDataset)
        assert not isinstance(streamed[f"train_{e}"], MaterializedDataset)
        rows = sorted(r["img_id"] for r in ahead[f"train_{e}"].iter_rows())
        assert rows == sorted(r["img_id"] for r in streamed[f"train_{e}"].iter_rows())
        assert 40 < len(rows) < 120
    assert len({tuple(sorted(r["img_id"] for r in ahead[f"train_{e}"].iter_rows())) for e in range(3)}) == 3
    assert T.cached_epochs(every, [None], kept=1.0)["train_0"] is every  # unbalanced: the cache itself
