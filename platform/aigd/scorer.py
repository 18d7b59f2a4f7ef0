"""The one scoring front door: one copy of a base model with every exported adapter on it.

Serving, evaluation, batch scoring and `aigd score` all score through `Scorer`: the image policy
and each adapter's temperature, threshold and uncertain band come from the adapters' manifests, and answers are
built by `aigd.decision`. A batch is scored with one forward pass per adapter over the images that
asked for it: peft cannot mix adapters inside one batch when LoRA sits in the vision tower (the
seed's kind), so adapters are switched between forwards, never within one, under a lock.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aigd.batching import model_batch
from aigd.config import DecodeLimits, EnsembleConfig, ScoringConfig
from aigd.decision import Rule, ensemble_answer, member_answer, p_fake
from aigd.errors import AdapterUnavailable, AigdError, ManifestMismatch, UnknownAdapter
from aigd.manifest import check_compatible, policy_dict, policy_for, read_manifest
from aigd.model import autocast, base_info, load_base
from aigd.image_view import prepare
from aigd.prompt import label_token_ids
from aigd.forward import answer_logits, pair_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    name: str
    path: str
    manifest: dict
    temperature: float
    rule: Rule  # threshold and uncertain band

    @property
    def version(self) -> dict:
        return {k: self.manifest.get(k) for k in ("method", "created_at", "code_version")}


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Scorer:
    def __init__(self, cfg: ScoringConfig, device: torch.device | None = None, on_adapter_error: str = "fail"):
        if not cfg.adapters:
            raise ValueError("no adapters configured")
        self.cfg = cfg
        self.policy = policy_for(cfg)
        self.device = device or default_device()
        base, self.processor, self.backend = load_base(cfg.model, self.device, training=False)
        self.base = base_info(base, cfg.model, self.backend)
        self.label_ids = label_token_ids(self.processor.tokenizer)
        self.members: dict[str, Member] = {}
        self.unavailable: dict[str, str] = {}
        self.model = base
        self._lock = threading.Lock()
        for name, path in cfg.adapters.items():
            try:
                self.members[name] = self._load(name, path, cfg.thresholds.get(name))
            except (AigdError, OSError, ValueError) as e:
                if on_adapter_error == "fail":
                    raise
                log.error("adapter %s not loaded: %s", name, e)
                self.unavailable[name] = str(e)
        if not self.members:
            raise ManifestMismatch("no adapter could be loaded: " + "; ".join(self.unavailable.values()))
        self.model.eval()

    def _load(self, name: str, path: str, threshold: float | None) -> Member:
        from peft import PeftModel

        manifest = read_manifest(path)
        check_compatible(manifest, self.base, self.policy, where=f"adapter {name} ({path})")
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
        cal = manifest["calibration"]
        band = tuple(cal["uncertain_band"]) if cal.get("uncertain_band") else None
        return Member(name, path, manifest, float(cal["temperature"]),
                      Rule(float(threshold if threshold is not None else cal["threshold"]), band))

    def member(self, name: str) -> Member:
        if name in self.members:
            return self.members[name]
        if name in self.unavailable:
            raise AdapterUnavailable(f"adapter {name!r} is configured but not loaded")
        raise UnknownAdapter(f"unknown adapter {name!r}; loaded: {sorted(self.members)}")

    # ---- images

    def prepare(self, data: bytes, limits: DecodeLimits) -> np.ndarray:
        return prepare(data, limits, self.policy)

    # ---- scores

    @torch.inference_mode()
    def pair_logits(self, images: list[np.ndarray], adapter: str) -> np.ndarray:
        """(N, 2) [Real, Fake] logits of prepared images under one adapter: one forward pass."""
        self.member(adapter)
        batch = model_batch(self.processor, images, self.policy)
        # The adapter switch and the forward are one step: concurrent batches never mix adapters.
        with self._lock, autocast(self.cfg.model, self.device, self.backend):
            self.model.set_adapter(adapter, inference_mode=True)
            return pair_logits(answer_logits(self.model, batch), self.label_ids).float().cpu().numpy()

    def p_fake(self, images: list[np.ndarray], adapter: str) -> np.ndarray:
        """Calibrated P(fake): the pair logits through the adapter's fitted temperature."""
        return p_fake(self.pair_logits(images, adapter), self.member(adapter).temperature)

    def score_requests(self, images: list[np.ndarray], wanted: list[tuple[str, ...]]) -> list[dict]:
        """For image i, {adapter: its answer, or the exception it raised}; one forward per adapter."""
        out: list[dict] = [{} for _ in images]
        for name in sorted({a for names in wanted for a in names}):
            idx = [i for i, names in enumerate(wanted) if name in names]
            try:
                p = self.p_fake([images[i] for i in idx], name)
                for i, v in zip(idx, p):
                    out[i][name] = self.answer(name, float(v))
            except Exception as e:  # one adapter failing must not take the others down
                log.exception("adapter %s failed on a batch of %d", name, len(idx))
                for i in idx:
                    out[i][name] = e
        return out

    # ---- answers

    def answer(self, name: str, p: float) -> dict:
        m = self.member(name)
        return member_answer(name, p, m.rule, m.temperature, m.version)

    def answers(self, images: list[np.ndarray], ensemble: EnsembleConfig) -> list[dict]:
        """Per image: every member's answer, and the ensemble's when there are several members."""
        names = list(ensemble.members or self.members)
        members = {n: self.p_fake(images, n) for n in names}
        out = []
        for i in range(len(images)):
            each = {n: self.answer(n, float(members[n][i])) for n in names}
            out.append(ensemble_answer(each, {}, ensemble) if len(names) > 1 else each[names[0]])
        return out

    def describe(self) -> dict:
        """What clients may see: names, versions and rules, never a server path."""
        base = {k: self.base[k] for k in ("checkpoint", "backend", "dtype", "quantization", "fingerprint")}
        if Path(base["checkpoint"]).is_absolute():  # a local folder: its name only
            base["checkpoint"] = Path(base["checkpoint"]).name
        return {
            "base": base,
            "device": str(self.device),
            "image_policy": policy_dict(self.policy),
            "adapters": {n: {"temperature": m.temperature, **m.rule.as_dict(), **m.version}
                         for n, m in self.members.items()},
            "unavailable": sorted(self.unavailable),
        }
