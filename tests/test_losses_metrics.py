import math
import warnings

import numpy as np
import pytest
import torch

from aigd import metrics as M
from aigd.decision import p_fake
from aigd.losses import answer_cross_entropy, binary_focal


def test_focal_matches_hand_computation():
    pair = torch.tensor([[0.0, 1.0], [2.0, 0.5]])
    labels = torch.tensor([1, 0])
    p_fake_0 = 1 / (1 + math.exp(-1.0))  # row 0 is fake, p_t = P(fake)
    p_real_1 = 1 / (1 + math.exp(-1.5))  # row 1 is real, p_t = P(real)
    fl0 = -0.75 * (1 - p_fake_0) ** 2 * math.log(p_fake_0)
    fl1 = -0.25 * (1 - p_real_1) ** 2 * math.log(p_real_1)
    assert abs(binary_focal(pair, labels, 0.75, 2.0).item() - (fl0 + fl1) / 2) < 1e-6
    # gamma 0 and alpha 0.5 is half the two-way cross-entropy
    ce = torch.nn.functional.cross_entropy(pair, labels).item()
    assert abs(binary_focal(pair, labels, 0.5, 0.0).item() - ce / 2) < 1e-6


def test_answer_cross_entropy_uses_full_vocabulary_at_the_label_token():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]])
    ids = (2, 3)  # Real -> token 2, Fake -> token 3
    labels = torch.tensor([0, 1])
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    want = ((lse[0] - 0.5) + (lse[1] - 1.0)) / 2
    assert abs(answer_cross_entropy(logits, labels, ids).item() - want) < 1e-6


def test_auc_ap_and_confusion_on_hand_made_predictions():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert M.roc_auc(y, p) == 0.75
    assert M.roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert abs(M.average_precision(y, p) - (1 + 2 / 3) / 2) < 1e-9
    m = M.binary_metrics(y, p)
    assert m["confusion"] == {"tn": 2, "fp": 0, "fn": 1, "tp": 1} and m["accuracy"] == 0.75
    assert abs(m["f1"] - 2 / 3) < 1e-9


def test_ece_and_brier():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.9, 0.1, 0.1])
    assert abs(M.ece(y, p) - 0.4) < 1e-9  # two bins, each |0.9-0.5| and |0.1-0.5|
    assert abs(M.brier(y, p) - (0.01 + 0.81 + 0.81 + 0.01) / 4) < 1e-9


