"""Membership metrics on plain arrays, with the reporting rules of docs/protocol.md.

Every score follows one direction: higher = member. ``pos`` are members' scores, ``neg`` non-members'.
"""

from __future__ import annotations

import numpy as np

FPRS = (0.001, 0.01, 0.05, 0.1)


def _as_1d(name: str, values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty: AUROC needs members and non-members")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite scores")
    return a


def auroc(pos, neg) -> float:
    """P(member score > non-member score) + ½ P(equal): the Mann–Whitney statistic, ties as halves."""
    pos, neg = _as_1d("pos", pos), _as_1d("neg", neg)
    values, inverse = np.unique(np.concatenate([pos, neg]), return_inverse=True)
    neg_counts = np.bincount(inverse[pos.size :], minlength=values.size)
    below = np.cumsum(neg_counts) - neg_counts  # non-members strictly below each value
    u = inverse[: pos.size]
    return float((below[u] + 0.5 * neg_counts[u]).sum() / (pos.size * neg.size))


def tpr_at_fpr(pos, neg, fpr: float) -> float | None:
    """True-positive rate at a false-positive rate of at most ``fpr``; None unless there are at least
    10/fpr non-members (TPR at 1% needs ≥ 1000), where the estimate means little."""
    pos, neg = _as_1d("pos", pos), _as_1d("neg", neg)
    if neg.size < 10 / fpr - 1e-9:
        return None
    allowed = int(np.floor(fpr * neg.size))  # false positives allowed
    threshold = np.sort(neg)[::-1][allowed] if allowed < neg.size else -np.inf
    return float((pos > threshold).mean())


def roc_curve(pos, neg) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    pos, neg = _as_1d("pos", pos), _as_1d("neg", neg)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]

    def at_or_above(scores):  # fraction of scores ≥ each threshold
        return np.searchsorted(np.sort(-scores), -thresholds, side="right") / scores.size

    fpr, tpr = at_or_above(neg), at_or_above(pos)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def balanced_accuracy(pos, neg, threshold: float) -> float:
    """Mean of the true-positive and true-negative rates when score ≥ threshold reads as member."""
    pos, neg = _as_1d("pos", pos), _as_1d("neg", neg)
    return float(0.5 * ((pos >= threshold).mean() + (neg < threshold).mean()))


def _bootstrap_aurocs(pos_sets: list[np.ndarray], neg_sets: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """AUROCs of stratified resamples (members and non-members resampled apart), the same resamples for
    every method: returns (methods, n_boot). Vectorised over resamples through counts per distinct value."""
    rng = np.random.default_rng(seed)
    n_pos, n_neg = pos_sets[0].size, neg_sets[0].size
    ip = rng.integers(0, n_pos, size=(n_boot, n_pos))
    ineg = rng.integers(0, n_neg, size=(n_boot, n_neg))
    rows = np.arange(n_boot)[:, None]
    out = np.empty((len(pos_sets), n_boot))
    for m, (pos, neg) in enumerate(zip(pos_sets, neg_sets)):
        values, inverse = np.unique(np.concatenate([pos, neg]), return_inverse=True)
        n_values = values.size

        def counts(index):  # (n_boot, values) int32: how often each value was drawn in each resample
            flat = np.bincount((rows * n_values + index).ravel(), minlength=n_boot * n_values)
            return flat.astype(np.int32).reshape(n_boot, n_values)

        neg_counts = counts(inverse[pos.size :][ineg])
        twice_wins = 2 * np.cumsum(neg_counts, axis=1, dtype=np.int32) - neg_counts  # 2·(below + ½·equal)
        pos_counts = counts(inverse[: pos.size][ip])
        out[m] = np.einsum("bv,bv->b", pos_counts, twice_wins, dtype=np.int64) / (2.0 * n_pos * n_neg)
    return out


def auroc_ci(pos, neg, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """AUROC and its stratified-bootstrap percentile interval: (auroc, low, high)."""
    pos, neg = _as_1d("pos", pos), _as_1d("neg", neg)
    boots = _bootstrap_aurocs([pos], [neg], n_boot, seed)[0]
    half = (1 - level) / 2
    return auroc(pos, neg), float(np.quantile(boots, half)), float(np.quantile(boots, 1 - half))


def paired_auroc_difference(pos_a, neg_a, pos_b, neg_b, n_boot: int = 10_000, level: float = 0.95,
                            seed: int = 0) -> tuple[float, float, float]:
    """AUROC(a) − AUROC(b) on the same probes (position i of a and of b is the same pair), with the
    paired stratified-bootstrap interval: (difference, low, high)."""
    pos_a, neg_a = _as_1d("pos_a", pos_a), _as_1d("neg_a", neg_a)
    pos_b, neg_b = _as_1d("pos_b", pos_b), _as_1d("neg_b", neg_b)
    if pos_a.size != pos_b.size or neg_a.size != neg_b.size:
        raise ValueError("a paired comparison needs both methods' scores on the same probes")
    boots = _bootstrap_aurocs([pos_a, pos_b], [neg_a, neg_b], n_boot, seed)
    diff = boots[0] - boots[1]
    half = (1 - level) / 2
    return (auroc(pos_a, neg_a) - auroc(pos_b, neg_b), float(np.quantile(diff, half)),
            float(np.quantile(diff, 1 - half)))


def tpr_at_fpr_ci(pos, neg, fpr: float, n_boot: int = 10_000, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float, float] | None:
    """TPR at ``fpr`` with its stratified-bootstrap percentile interval (the threshold re-read from each
    resample's non-members): (tpr, low, high), or None where :func:`tpr_at_fpr` gives None."""
    value = tpr_at_fpr(pos, neg, fpr)
    if value is None:
        return None
    pos, neg = _as_1d("pos", pos), _as_1d("neg", neg)
    rng = np.random.default_rng(seed)
    allowed = int(np.floor(fpr * neg.size))
    resampled_neg = neg[rng.integers(0, neg.size, size=(n_boot, neg.size))]
    threshold = -np.partition(-resampled_neg, allowed, axis=1)[:, allowed]  # the (allowed+1)-th largest
    resampled_pos = pos[rng.integers(0, pos.size, size=(n_boot, pos.size))]
    boots = (resampled_pos > threshold[:, None]).mean(axis=1)
    half = (1 - level) / 2
    return value, float(np.quantile(boots, half)), float(np.quantile(boots, 1 - half))


def summary(pos, neg, n_boot: int = 10_000, seed: int = 0) -> dict:
    """AUROC and TPR at each of :data:`FPRS`, each with its bootstrap interval (TPR None where the
    negatives do not suffice)."""
    value, low, high = auroc_ci(pos, neg, n_boot, seed=seed)
    out = {"auroc": value, "auroc_ci": [low, high], "n_members": int(np.size(pos)), "n_nonmembers": int(np.size(neg))}
    for f in FPRS:
        tpr = tpr_at_fpr_ci(pos, neg, f, n_boot, seed=seed)
        out[f"tpr_at_{f:g}_fpr"] = None if tpr is None else tpr[0]
        out[f"tpr_at_{f:g}_fpr_ci"] = None if tpr is None else [tpr[1], tpr[2]]
    return out
