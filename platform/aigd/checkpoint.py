"""The training checkpoint format, in one place: what a folder holds, how it is written so that a
torn one is recognisable, how a run resumes from it, and how the export reads the final one.

A checkpoint folder holds:
    trainable.safetensors   the LoRA (and other trainable) weights now
    best.safetensors        the best weights so far by val AUC (absent before the first evaluation)
    training_state.pt       optimizer, scheduler, fp16 loss scaler, torch RNG (torch.load(weights_only=True))
    rng.json                numpy's and Python's RNG states
    loop_state.json         the loop's counters (`aigd.loop.LoopState`)
    config.json, base.json  the job config and the base the weights were trained on
    val_predictions.npz, val_metrics.json   the last validation (absent before the first)
    adapter/                the final checkpoint only: the best weights as a peft folder
    complete.json           written last: every file above with its size
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

COMPLETE = "complete.json"
ADAPTER = "adapter"


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint whose writer died before it finished."""


@dataclass
class Restored:
    trainable: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizer: dict
    scheduler: dict
    scaler: dict  # torch.amp.GradScaler's state; {} when no fp16 scaling ran
    loop_state: dict


@dataclass
class Final:
    """What the export needs from the last checkpoint of a finished run."""

    adapter: Path
    pair_logits: np.ndarray
    labels: np.ndarray
    val_metrics: dict
    loop_state: dict
    base: dict


def _rng_state() -> tuple[torch.Tensor, dict]:
    """torch's as a tensor, numpy's and Python's as JSON (so nothing is unpickled on load)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return torch.get_rng_state(), {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
                                   "python": [version, list(internal), gauss_next]}


def _set_rng_state(torch_state: torch.Tensor, other: dict) -> None:
    torch.set_rng_state(torch_state)
    kind, keys, pos, has_gauss, gauss = other["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = other["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path))


def save(path: Path, *, trainable: dict, best: dict | None, optimizer, scheduler, scaler, loop_state: dict,
         config: dict, base: dict, val: dict | None, export: Callable[[str], None] | None = None,
         after_first_file: Callable[[], None] | None = None) -> None:
    """Write a checkpoint; `complete.json` last. `export(folder)` writes the final adapter;
    `after_first_file` lets a fault-injection hook kill the writer with the folder half written."""
    path.mkdir(parents=True, exist_ok=True)
    _tensors(path / "trainable.safetensors", trainable)
    if after_first_file is not None:
        after_first_file()
    if best is not None:
        _tensors(path / "best.safetensors", best)
    torch_rng, other_rng = _rng_state()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "torch_rng": torch_rng}, path / "training_state.pt")
    (path / "rng.json").write_text(json.dumps(other_rng))
    (path / "loop_state.json").write_text(json.dumps(loop_state))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "base.json").write_text(json.dumps(base, indent=2))  # what the manifest says it was trained on
    if val is not None:
        np.savez(path / "val_predictions.npz", pair_logits=val["pair_logits"], labels=val["labels"])
        (path / "val_metrics.json").write_text(json.dumps(val["metrics"], indent=2))
    if export is not None:
        export(str(path / ADAPTER))
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    (path / f"{COMPLETE}.tmp").write_text(json.dumps(files, indent=1))
    os.replace(path / f"{COMPLETE}.tmp", path / COMPLETE)


def check_complete(path: Path) -> None:
    """Refuse a checkpoint that was still being written (or copied) when its process died."""
    if not (path / COMPLETE).exists():
        raise IncompleteCheckpoint(f"checkpoint {path} has no {COMPLETE}: its writer died mid-write")
    listed = json.loads((path / COMPLETE).read_text())
    wrong = [f for f, size in listed.items() if not (path / f).is_file() or (path / f).stat().st_size != size]
    if wrong:
        raise IncompleteCheckpoint(f"checkpoint {path} is incomplete: {wrong} missing or truncated")


def load(path: Path) -> Restored:
    """A complete checkpoint's state; the RNGs are restored as a side effect (they are process-wide)."""
    check_complete(path)
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").exists() else None
    blob = torch.load(path / "training_state.pt", weights_only=True)
    _set_rng_state(blob["torch_rng"], json.loads((path / "rng.json").read_text()))
    return Restored(load_file(str(path / "trainable.safetensors")), best, blob["optimizer"], blob["scheduler"],
                    blob.get("scaler", {}), json.loads((path / "loop_state.json").read_text()))


def read_final(path: Path) -> Final:
    """The last checkpoint of a finished run, or a clear error if the run stopped before its end."""
    check_complete(path)
    if not (path / ADAPTER).exists():
        raise RuntimeError(f"the last checkpoint ({path}) is not the final one; the run did not finish")
    val = np.load(path / "val_predictions.npz")
    return Final(path / ADAPTER, val["pair_logits"], val["labels"],
                 json.loads((path / "val_metrics.json").read_text()),
                 json.loads((path / "loop_state.json").read_text()), json.loads((path / "base.json").read_text()))
