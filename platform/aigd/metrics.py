"""Binary detection metrics (fake = positive class), calibration, and bootstrap intervals.

Ranking metrics and the confusion matrix come from scikit-learn; calibration, the thresholds and
the uncertain band are ours (no library fits them the way the manifest needs)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from aigd.decision import UNCERTAIN, Rule, p_fake


def confusion(y: np.ndarray, pred: np.ndarray) -> dict:
    tn, fp, fn, tp = confusion_matrix(np.asarray(y).astype(int), np.asarray(pred).astype(int), labels=[0, 1]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


def _two_classes(y: np.ndarray) -> bool:
    # sklearn raises (AUC) or warns and answers 0 (AP) on one class: both are undefined there
    return len(np.unique(y)) == 2


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """nan when one class is absent."""
    y = np.asarray(y).astype(int)
    return float(roc_auc_score(y, np.asarray(p, dtype=np.float64))) if _two_classes(y) else float("nan")


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Step-wise AP (tied scores form one threshold, so input order does not matter); nan when one
    class is absent."""
    y = np.asarray(y).astype(int)
    return float(average_precision_score(y, np.asarray(p, dtype=np.float64))) if _two_classes(y) else float("nan")


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of P(fake), equal-width bins."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    return float(total / len(p))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2))


def binary_metrics(y, p, threshold: float = 0.5, band: tuple[float, float] | None = None) -> dict:
    """Metrics at the threshold; with an uncertain band also the coverage (share answered real or
    fake) and the accuracy on that covered share."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    c = confusion(y, p >= threshold)
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": int(len(y)), "accuracy": (tp + tn) / len(y) if len(y) else float("nan"),
        "precision": precision, "recall_fake": recall,
        "recall_real": tn / (tn + fp) if tn + fp else 0.0,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "roc_auc": roc_auc(y, p), "average_precision": average_precision(y, p),
        "ece": ece(y, p), "brier": brier(y, p), "confusion": c, "threshold": threshold,
        **(coverage(y, p, Rule(threshold, band)) if band is not None else {}),
    }


def coverage(y, p, rule: Rule) -> dict:
    labels = rule.label(np.asarray(p, dtype=np.float64))
    covered = labels != UNCERTAIN
    correct = (labels == "fake") == (np.asarray(y) == 1)
    return {"coverage": float(covered.mean()) if len(labels) else float("nan"),
            "covered_accuracy": float(correct[covered].mean()) if covered.any() else float("nan"),
            "uncertain_band": list(rule.band)}


def uncertain_band(y, p, threshold: float, precision: float) -> tuple[float, float]:
    """[lo, hi) around the threshold: the smallest hi whose "fake" answers (p >= hi) and the largest
    lo whose "real" answers (p < lo) keep `precision` on these (validation) scores. A side that never
    reaches it answers nothing (hi above 1, or lo 0): its whole range is uncertain."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    cands = np.unique(p)
    hi = next((float(t) for t in cands[cands >= threshold]
               if (y[p >= t] == 1).mean() >= precision), float(np.nextafter(1.0, 2.0)))
    lo_cands = np.unique(np.append(cands[cands <= threshold], threshold))
    lo = next((float(t) for t in lo_cands[::-1]
               if (p < t).any() and (y[p < t] == 0).mean() >= precision), 0.0)
    return min(lo, threshold), max(hi, threshold)


def _rate(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else float("nan")


def _f1(y: np.ndarray, p: np.ndarray, t: float) -> float:
    called = p >= t
    denom = called.sum() + y.sum()  # 2tp + fp + fn
    return float(2 * (called & (y == 1)).sum() / denom) if denom else 0.0


# what a resample needs of each key, nothing more; nan where the draw leaves it undefined
_RESAMPLED = {
    "accuracy": lambda y, p, t: float(np.mean((p >= t) == y)),
    "f1": _f1,
    "recall_fake": lambda y, p, t: _rate(p[y == 1] >= t),
    "recall_real": lambda y, p, t: _rate(p[y == 0] < t),
    "roc_auc": lambda y, p, t: roc_auc(y, p),
    "average_precision": lambda y, p, t: average_precision(y, p),
}


def bootstrap_cis(y, p, threshold: float = 0.5, keys=("accuracy", "f1", "roc_auc"), n_boot: int = 200,
                  level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile intervals {key: [lo, hi]}. Each resample draws one index that every key is computed
    on; a draw that leaves a key undefined (one class: AUC, AP, a recall) is skipped for that key."""
    unknown = set(keys) - set(_RESAMPLED)
    if unknown:
        raise ValueError(f"no bootstrap for {sorted(unknown)}; known: {sorted(_RESAMPLED)}")
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in keys}
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        for k in keys:
            draws[k].append(_RESAMPLED[k](y[i], p[i], threshold))
    return {k: _percentiles(v, level) for k, v in draws.items()}


def _percentiles(values: list[float], level: float) -> list[float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not len(v):
        return [float("nan"), float("nan")]
    return [round(float(q), 4) for q in np.quantile(v, [(1 - level) / 2, 1 - (1 - level) / 2])]


def fit_temperature(pair_logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising the NLL of the two-way softmax (golden-section on log T)."""
    z = np.asarray(pair_logits, dtype=np.float64)
    d = z[:, 1] - z[:, 0]
    y = np.asarray(y, dtype=np.float64)

    def nll(log_t: float) -> float:
        s = d / np.exp(log_t)
        return float(np.mean(np.logaddexp(0, s) - y * s))

    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(80):
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    return float(np.exp((lo + hi) / 2))


def threshold_at_fpr(y, p, target_fpr: float) -> float:
    """Smallest threshold whose false-positive rate on reals is at most `target_fpr`."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    reals = np.sort(p[y == 0])[::-1]
    if len(reals) == 0:
        return 0.5
    k = int(np.floor(target_fpr * len(reals)))
    return float(np.nextafter(reals[k], 1.0)) if k < len(reals) else 0.0


def accuracy_threshold(y, p) -> float:
    """Decision threshold with the highest accuracy (ties: the one nearest 0.5).

    A temperature rescales the logit gap but cannot move a bias: focal loss with alpha on Fake
    shifts every score toward Fake, so the threshold must be fitted too.
    """
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return 0.5
    s = np.unique(p)
    candidates = np.concatenate([[0.5], (s[1:] + s[:-1]) / 2]) if len(s) > 1 else np.asarray([0.5])
    acc = np.asarray([np.mean((p >= t) == y) for t in candidates])
    best = np.flatnonzero(acc == acc.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def fit_calibration(pair_logits, y, target_fpr: float = 0.05, band_precision: float = 0.95) -> dict:
    """The one calibration fit (export and evaluation): a temperature on the NLL, then the decision
    threshold with the best accuracy, the one at `target_fpr` and the uncertain band at
    `band_precision`, all on the same (validation) scores."""
    z, y = np.asarray(pair_logits, dtype=np.float64), np.asarray(y).astype(int)
    temperature = fit_temperature(z, y) if len(np.unique(y)) == 2 else 1.0
    p = p_fake(z, temperature)
    threshold = accuracy_threshold(y, p)
    return {"temperature": temperature, "threshold": threshold,
            "threshold_rule": "max validation accuracy", "target_fpr": target_fpr,
            "threshold_at_target_fpr": threshold_at_fpr(y, p, target_fpr),
            "uncertain_band": list(uncertain_band(y, p, threshold, band_precision)), "band_precision": band_precision,
            "ece_before": ece(y, p_fake(z)), "ece_after": ece(y, p), "n": int(len(y))}