def test_auc_and_ap_are_sklearns_order_free_under_ties_and_nan_on_one_class():
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.array([1, 0, 1, 0, 1, 1, 0, 0])
    p = np.array([0.9, 0.9, 0.7, 0.7, 0.7, 0.4, 0.4, 0.1])  # ties within and across classes
    assert M.average_precision(y, p) == pytest.approx(average_precision_score(y, p))
    assert M.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    rng = np.random.default_rng(0)
    for _ in range(5):
        i = rng.permutation(len(y))
        assert M.average_precision(y[i], p[i]) == pytest.approx(M.average_precision(y, p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(M.roc_auc([1, 1], [0.2, 0.8])) and math.isnan(M.average_precision([0, 0], [0.2, 0.8]))
        assert math.isnan(M.average_precision([1, 1], [0.2, 0.8]))


def _separable_sample(n=300):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    return y, np.clip(y * 0.3 + rng.random(n) * 0.7, 0, 1)


def test_bootstrap_intervals_cover_the_point_estimates_and_repeat_for_a_seed():
    y, p = _separable_sample()
    keys = ("accuracy", "f1", "roc_auc", "recall_fake", "recall_real", "average_precision")
    cis = M.bootstrap_cis(y, p, 0.5, keys, n_boot=100)
    point = M.binary_metrics(y, p, 0.5)
    for k in keys:
        lo, hi = cis[k]
        assert lo <= point[k] <= hi and hi - lo < 0.2 and round(lo, 4) == lo, k
    assert M.bootstrap_cis(y, p, 0.5, keys, n_boot=100) == cis
    assert M.bootstrap_cis(y, p, 0.5, keys, n_boot=100, seed=1) != cis
    with pytest.raises(ValueError, match="brier"):
        M.bootstrap_cis(y, p, keys=("brier",))


def test_bootstrap_draws_one_index_per_resample_for_every_key():
    y, p = _separable_sample(120)
    keys = ("accuracy", "f1", "roc_auc", "recall_real")
    rng = np.random.default_rng(7)
    draws = {k: [] for k in keys}
    for _ in range(50):
        i = rng.integers(0, len(y), len(y))
        m = M.binary_metrics(y[i], p[i], 0.4)
        for k in keys:
            draws[k].append(m[k])
    want = {k: [round(float(q), 4) for q in np.quantile(v, [0.05, 0.95])] for k, v in draws.items()}
    assert M.bootstrap_cis(y, p, 0.4, keys, n_boot=50, level=0.9, seed=7) == want


def test_temperature_fit_lowers_ece_of_overconfident_scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    d = (2 * y - 1) * 1.0 + rng.normal(0, 1.5, 2000)  # true logit difference
    z = np.stack([np.zeros_like(d), 6 * d], axis=1)  # six times over-confident
    t = M.fit_temperature(z, y)
    assert 4 < t < 8
    assert M.ece(y, p_fake(z, t)) < M.ece(y, p_fake(z)) / 2
    fitted = M.fit_calibration(z, y, target_fpr=0.05)  # the one fit export and evaluation write
    assert fitted["temperature"] == t and fitted["ece_after"] < fitted["ece_before"] / 2
    assert np.mean(p_fake(z, t)[y == 0] >= fitted["threshold_at_target_fpr"]) <= 0.05


def test_decision_rules_are_the_ones_every_scorer_uses():
    from aigd.config import EnsembleConfig
    from aigd.decision import Rule, combine, ensemble_answer, ensemble_rule, member_answer

    z = np.array([[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(p_fake(z, 2.0), [1 / (1 + np.exp(-0.5)), 1 / (1 + np.exp(0.5))])
    assert Rule(0.5).label(0.5) == "fake" and Rule(0.5).label(0.49) == "real"
    assert list(Rule(0.6).label(np.array([0.2, 0.7]))) == ["real", "fake"]
    weighted = EnsembleConfig(weights={"a": 3.0})
    assert combine({"a": 0.8, "b": 0.4}, weighted.weights) == (3 * 0.8 + 0.4) / 4
    assert ensemble_rule({"a": Rule(0.4), "b": Rule(0.6)}, weighted).threshold == (3 * 0.4 + 0.6) / 4
    assert ensemble_rule({"a": Rule(0.4), "b": Rule(0.6)}, EnsembleConfig(threshold=0.9)).threshold == 0.9
    members = {n: member_answer(n, p, Rule(t), 1.0, {}) for n, p, t in (("a", 0.8, 0.4), ("b", 0.4, 0.6))}
    answer = ensemble_answer(members, {}, weighted)
    assert answer["p_fake"] == pytest.approx(0.7) and answer["threshold"] == pytest.approx(0.45)
    assert answer["label"] == "fake" and answer["members_used"] == ["a", "b"] and not answer["degraded"]
    with pytest.raises(ValueError, match="sum to 0"):
        combine({"a": 1.0}, {"a": 0.0})


def test_accuracy_threshold_undoes_a_bias_that_a_temperature_cannot():
    from aigd.metrics import accuracy_threshold, binary_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    p = 1 / (1 + np.exp(-((2 * y - 1) * 1.5 + rng.normal(0, 1, 2000) + 2.0)))  # every score pushed toward Fake
    t = accuracy_threshold(y, p)
    assert t > 0.8
    assert binary_metrics(y, p, t)["accuracy"] > binary_metrics(y, p, 0.5)["accuracy"] + 0.2
    assert accuracy_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.5  # ties resolve to the nearest to 0.5


def test_optim_loss_names_the_loss_from_one_table():
    from aigd.config import OptimConfig
    from aigd.losses import LOSSES, loss_fn

    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]])
    labels, ids = torch.tensor([0, 1]), (2, 3)
    assert set(LOSSES) == {"ce", "focal"}
    assert loss_fn(OptimConfig(loss="ce"))(logits, labels, ids) == answer_cross_entropy(logits, labels, ids)
    focal = loss_fn(OptimConfig(loss="focal", focal_alpha=0.6, focal_gamma=1.0))(logits, labels, ids)
    assert focal == binary_focal(logits[:, [2, 3]], labels, 0.6, 1.0)


def test_uncertain_band_keeps_the_precision_of_both_answers_and_every_scorer_applies_it():
    from aigd.config import EnsembleConfig
    from aigd.decision import Rule, ensemble_rule

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    p = 1 / (1 + np.exp(-((2 * y - 1) * 1.2 + rng.normal(0, 1.0, 4000))))  # overlapping classes
    lo, hi = M.uncertain_band(y, p, 0.5, precision=0.95)
    assert lo < 0.5 < hi
    assert (y[p >= hi] == 1).mean() >= 0.95 and (y[p < lo] == 0).mean() >= 0.95
    plain = M.binary_metrics(y, p, 0.5)
    banded = M.binary_metrics(y, p, 0.5, (lo, hi))
    assert 0.2 < banded["coverage"] < 0.95 and banded["covered_accuracy"] > plain["accuracy"] + 0.05
    rule = Rule(0.5, (lo, hi))
    assert rule.label(hi) == "fake" and rule.label(lo - 1e-9) == "real" and rule.label(0.5) == "uncertain"
    assert list(rule.label(np.array([0.0, 0.5, 1.0]))) == ["real", "uncertain", "fake"]
    assert Rule(0.9, (0.3, 0.6)).band == (0.3, 0.9)  # an overriding threshold stays inside its band
    both = ensemble_rule({"a": Rule(0.4, (0.2, 0.6)), "b": Rule(0.6, (0.4, 0.8))}, EnsembleConfig(weights={"a": 3}))
    assert both.threshold == pytest.approx(0.45) and both.band == pytest.approx((0.25, 0.65))
    assert ensemble_rule({"a": Rule(0.4, (0.2, 0.6)), "b": Rule(0.6)}, EnsembleConfig()).band is None
    fitted = M.fit_calibration(np.stack([np.zeros_like(p), np.log(p / (1 - p))], 1), y)
    assert fitted["uncertain_band"][0] <= fitted["threshold"] <= fitted["uncertain_band"][1]
