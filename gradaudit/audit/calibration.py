"""From scores to probabilities and a dataset-level answer (docs/protocol.md), on plain arrays.

* :class:`Calibrator` — a two-component mixture whose components are fitted on labelled out-of-fold
  reference scores (members, non-members): a kernel density per class by default, one Gaussian per class
  on request (``shape="normal"``; benchmarks/results/calibration_shape_tiny.md compares them);
  P(member | S) at a collection's own prior,
  estimated by EM on the mixing weight with the components fixed (Saerens et al., 2002); the exposure
  rate is that estimate, with a bootstrap interval.
* :func:`collection_test` — one-sided Mann–Whitney U of a collection's scores against reference
  non-members' (out-of-fold) scores: p-value, effect size, and the collection size at which a
  collection of members would reach p < 0.05 with 80% power on the reference data.
"""

from __future__ import annotations

import math

import numpy as np

from gradaudit.audit.metrics import auroc


def _scores(name, values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0 or not np.isfinite(a).all():
        raise ValueError(f"{name} must be a non-empty array of finite scores")
    return a


def _normal_logpdf(x, mean, std):
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))


SHAPES = ("normal", "kde")


class Calibrator:
    """Class models of the scores: ``shape="kde"`` (the default) a Gaussian kernel density per class
    (``scipy.stats.gaussian_kde``, Scott's bandwidth), for scores whose shape is not normal; ``"normal"``
    one Gaussian per class, the audit's model until 2026-12-06 (benchmarks/calibration_shape.py measures
    both: on the demo's model the densities cut the calibration error on collections of 0–30% members
    from 0.16–0.29 to 0.05–0.10 and do worse at 50–90%). Fitted attributes: ``member_``
    and ``nonmember_`` as (mean, std) of each class, ``reference_prior_`` the members' share of the
    reference scores."""

    def __init__(self, shape: str = "kde"):
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}; got {shape!r}")
        self.shape = shape

    def fit(self, member_scores, nonmember_scores) -> Calibrator:
        pos, neg = _scores("member_scores", member_scores), _scores("nonmember_scores", nonmember_scores)
        spread = np.concatenate([pos, neg]).std() or 1.0
        floor = 1e-3 * spread  # a component never collapses to a point
        self.member_ = (float(pos.mean()), float(max(pos.std(), floor)))
        self.nonmember_ = (float(neg.mean()), float(max(neg.std(), floor)))
        self.reference_prior_ = pos.size / (pos.size + neg.size)
        if self.shape == "kde":
            from scipy.stats import gaussian_kde

            # a class of fewer than 2 distinct scores has no kernel density: the normal model stands in
            usable = all(a.size >= 2 and a.std() > 0 for a in (pos, neg))
            self.kdes_ = tuple(gaussian_kde(a) for a in (pos, neg)) if usable else None
        return self

    def _log_ratio(self, s):
        """log f_member(s) − log f_nonmember(s), bounded at ±50 (far outside both classes' scores)."""
        if self.shape == "kde" and getattr(self, "kdes_", None) is not None:
            return np.clip(self.kdes_[0].logpdf(s) - self.kdes_[1].logpdf(s), -50, 50)
        return _normal_logpdf(s, *self.member_) - _normal_logpdf(s, *self.nonmember_)

    def predict_proba(self, scores, prior: float | None = None) -> np.ndarray:
        """P(member | score) for a collection whose member share is ``prior`` (default: the reference's)."""
        prior = self.reference_prior_ if prior is None else prior
        s = _scores("scores", scores)
        if prior <= 0 or prior >= 1:
            return np.full(s.shape, float(prior >= 1))
        logit = self._log_ratio(s) + math.log(prior / (1 - prior))
        return 1.0 / (1.0 + np.exp(-np.clip(logit, -700, 700)))

    def estimate_prior(self, scores, iterations: int = 500, tol: float = 1e-8) -> float:
        """The collection's member share by EM on the mixing weight, the components held fixed."""
        return _em_prior(self._log_ratio(_scores("scores", scores)), iterations, tol)

    def exposure(self, scores, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 reference: tuple | None = None) -> tuple[float, float, float]:
        """Estimated member share of a collection with a percentile bootstrap interval over its pairs.
        ``reference`` = (member_scores, nonmember_scores) the components came from: each resample then
        refits them on resampled reference scores too, so the interval carries their uncertainty.

        With kernel densities, a resample's density is the same kernels weighted by how often each
        reference score was drawn, at the full fit's bandwidths: one kernel matrix per class, computed
        once, then a matrix-vector product per resample (refitting ``gaussian_kde`` 1000 times took
        15 s on the demo's 600 reference and 500 audited scores; this takes well under one)."""
        s = _scores("scores", scores)
        rng = np.random.default_rng(seed)
        if reference is not None:
            pos, neg = (np.asarray(r, dtype=np.float64) for r in reference)
        kernels = self._kernels(s, (pos, neg)) if reference is not None else None
        boots = []
        for _ in range(n_boot):
            if reference is None:
                boots.append(self.estimate_prior(s[rng.integers(0, s.size, s.size)]))
                continue
            draw_m, draw_n = rng.integers(0, pos.size, pos.size), rng.integers(0, neg.size, neg.size)
            rows = rng.integers(0, s.size, s.size)
            if kernels is None:
                cal = Calibrator(self.shape).fit(pos[draw_m], neg[draw_n])
                boots.append(cal.estimate_prior(s[rows]))
                continue
            logf = [np.log(e[rows] @ np.bincount(d, minlength=e.shape[1])) + top[rows]
                    for (e, top), d in zip(kernels, (draw_m, draw_n))]
            with np.errstate(invalid="ignore"):
                ratio = np.nan_to_num(np.clip(logf[0] - logf[1], -50, 50))
            boots.append(_em_prior(ratio))
        half = (1 - level) / 2
        return self.estimate_prior(s), float(np.quantile(boots, half)), float(np.quantile(boots, 1 - half))

    def _kernels(self, s, reference):
        """Per class (E, top) with E[i, j] = exp(logK(s_i, r_j) − top_i) at the fitted bandwidth, so that
        the class's log-density at s_i under reference counts c is log(E[i] @ c) + top_i (the constant
        −log(n·h·√2π) is the same for every resample of a class and cancels in the EM's ratio up to a
        class constant, kept in top). None unless the class models are kernel densities."""
        if self.shape != "kde" or getattr(self, "kdes_", None) is None:
            return None
        out = []
        for r, kde in zip(reference, self.kdes_):
            h = float(np.sqrt(kde.covariance[0, 0]))
            log_k = -0.5 * ((s[:, None] - r[None, :]) / h) ** 2 - math.log(r.size * h * math.sqrt(2 * math.pi))
            top = log_k.max(axis=1)
            out.append((np.exp(log_k - top[:, None]), top))
        return out


