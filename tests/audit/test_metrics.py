"""Metrics against hand-computed cases and brute force."""

import time

import numpy as np
import pytest

from gradaudit.audit.metrics import (auroc, auroc_ci, balanced_accuracy, paired_auroc_difference, roc_curve, summary,
                               tpr_at_fpr, tpr_at_fpr_ci)


def _brute_auroc(pos, neg):
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auroc_by_hand_and_with_ties():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0
    assert auroc([2, 2], [2, 2]) == 0.5
    assert auroc([1, 3], [2]) == 0.5  # one win, one loss
    assert auroc([2, 3], [2, 1]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 31).astype(float)
    assert auroc(pos, neg) == pytest.approx(_brute_auroc(pos, neg))


def test_tpr_at_fpr_needs_enough_negatives():
    assert tpr_at_fpr([1.0], np.arange(99.0), 0.1) is None  # 10/0.1 = 100 negatives needed
    neg = np.arange(100.0)  # 0..99: at 10% FPR the threshold is the 11th highest, 89
    pos = np.array([95.0, 90.0, 89.5, 89.0, 10.0])
    assert tpr_at_fpr(pos, neg, 0.1) == pytest.approx(3 / 5)  # scores strictly above 89
    assert ((neg > 89).mean()) <= 0.1


def test_roc_curve_and_balanced_accuracy():
    fpr, tpr = roc_curve([0.9, 0.8, 0.3], [0.7, 0.2])
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc([0.9, 0.8, 0.3], [0.7, 0.2]))
    assert balanced_accuracy([0.9, 0.8, 0.3], [0.7, 0.2], 0.5) == pytest.approx(0.5 * (2 / 3 + 1 / 2))


def test_bootstrap_interval_covers_and_is_fast():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(0.5, 1, 1000), rng.normal(0.0, 1, 1000)
    t = time.perf_counter()
    value, low, high = auroc_ci(pos, neg, n_boot=10_000)
    elapsed = time.perf_counter() - t
    assert low < value < high and 0.6 < value < 0.7 and high - low < 0.06
    assert elapsed < 5.0, elapsed  # 10,000 resamples of 2,000 scores; about a second on 2 slow cores
    # the vectorised resamples agree with a plain loop on a few of them
    from gradaudit.audit.metrics import _bootstrap_aurocs

    boots = _bootstrap_aurocs([pos], [neg], 5, seed=3)[0]
    r = np.random.default_rng(3)
    ip, ineg = r.integers(0, 1000, (5, 1000)), r.integers(0, 1000, (5, 1000))
    for b in range(5):
        assert boots[b] == pytest.approx(auroc(pos[ip[b]], neg[ineg[b]]))


def test_paired_difference_sees_a_small_real_gain():
    rng = np.random.default_rng(2)
    base_pos, base_neg = rng.normal(0.3, 1, 800), rng.normal(0, 1, 800)
    better_pos = base_pos + 0.3  # the same probes, members pushed up
    diff, low, high = paired_auroc_difference(better_pos, base_neg, base_pos, base_neg, n_boot=2000)
    assert diff > 0 and low > 0
    diff, low, high = paired_auroc_difference(base_pos, base_neg, base_pos, base_neg, n_boot=500)
    assert diff == 0 and low == high == 0
    with pytest.raises(ValueError, match="same probes"):
        paired_auroc_difference(base_pos[:5], base_neg, base_pos, base_neg)


def test_tpr_interval_agrees_with_a_plain_loop_and_covers_the_truth():
    rng = np.random.default_rng(4)
    pos, neg = rng.normal(2.0, 1, 600), rng.normal(0.0, 1, 1000)
    value, low, high = tpr_at_fpr_ci(pos, neg, 0.01, n_boot=400, seed=5)
    assert value == tpr_at_fpr(pos, neg, 0.01) and low < value < high
    truth = 1 - 0.5 * (1 + np.vectorize(__import__("math").erf)((2.326 - 2.0) / np.sqrt(2)))  # Φ(2 − z_0.99)
    assert low < truth < high
    r = np.random.default_rng(5)  # the same resamples, drawn in the same order, one at a time
    ineg, ipos = r.integers(0, 1000, (400, 1000)), r.integers(0, 600, (400, 600))
    loop = [tpr_at_fpr(pos[ipos[b]], neg[ineg[b]], 0.01) for b in range(400)]
    assert (low, high) == pytest.approx((np.quantile(loop, 0.025), np.quantile(loop, 0.975)))
    assert tpr_at_fpr_ci(pos, neg[:999], 0.01) is None


def test_summary_and_bad_input():
    s = summary(np.arange(20.0) + 5, np.arange(200.0) / 10, n_boot=200)
    assert s["tpr_at_0.01_fpr"] is None and s["tpr_at_0.05_fpr"] is not None and s["n_nonmembers"] == 200
    with pytest.raises(ValueError, match="NaN"):
        auroc([np.nan], [1.0])
    with pytest.raises(ValueError, match="empty"):
        auroc([], [1.0])
