"""From pair logits to an answer: the one P(fake), the one verdict and the one ensemble rule.

The HTTP API, `aigd score`, batch scoring and the evaluation job all answer through these
functions, so a label or an ensemble threshold means the same thing wherever it is read.
numpy only: evaluation applies the same rules to whole columns at once.
"""

from __future__ import annotations

import numpy as np

from aigd.config import EnsembleConfig

ENSEMBLE = "ensemble"


def p_fake(pair_logits, temperature: float = 1.0) -> np.ndarray:
    """Two-way softmax over [Real, Fake] logits at a temperature: (N, 2) -> (N,)."""
    z = np.asarray(pair_logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-(z[:, 1] - z[:, 0]) / temperature))


def label(p, threshold: float):
    """"fake" at or above the threshold, else "real"; element-wise for arrays."""
    if np.ndim(p):
        return np.where(np.asarray(p) >= threshold, "fake", "real")
    return "fake" if p >= threshold else "real"


def combine(values: dict, weights: dict[str, float]):
    """Weighted mean of the members' values (floats or arrays); a name without a weight weighs 1."""
    w = {k: float(weights.get(k, 1.0)) for k in values}
    total = sum(w.values())
    if total <= 0:
        raise ValueError(f"ensemble weights of {sorted(values)} sum to {total}")
    return sum(w[k] * v for k, v in values.items()) / total


def ensemble_threshold(thresholds: dict[str, float], cfg: EnsembleConfig) -> float:
    """`ensemble.threshold` if set, else the members' thresholds combined with the same weights."""
    return float(cfg.threshold) if cfg.threshold is not None else float(combine(thresholds, cfg.weights))


def member_answer(name: str, p: float, threshold: float, temperature: float, version: dict) -> dict:
    return {"adapter": name, "label": label(p, threshold), "p_fake": float(p),
            "p_real": 1.0 - float(p), "threshold": threshold, "temperature": temperature,
            "model": version}


def ensemble_answer(members: dict[str, dict], failed: dict[str, str], cfg: EnsembleConfig) -> dict:
    """The ensemble's answer from its members' answers (each from `member_answer`)."""
    p = float(combine({n: m["p_fake"] for n, m in members.items()}, cfg.weights))
    threshold = ensemble_threshold({n: m["threshold"] for n, m in members.items()}, cfg)
    return {"adapter": ENSEMBLE, "label": label(p, threshold), "p_fake": p, "p_real": 1.0 - p,
            "threshold": threshold, "rule": "weighted_mean", "weights": {n: cfg.weights.get(n, 1.0) for n in members},
            "degraded": bool(failed), "members_used": sorted(members), "members_failed": failed,
            "members": members}