def _em_prior(ratio: np.ndarray, iterations: int = 500, tol: float = 1e-8) -> float:
    """The member share by EM on the mixing weight, given each score's log-likelihood ratio."""
    prior = 0.5
    for _ in range(iterations):
        logit = ratio + math.log(prior / (1 - prior))
        new = float(np.mean(1.0 / (1.0 + np.exp(-np.clip(logit, -700, 700)))))
        new = min(max(new, 1e-6), 1 - 1e-6)
        if abs(new - prior) < tol:
            return new
        prior = new
    return prior


def mann_whitney_greater(x, y) -> float:
    """One-sided p-value that x tends to exceed y (normal approximation, tie and continuity corrected)."""
    x, y = _scores("x", x), _scores("y", y)
    n, m = x.size, y.size
    values, inverse, counts = np.unique(np.concatenate([x, y]), return_inverse=True, return_counts=True)
    midrank = np.cumsum(counts) - (counts - 1) / 2.0
    u = midrank[inverse[:n]].sum() - n * (n + 1) / 2
    total = n + m
    var = n * m / 12.0 * ((total + 1) - (counts**3 - counts).sum() / (total * (total - 1)))
    if var <= 0:
        return 0.5
    z = (u - n * m / 2 - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))


def collection_test(collection_scores, nonmember_scores, member_scores=None, alpha: float = 0.05,
                    power: float = 0.8, n_sim: int = 200, seed: int = 0) -> dict:
    """Does a collection contain members? One-sided Mann–Whitney U against reference non-members.

    Returns p_value, effect_size (AUROC of the collection against the non-members: 0.5 = no sign) and,
    given reference member scores, ``size_needed``: the smallest collection of members (drawn from
    ``member_scores``) that reaches p < alpha in ``power`` of ``n_sim`` simulations, or None if even
    2,048 pairs do not.
    """
    coll, neg = _scores("collection_scores", collection_scores), _scores("nonmember_scores", nonmember_scores)
    out = {"p_value": mann_whitney_greater(coll, neg), "effect_size": auroc(coll, neg), "size": int(coll.size),
           "size_needed": None}
    if member_scores is not None:
        pos = _scores("member_scores", member_scores)
        rng = np.random.default_rng(seed)

        def reaches(n):
            hits = sum(mann_whitney_greater(pos[rng.integers(0, pos.size, n)], neg) < alpha for _ in range(n_sim))
            return hits >= power * n_sim

        n = 1
        while n <= 2048 and not reaches(n):
            n *= 2
        if n <= 2048:
            low, high = n // 2, n  # the smallest power of two that reaches it, then bisect
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (low, mid) if reaches(mid) else (mid, high)
            out["size_needed"] = high
    return out
