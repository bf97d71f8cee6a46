"""Was this collection used to train the model? The collection-level audit (DESIGN.md §2.5,
docs/collection.md), on plain arrays.

Inputs: the suspect collection S, known non-members V drawn from the same distribution as S's unused
part (the user vouches for that), and optionally known members M. Each pair is a vector of features
(:func:`model_features`: every logit baseline, and per weight and axis the mean log slice norm and the
mean cosine with R). Many weak features add up over a collection (Maini et al., 2024).

The test is **sample splitting**, chosen over cross-fitting because its p-value is exact with no
permutation loop: an aggregator (the variants' logistic head: standardised, L2-regularised, its
strength chosen by inner cross-validation) is fitted on one part of the pairs and scores pairs it never saw; a one-sided
Mann–Whitney U test asks whether S's held-out scores exceed V's. The aggregator is a fixed function of
the fitting part, so when S and V are exchangeable the held-out scores of S and of V are too, and the
p-value is valid whatever the aggregator learned. With known members the aggregator learns members
against non-members (half of M against half of V) and every pair of S is tested; without them it learns
half of S against half of V and the other half of S is tested.

Effect size: the held-out AUROC of S against V. Share of S used: S's pairs are a mixture of unused
pairs (distributed as V) and used ones, so AUROC(S, V) − ½ = share × (AUROC(used, V) − ½). With known
members held out of every fit, AUROC(used, V) is estimated on them (assuming S's used pairs look like
M); without them AUROC(used, V) ≤ 1 gives the lower bound 2·(AUROC(S, V) − ½).

The blind guard runs the same test on features that never touch the model (:func:`blind_features`):
text length, the text's zlib ratio, image statistics. If S and V separate without the model they
differ by distribution, not by training (Das et al., 2024), and no conclusion about training is drawn.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import mannwhitneyu

from gradaudit.audit import metrics
from gradaudit.audit.method import SliceSet
from gradaudit.audit.variants import LinearScorer, logistic

ALPHA = 0.05  # the level at which a collection test or the blind guard speaks
GUARD_ALPHA = 0.05
N_BOOT = 2000
TOP_FEATURES = 8


@dataclass
class Features:
    """Per-pair features: ``values`` (n, F) float64, column j named ``names[j]``."""

    names: list[str]
    values: np.ndarray

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.ndim != 2 or self.values.shape[1] != len(self.names):
            raise ValueError(f"features must be (n, {len(self.names)}); got {self.values.shape}")
        if not np.isfinite(self.values).all():
            bad = sorted({self.names[j] for j in np.flatnonzero(~np.isfinite(self.values).all(0))})
            raise ValueError(f"features {bad} hold NaN or infinite values")

    @property
    def n(self) -> int:
        return self.values.shape[0]

    def rows(self, index) -> Features:
        return Features(self.names, self.values[index])


def model_features(pairs: SliceSet) -> Features:
    """The model's view of each pair: every baseline in ``pairs.extra`` (the logit scores and the
    gradient norm), then per weight and axis (rows, columns) the mean log slice norm and the mean
    cosine with R (leave-one-out for a pair that built R)."""
    names = [f"baseline {k}" for k in sorted(pairs.extra)]
    columns = [np.asarray(pairs.extra[k], dtype=np.float64) for k in sorted(pairs.extra)]
    groups, group_names = pairs.groups()
    cosines = pairs.cosines(loo=True)
    norms = np.concatenate([0.5 * np.log(np.concatenate([pairs.row_sq[w], pairs.col_sq[w]], axis=1) + 1e-30)
                            for w in pairs.weights], axis=1)
    for g, name in enumerate(group_names):
        columns += [norms[:, groups == g].mean(1), cosines[:, groups == g].mean(1)]
        names += [f"log norm {name}", f"cosine with R {name}"]
    return Features(names, np.stack(columns, axis=1))


TEXT_STATS = ("text characters", "text words", "text zlib ratio", "text mean word length")


def text_features(texts: list[str]) -> np.ndarray:
    """(n, len(TEXT_STATS)) statistics of the texts alone: length, words, compressibility."""
    rows = []
    for t in texts:
        raw = t.encode("utf-8")
        words = t.split()
        rows.append([len(t), len(words), len(zlib.compress(raw)) / max(len(raw), 1),
                     np.mean([len(w) for w in words]) if words else 0.0])
    return np.array(rows, dtype=np.float64).reshape(len(texts), len(TEXT_STATS))


def blind_features(texts: list[str], image_stats: np.ndarray | None, image_names=()) -> Features:
    """Features that never touch the model: :data:`TEXT_STATS` and, where stored, the image statistics
    (``store.manifest.IMAGE_STATS``)."""
    parts, names = [text_features(texts)], list(TEXT_STATS)
    if image_stats is not None:
        parts.append(np.asarray(image_stats, dtype=np.float64))
        names += [n.replace("_", " ") for n in image_names]
    return Features(names, np.concatenate(parts, axis=1))


def split(ids: list[str], fit_share: float = 0.5, seed: int = 0) -> np.ndarray:
    """(n,) bool: the pairs that fit the aggregator, the rest tested. Each id is ranked by a hash of it
    and the seed, so the split depends on neither the order of the pairs nor the rest of the collection's
    content, and a rerun splits alike; exactly round(n · fit_share) pairs fit."""
    if not 0 < fit_share < 1:
        raise ValueError(f"fit_share must lie in (0, 1); got {fit_share}")
    keys = [hashlib.sha256(f"{seed}\0{pid}".encode()).digest() for pid in ids]
    order = sorted(range(len(ids)), key=keys.__getitem__)
    fit = np.zeros(len(ids), dtype=bool)
    fit[order[:int(round(len(ids) * fit_share))]] = True
    return fit


class Aggregator:
    """The variants' logistic head (``variants.logistic``: standardised features, L2 penalty, its strength
    chosen by inner cross-validation on the fitting pairs only), members (1) against non-members (0).
    ``decision_function`` is the logit, higher = member."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, pos: np.ndarray, neg: np.ndarray) -> Aggregator:
        if min(len(pos), len(neg)) < 2:
            raise ValueError(f"the aggregator needs at least 2 pairs on each side to fit; got {len(pos)} and {len(neg)}")
        x, y = np.concatenate([pos, neg]), np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        self.scorer_ = LinearScorer.of(logistic(self.seed, min(len(pos), len(neg))).fit(x, y))
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return self.scorer_.decision_function(x)

    def weights(self) -> np.ndarray:
        """The weight of each standardised feature: how much it carried the score."""
        return (self.scorer_.components @ self.scorer_.coef.T).ravel()


