"""Binary detection metrics (fake = positive class), calibration, and bootstrap intervals. numpy only."""

from __future__ import annotations

import numpy as np

from aigd.decision import UNCERTAIN, Rule, p_fake


def confusion(y: np.ndarray, pred: np.ndarray) -> dict:
    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    return {"tn": int(((y == 0) & (pred == 0)).sum()), "fp": int(((y == 0) & (pred == 1)).sum()),
            "fn": int(((y == 1) & (pred == 0)).sum()), "tp": int(((y == 1) & (pred == 1)).sum())}


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney U with average ranks for ties; nan when one class is absent."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    n1, n0 = int(y.sum()), int((1 - y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sorted_p = p[order]
    i = 0
    while i < len(p):
        j = i
        while j + 1 < len(p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-p, kind="mergesort")
    y = y[order]
    tp = np.cumsum(y)
    precision = tp / np.arange(1, len(y) + 1)
    return float((precision * y).sum() / y.sum())


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


def bootstrap_ci(y, p, metric: str, n_boot: int = 200, level: float = 0.95, seed: int = 0,
                 threshold: float = 0.5) -> tuple[float, float]:
    y, p = np.asarray(y), np.asarray(p)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        v = binary_metrics(y[i], p[i], threshold)[metric]
        if not np.isnan(v):
            vals.append(v)
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


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
