"""The one scoring front door: one copy of a base model with every exported adapter on it.

Serving, evaluation, batch scoring and `aigd score` all score through `Scorer`: the image policy
and each adapter's temperature, threshold and uncertain band come from the adapters' manifests, and answers are
built by `aigd.decision`. A batch is scored with one forward pass per adapter over the images that
asked for it: peft cannot mix adapters inside one batch when LoRA sits in the vision tower (the
seed's kind), so adapters are switched between forwards, never within one, under a lock.

A member can move to another registry version while serving (`switch`): the new version is loaded
beside the old one, then swapped in under the same lock, so every answer comes wholly from one
version and names it. A shadow version of a member is scored only when asked (`shadow_p_fake`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aigd.batching import model_batch
from aigd.config import DecodeLimits, EnsembleConfig, ScoringConfig
from aigd.decision import Rule, ensemble_answer, member_answer, p_fake
from aigd import registry
from aigd.errors import AdapterUnavailable, AigdError, ManifestMismatch, UnknownAdapter
from aigd.manifest import check_compatible, policy_dict, policy_for, read_manifest
from aigd.model import autocast, base_info, load_base
from aigd.image_view import prepare, prepare_image
from aigd.prompt import label_token_ids
from aigd.forward import answer_logits, pair_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    name: str
    version: registry.Version
    peft_name: str  # the adapter's name inside the PeftModel: one per loaded version
    manifest: dict
    temperature: float
    rule: Rule  # threshold and uncertain band
    warmup_ms: float | None = None  # its first forward, run before it could serve (Scorer(warm_up=True))

    @property
    def model_info(self) -> dict:
        """What every answer says of the model that gave it."""
        return {"name": self.name, "version": self.version.version,
                **{k: self.manifest.get(k) for k in ("method", "created_at", "code_version")}}


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Scorer:
    def __init__(self, cfg: ScoringConfig, device: torch.device | None = None, on_adapter_error: str = "fail",
                 warm_up: bool = False):
        """warm_up: every version loaded (here, by `switch`, by `set_shadow`) runs one forward first
        (`_warm_up`); what a server wants, not a batch job."""
        if not cfg.adapters:
            raise ValueError("no adapters configured")
        self.cfg = cfg
        self.policy = policy_for(cfg)
        self.device = device or default_device()
        base, self.processor, self.backend = load_base(cfg.model, self.device, training=False)
        self.base = base_info(base, cfg.model, self.backend)
        self.label_ids = label_token_ids(self.processor.tokenizer)
        self.members: dict[str, Member] = {}
        self.shadows: dict[str, Member] = {}
        self.unavailable: dict[str, str] = {}
        self.model = base
        self._lock = threading.Lock()
        self._loaded = 0  # versions ever loaded: each gets its own peft adapter name
        self.warm_up = warm_up
        for name, path in cfg.adapters.items():
            try:
                self.members[name] = self._load(name, path)
            except (AigdError, OSError, ValueError) as e:
                if on_adapter_error == "fail":
                    raise
                log.error("adapter %s not loaded: %s", name, e)
                self.unavailable[name] = str(e)
        if not self.members:
            raise ManifestMismatch("no adapter could be loaded: " + "; ".join(self.unavailable.values()))
        self.model.eval()

    def _load(self, name: str, ref: str) -> Member:
        """Verify a version (files, hashes, base, policy), then load it beside whatever is loaded."""
        from peft import PeftModel

        version = registry.resolve(ref)
        local = str(registry.local_copy(version))  # verified: a corrupt or half-written version stops here
        manifest = read_manifest(version)
        check_compatible(manifest, self.base, self.policy, where=f"adapter {name} ({version})")
        self._loaded += 1
        peft_name = f"{name}_v{self._loaded}"
        with self._lock:  # peft injects modules into the model: never during a forward
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(local, adapter_name=peft_name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, local, adapter_name=peft_name, is_trainable=False)
        cal = manifest["calibration"]
        band = tuple(cal["uncertain_band"]) if cal.get("uncertain_band") else None
        threshold = self.cfg.thresholds.get(name, cal["threshold"])
        member = Member(name, version, peft_name, manifest, float(cal["temperature"]), Rule(float(threshold), band))
        if self.warm_up:
            try:
                member = replace(member, warmup_ms=self._warm_up(member))
            except Exception as e:  # out of memory, a kernel that does not compile: never half loaded
                self._unload(member)
                raise AdapterUnavailable(f"adapter {name} ({version}): its first forward failed: {e}") from e
        return member

    @torch.inference_mode()
    def _warm_up(self, member: Member) -> float:
        """One forward of an image of the policy's largest size with this version selected, before
        it can serve: the first forward pays for kernel selection, compilation (Unsloth) and memory
        growth, which would otherwise land on a user's request and could pass its deadline."""
        side = math.isqrt(self.policy.max_pixels)
        image = prepare_image(Image.new("RGB", (side, side), (128, 128, 128)), self.policy)
        batch = model_batch(self.processor, [image], self.policy)
        t0 = time.perf_counter()
        with self._lock, autocast(self.cfg.model, self.device):
            self.model.set_adapter(member.peft_name, inference_mode=True)  # every forward selects its own (`using`)
            answer_logits(self.model, batch)
        return round((time.perf_counter() - t0) * 1000, 1)

    def _unload(self, member: Member) -> None:
        with self._lock:
            self.model.delete_adapter(member.peft_name)

    # ---- versions

    def switch(self, name: str, ref: str) -> Member:
        """Serve `name` from another version: load it beside the old one, swap under the scoring
        lock, unload the old. A version that fails to load changes nothing."""
        old = self.member(name)
        if registry.resolve(ref) == old.version:
            return old
        new = self._load(name, ref)
        with self._lock:
            self.members[name] = new
        self._unload(old)
        log.info("adapter %s: %s -> %s", name, old.version.version, new.version.version)
        return new

    def set_shadow(self, name: str, ref: str | None) -> None:
        """Score `name`'s requests also with another version, on demand; None removes it."""
        self.member(name)
        old = self.shadows.get(name)
        if ref is not None and old is not None and registry.resolve(ref) == old.version:
            return
        if ref is not None:
            new = self._load(name, ref)
            with self._lock:
                self.shadows[name] = new
        elif old is not None:
            with self._lock:
                del self.shadows[name]
        if old is not None:
            self._unload(old)

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

    def member_logits(self, images: list[np.ndarray], adapter: str, shadow: bool = False) -> tuple[np.ndarray, Member]:
        """(N, 2) [Real, Fake] logits of prepared images under one adapter (one forward pass), and
        the version that gave them."""
        return self.batch_logits(model_batch(self.processor, images, self.policy), adapter, shadow)

    @torch.inference_mode()
    def batch_logits(self, batch: dict, adapter: str, shadow: bool = False) -> tuple[np.ndarray, Member]:
        """`member_logits` of a batch already encoded (`batching.model_batch`)."""
        self.member(adapter)
        # Picking the version, selecting it and the forward are one step: concurrent batches never
        # mix adapters, and a switch lands between forwards.
        with self._lock:
            m = self.shadows[adapter] if shadow else self.member(adapter)
            with self.using(m, locked=True) as model:
                return pair_logits(answer_logits(model, batch), self.label_ids).float().cpu().numpy(), m

    @contextlib.contextmanager
    def using(self, member: Member, locked: bool = False):
        """The model with `member`'s version selected, for one forward pass under the scoring lock
        (`locked`: the caller holds it). A version switched out since it was picked is refused:
        an answer never mixes two versions."""
        with contextlib.nullcontext() if locked else self._lock, autocast(self.cfg.model, self.device):
            if not any(m is member for m in (*self.members.values(), *self.shadows.values())):
                raise AdapterUnavailable(f"adapter {member.name}: version {member.version.version} was switched out "
                                         "during the request; retry")
            self.model.set_adapter(member.peft_name, inference_mode=True)
            yield self.model

    def pair_logits(self, images: list[np.ndarray], adapter: str) -> np.ndarray:
        return self.member_logits(images, adapter)[0]

    def member_p_fake(self, images: list[np.ndarray], adapter: str, shadow: bool = False) -> tuple[np.ndarray, Member]:
        """Calibrated P(fake) (the pair logits through the version's fitted temperature), and the version."""
        z, m = self.member_logits(images, adapter, shadow)
        return p_fake(z, m.temperature), m

    def p_fake(self, images: list[np.ndarray], adapter: str) -> np.ndarray:
        return self.member_p_fake(images, adapter)[0]

    def score_requests(self, images: list[np.ndarray], wanted: list[tuple[str, ...]]) -> list[dict]:
        """For image i, {adapter: its answer, or the exception it raised}; one forward per adapter."""
        out: list[dict] = [{} for _ in images]
        for name in sorted({a for names in wanted for a in names}):
            idx = [i for i, names in enumerate(wanted) if name in names]
            try:
                p, m = self.member_p_fake([images[i] for i in idx], name)
                for i, v in zip(idx, p):
                    out[i][name] = self.answer(m, float(v))
            except Exception as e:  # one adapter failing must not take the others down
                log.exception("adapter %s failed on a batch of %d", name, len(idx))
                for i in idx:
                    out[i][name] = e
        return out

    # ---- answers

    @staticmethod
    def answer(m: Member, p: float) -> dict:
        return member_answer(m.name, p, m.rule, m.temperature, m.model_info)

    def answers(self, images: list[np.ndarray], ensemble: EnsembleConfig) -> list[dict]:
        """Per image: every member's answer, and the ensemble's when there are several members."""
        names = list(ensemble.members or self.members)
        members = {n: self.member_p_fake(images, n) for n in names}
        out = []
        for i in range(len(images)):
            each = {n: self.answer(m, float(p[i])) for n, (p, m) in members.items()}
            out.append(ensemble_answer(each, {}, ensemble) if len(names) > 1 else each[names[0]])
        return out

    def describe(self) -> dict:
        """What clients may see: names, versions and rules, never a server path."""
        # Copies in one C call each (atomic under the GIL): a reconfigure may add or drop versions
        # meanwhile, and the scoring lock would make /readyz wait for a forward pass.
        members, shadows = dict(self.members), dict(self.shadows)
        base = {k: self.base[k] for k in ("checkpoint", "backend", "dtype", "quantization", "fingerprint")}
        if Path(base["checkpoint"]).is_absolute():  # a local folder: its name only
            base["checkpoint"] = Path(base["checkpoint"]).name
        return {
            "base": base,
            "device": str(self.device),
            "image_policy": policy_dict(self.policy),
            "adapters": {n: {"temperature": m.temperature, **m.rule.as_dict(), **m.model_info,
                             "warmup_ms": m.warmup_ms} for n, m in members.items()},
            "shadows": {n: m.version.version for n, m in shadows.items()},
            "unavailable": sorted(self.unavailable),
        }