@dataclass
class CollectionTest:
    """One collection test (model features or the blind guard's). ``scores``: the held-out aggregator
    scores of the tested pairs of S and of V (and of the held-out known members, where given)."""

    p_value: float
    auroc: float
    auroc_ci: list[float]
    design: str  # "known members" or "split collection"
    n_fit: dict[str, int]
    n_test: dict[str, int]
    features: list[dict]
    share: dict | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        out = {k: getattr(self, k) for k in ("p_value", "auroc", "auroc_ci", "design", "n_fit", "n_test", "features")}
        if self.share is not None:
            out["share"] = self.share
        return out


def _carried(agg: Aggregator, names: list[str], pos: np.ndarray, neg: np.ndarray) -> list[dict]:
    """The features with the largest standardised weights, each with its own held-out AUROC."""
    w = agg.weights()
    top = np.argsort(-np.abs(w), kind="stable")[:TOP_FEATURES]
    return [{"feature": names[j], "weight": float(w[j]), "held_out_auroc": metrics.auroc(pos[:, j], neg[:, j])}
            for j in top if w[j] != 0]


def _share(s: np.ndarray, v: np.ndarray, m: np.ndarray | None, seed: int) -> dict:
    """Share of S used, from AUROC(S, V) − ½ = share × (AUROC(used, V) − ½): an estimate with a bootstrap
    interval where held-out known members give AUROC(used, V), else a lower bound (AUROC(used, V) ≤ 1)."""
    rng = np.random.default_rng(seed)
    auc_sv = metrics.auroc(s, v)
    boots_sv = []
    boots_share = []
    for _ in range(N_BOOT):
        bs, bv = s[rng.integers(0, s.size, s.size)], v[rng.integers(0, v.size, v.size)]
        a = metrics.auroc(bs, bv)
        boots_sv.append(a)
        if m is not None:
            am = metrics.auroc(m[rng.integers(0, m.size, m.size)], bv)
            # members no better than V in a resample: the ratio's limit, all used or none, by S's side
            boots_share.append((a - 0.5) / (am - 0.5) if am > 0.5 else float(a > 0.5))
    low_sv = float(np.quantile(boots_sv, ALPHA))  # one-sided 95%
    lower_bound = max(0.0, 2 * (low_sv - 0.5))
    if m is None:
        return {"kind": "lower bound", "estimate": None, "ci": [lower_bound, 1.0],
                "note": "no known members: the share is at least this (95%, one-sided)"}
    auc_mv = metrics.auroc(m, v)
    b = np.array(boots_share)
    if auc_mv <= 0.5:
        return {"kind": "lower bound", "estimate": None, "ci": [lower_bound, 1.0],
                "note": f"the known members do not separate from V (AUROC {auc_mv:.2f}): only a lower bound"}
    b = np.clip(b, 0, 1)
    return {"kind": "estimate", "estimate": float(np.clip((auc_sv - 0.5) / (auc_mv - 0.5), 0, 1)),
            "ci": [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))],
            "note": f"assuming the collection's used pairs look like the known members (their held-out AUROC "
                    f"against V: {auc_mv:.2f})"}


