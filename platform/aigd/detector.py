"""One copy of the base model with every exported adapter on it (peft multi-adapter).

Serving and evaluation load this. A batch is scored with one forward pass per adapter over the
images that asked for it: peft cannot mix adapters inside one batch when LoRA sits in the vision
tower (the seed's kind), so adapters are switched between forwards, never within one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from aigd.config import ImagePolicy, ModelConfig
from aigd.errors import AdapterUnavailable, AigdError, ManifestMismatch, UnknownAdapter
from aigd.manifest import base_fingerprint, check_compatible, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    name: str
    path: str
    manifest: dict
    temperature: float
    threshold: float


def combine(p_fake: dict[str, float], weights: dict[str, float]) -> float:
    """Weighted mean of calibrated probabilities; a name without a weight weighs 1."""
    w = {k: float(weights.get(k, 1.0)) for k in p_fake}
    total = sum(w.values())
    if total <= 0:
        raise ValueError(f"ensemble weights of {sorted(p_fake)} sum to {total}")
    return sum(w[k] * p for k, p in p_fake.items()) / total


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Detector:
    def __init__(self, model_cfg: ModelConfig, policy: ImagePolicy, adapters: dict[str, str],
                 thresholds: dict[str, float] | None = None, device: torch.device | None = None,
                 on_adapter_error: str = "fail"):
        from aigd.model import load_base
        from aigd.prompt import label_token_ids

        if not adapters:
            raise ValueError("no adapters configured")
        self.policy = policy
        self.device = device or default_device()
        base, self.processor, self.backend = load_base(model_cfg, self.device, training=False)
        self.fingerprint = base_fingerprint(base.config)
        self.base_name = model_cfg.name_or_path
        self.label_ids = label_token_ids(self.processor.tokenizer)
        self.members: dict[str, Member] = {}
        self.unavailable: dict[str, str] = {}
        self.model = base
        for name, path in adapters.items():
            try:
                self.members[name] = self._load(name, path, (thresholds or {}).get(name))
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
        check_compatible(manifest, self.fingerprint, self.policy, where=f"adapter {name} ({path})")
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
        cal = manifest.get("calibration", {})
        return Member(name, path, manifest, float(cal.get("temperature", 1.0)),
                      float(threshold if threshold is not None else cal.get("threshold", 0.5)))

    def member(self, name: str) -> Member:
        if name in self.members:
            return self.members[name]
        if name in self.unavailable:
            raise AdapterUnavailable(f"adapter {name!r} is configured but not loaded: {self.unavailable[name]}")
        raise UnknownAdapter(f"unknown adapter {name!r}; loaded: {sorted(self.members)}")

    @torch.no_grad()
    def pair_logits(self, images: list, adapter: str) -> np.ndarray:
        """(N, 2) [Real, Fake] logits of prepared RGB images under one adapter: one forward pass."""
        from aigd.prompt import model_batch
        from aigd.scoring import answer_logits, pair_logits

        self.member(adapter)
        self.model.set_adapter(adapter)
        batch = model_batch(self.processor, images, self.policy)
        return pair_logits(answer_logits(self.model, batch), self.label_ids).cpu().numpy()

    def score(self, images: list, adapter: str) -> np.ndarray:
        """Calibrated P(fake): the pair logits through the adapter's fitted temperature."""
        from aigd.metrics import sigmoid_p

        return sigmoid_p(self.pair_logits(images, adapter), self.member(adapter).temperature)

    def score_requests(self, images: list, wanted: list[tuple[str, ...]]) -> list[dict]:
        """For request i, {adapter: p_fake or the exception that adapter raised}; one forward per adapter."""
        out: list[dict] = [{} for _ in images]
        for name in sorted({a for names in wanted for a in names}):
            idx = [i for i, names in enumerate(wanted) if name in names]
            try:
                p = self.score([images[i] for i in idx], name)
                for i, v in zip(idx, p):
                    out[i][name] = float(v)
            except Exception as e:  # one adapter failing must not take the others down
                log.exception("adapter %s failed on a batch of %d", name, len(idx))
                for i in idx:
                    out[i][name] = e
        return out

    def describe(self) -> dict:
        return {
            "base": {"name": self.base_name, "fingerprint": self.fingerprint, "backend": self.backend,
                     "device": str(self.device)},
            "image_policy": {"max_pixels": self.policy.max_pixels, "min_pixels": self.policy.min_pixels,
                             "prompt": self.policy.prompt, "prompt_version": self.policy.prompt_version},
            "adapters": {n: {"path": m.path, "temperature": m.temperature, "threshold": m.threshold,
                             "manifest": m.manifest} for n, m in self.members.items()},
            "unavailable": dict(self.unavailable),
        }
