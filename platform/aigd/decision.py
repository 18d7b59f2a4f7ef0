"""From pair logits to an answer: the one P(fake), the one verdict and the one ensemble rule.

The HTTP API, `aigd score`, batch scoring and the evaluation job all answer through these
functions, so a label, a threshold or the uncertain band means the same thing wherever it is read.
numpy only: evaluation applies the same rules to whole columns at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aigd.config import EnsembleConfig

ENSEMBLE = "ensemble"
UNCERTAIN = "uncertain"


def p_fake(pair_logits, temperature: float = 1.0) -> np.ndarray:
    """Two-way softmax over [Real, Fake] logits at a temperature: (N, 2) -> (N,)."""
    z = np.asarray(pair_logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-(z[:, 1] - z[:, 0]) / temperature))


@dataclass(frozen=True)
class Rule:
    """"fake" at or above `threshold`, else "real"; "uncertain" inside `band` = [lo, hi), the
    P(fake) range where validation precision of either answer fell below the fitted level."""

    threshold: float
    band: tuple[float, float] | None = None

    def __post_init__(self):
        if self.band is not None:  # the threshold always lies in the band (an override may move it)
            object.__setattr__(self, "band", (min(self.band[0], self.threshold), max(self.band[1], self.threshold)))

    def label(self, p):
        """Element-wise for arrays."""
        out = np.where(np.asarray(p) >= self.threshold, "fake", "real")
        if self.band is not None:
            lo, hi = self.band
            out = np.where((np.asarray(p) >= lo) & (np.asarray(p) < hi), UNCERTAIN, out)
        return out if np.ndim(p) else str(out)

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "uncertain_band": list(self.band) if self.band else None}


def combine(values: dict, weights: dict[str, float]):
    """Weighted mean of the members' values (floats or arrays); a name without a weight weighs 1."""
    w = {k: float(weights.get(k, 1.0)) for k in values}
    total = sum(w.values())
    if total <= 0:
        raise ValueError(f"ensemble weights of {sorted(values)} sum to {total}")
    return sum(w[k] * v for k, v in values.items()) / total


def ensemble_rule(rules: dict[str, Rule], cfg: EnsembleConfig) -> Rule:
    """`ensemble.threshold` if set, else the members' thresholds combined with the ensemble's weights;
    the band's ends combined the same way (no band unless every member has one)."""
    threshold = float(cfg.threshold) if cfg.threshold is not None else \
        float(combine({n: r.threshold for n, r in rules.items()}, cfg.weights))
    band = None
    if all(r.band is not None for r in rules.values()):
        band = (float(combine({n: r.band[0] for n, r in rules.items()}, cfg.weights)),
                float(combine({n: r.band[1] for n, r in rules.items()}, cfg.weights)))
    return Rule(threshold, band)


def ensemble(members: dict[str, tuple], cfg: EnsembleConfig) -> tuple:
    """The ensemble's (P(fake), Rule) from its members' (P(fake), Rule): P(fake) a float or a
    column. The Router, `Scorer.answers` and evaluation all combine through this."""
    return (combine({n: p for n, (p, _) in members.items()}, cfg.weights),
            ensemble_rule({n: rule for n, (_, rule) in members.items()}, cfg))


def member_answer(name: str, p: float, rule: Rule, temperature: float, version: dict) -> dict:
    return {"adapter": name, "label": rule.label(p), "p_fake": float(p), "p_real": 1.0 - float(p),
            **rule.as_dict(), "temperature": temperature, "model": version}


def ensemble_answer(members: dict[str, dict], failed: dict[str, str], cfg: EnsembleConfig) -> dict:
    """The ensemble's answer from its members' answers (each from `member_answer`)."""
    p, rule = ensemble({n: (m["p_fake"], Rule(m["threshold"], tuple(m["uncertain_band"]) if m.get("uncertain_band")
                                          else None)) for n, m in members.items()}, cfg)
    p = float(p)
    return {"adapter": ENSEMBLE, "label": rule.label(p), "p_fake": p, "p_real": 1.0 - p, **rule.as_dict(),
            "rule": "weighted_mean", "weights": {n: cfg.weights.get(n, 1.0) for n in members},
            "degraded": bool(failed), "members_used": sorted(members), "members_failed": failed,
            "members": members}