def split_test(collection: Features, nonmembers: Features, collection_ids: list[str], nonmember_ids: list[str],
                    members: Features | None = None, member_ids: list[str] | None = None, seed: int = 0,
                    with_share: bool = True) -> CollectionTest:
    """Whether S (``collection``) holds pairs the model was trained on, against V (``nonmembers``).

    With ``members`` (M): the aggregator fits half of M against half of V; all of S and the other half of
    V are tested; the other half of M gives the share. Without: it fits half of S against half of V and
    tests the other halves; the share is a lower bound. Halves by :func:`split` on the ids."""
    if collection.names != nonmembers.names or (members is not None and members.names != collection.names):
        raise ValueError("the collection, the non-members and the members need the same features")
    v_fit = split(nonmember_ids, seed=seed)
    if members is not None:
        m_fit = split(member_ids, seed=seed)
        design, pos_fit, s_test = "known members", members.rows(m_fit), collection
        m_test = members.rows(~m_fit).values
        n_fit = {"members": int(m_fit.sum()), "nonmembers": int(v_fit.sum())}
    else:
        s_fit = split(collection_ids, seed=seed)
        design, pos_fit, s_test, m_test = "split collection", collection.rows(s_fit), collection.rows(~s_fit), None
        n_fit = {"collection": int(s_fit.sum()), "nonmembers": int(v_fit.sum())}
    v_test = nonmembers.rows(~v_fit)
    if s_test.n == 0 or v_test.n == 0:
        raise ValueError("too few pairs: the test needs held-out pairs of the collection and of the non-members")
    agg = Aggregator(seed).fit(pos_fit.values, nonmembers.rows(v_fit).values)
    s, v = agg.decision_function(s_test.values), agg.decision_function(v_test.values)
    p = float(mannwhitneyu(s, v, alternative="greater").pvalue)
    auc, low, high = metrics.auroc_ci(s, v, n_boot=N_BOOT, seed=seed)
    scores = {"collection": s, "nonmembers": v}
    m = None
    if m_test is not None and len(m_test):
        m = scores["members"] = agg.decision_function(m_test)
    return CollectionTest(
        p_value=p, auroc=auc, auroc_ci=[low, high], design=design, n_fit=n_fit,
        n_test={"collection": s_test.n, "nonmembers": v_test.n, **({"members": int(m.size)} if m is not None else {})},
        features=_carried(agg, collection.names, s_test.values, v_test.values),
        share=_share(s, v, m, seed) if with_share else None, scores=scores)


@dataclass
class CollectionAudit:
    """The collection's answer: the test on the model's features and the blind guard's."""

    test: CollectionTest
    guard: CollectionTest

    @property
    def guard_fired(self) -> bool:
        return self.guard.p_value < GUARD_ALPHA

    def summary(self) -> dict:
        return {"test": self.test.summary(), "blind_guard": dict(self.guard.summary(), fired=self.guard_fired),
                "alpha": ALPHA, "guard_alpha": GUARD_ALPHA}


def audit_collection(collection: Features, nonmembers: Features, collection_blind: Features,
                     nonmember_blind: Features, collection_ids: list[str], nonmember_ids: list[str],
                     members: Features | None = None, member_ids: list[str] | None = None,
                     seed: int = 0) -> CollectionAudit:
    """The test on the model's features, and the blind guard: the same split-sample test of S's own
    halves against V's on features that never touch the model."""
    test = split_test(collection, nonmembers, collection_ids, nonmember_ids, members, member_ids, seed)
    guard = split_test(collection_blind, nonmember_blind, collection_ids, nonmember_ids, seed=seed,
                            with_share=False)
    return CollectionAudit(test, guard)
