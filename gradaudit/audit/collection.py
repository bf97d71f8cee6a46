"""Was this collection used to train the model? The collection-level audit (DESIGN.md §2.5,
docs/collection.md), on plain arrays.

Inputs: the suspect collection S, known non-members V drawn from the same distribution as S's unused
part (the user vouches for that), and optionally known members M. Many weak per-pair signals add up
over a collection (Maini et al., 2024).

The test is **sample splitting**, chosen over cross-fitting because its p-value is exact with no
permutation loop: a score is fitted on some pairs and applied to pairs it never saw, and a one-sided
Mann–Whitney U test asks whether S's held-out scores exceed V's. The score is a fixed function of the
fitting pairs, so when S and V are exchangeable their held-out scores are too, and the p-value is valid
whatever was learned.

* With known members (:func:`members_test`): the per-pair audit's machinery — every variant
  cross-validated on M against half of V, the best chosen — scores all of S and the other half of V,
  each pair by one fold model (the same kind of function that gave M's out-of-fold scores).
* Without (:func:`split_test`): an aggregator (the variants' logistic head over
  :func:`model_features`: every logit baseline, and per weight and axis the mean log slice norm and the
  mean cosine with R) fits half of S against half of V; the other halves are tested.

Effect size: the held-out AUROC of S against V. Share of S used: S's pairs are a mixture of unused
pairs (distributed as V) and used ones, so AUROC(S, V) − ½ = share × (AUROC(used, V) − ½). Known members'
out-of-fold scores estimate AUROC(used, V) (assuming S's used pairs look like M); without them
AUROC(used, V) ≤ 1 gives the lower bound 2·(AUROC(S, V) − ½).

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
from gradaudit.audit.folds import fold_of_ids
from gradaudit.audit.method import SliceSet
from gradaudit.audit.per_pair import Fit
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


def _held_out(s: np.ndarray, v: np.ndarray, seed: int) -> tuple[float, float, list[float]]:
    """One-sided Mann–Whitney p-value that S's held-out scores exceed V's, and the AUROC with its interval."""
    p = float(mannwhitneyu(s, v, alternative="greater").pvalue)
    auc, low, high = metrics.auroc_ci(s, v, n_boot=N_BOOT, seed=seed)
    return p, auc, [low, high]


def _univariate(names: list[str], pos: np.ndarray, neg: np.ndarray) -> list[dict]:
    """The features that separate the tested pairs most on their own (held-out AUROC furthest from ½)."""
    aucs = np.array([metrics.auroc(pos[:, j], neg[:, j]) for j in range(len(names))])
    top = np.argsort(-np.abs(aucs - 0.5), kind="stable")[:TOP_FEATURES]
    return [{"feature": names[j], "held_out_auroc": float(aucs[j])} for j in top]


def split_test(collection: Features, nonmembers: Features, collection_ids: list[str], nonmember_ids: list[str],
               seed: int = 0, with_share: bool = True) -> CollectionTest:
    """Whether S (``collection``) holds pairs the model was trained on, against V (``nonmembers``),
    without known members: the aggregator fits one half of S against one half of V (:func:`split` on the
    ids) and the other halves are tested; the share is a lower bound. The blind guard is this test on
    blind features."""
    if collection.names != nonmembers.names:
        raise ValueError("the collection and the non-members need the same features")
    s_fit, v_fit = split(collection_ids, seed=seed), split(nonmember_ids, seed=seed)
    s_test, v_test = collection.rows(~s_fit), nonmembers.rows(~v_fit)
    if s_test.n == 0 or v_test.n == 0:
        raise ValueError("too few pairs: the test needs held-out pairs of the collection and of the non-members")
    agg = Aggregator(seed).fit(collection.rows(s_fit).values, nonmembers.rows(v_fit).values)
    s, v = agg.decision_function(s_test.values), agg.decision_function(v_test.values)
    p, auc, ci = _held_out(s, v, seed)
    return CollectionTest(
        p_value=p, auroc=auc, auroc_ci=ci, design="split collection",
        n_fit={"collection": int(s_fit.sum()), "nonmembers": int(v_fit.sum())},
        n_test={"collection": s_test.n, "nonmembers": v_test.n},
        features=_carried(agg, collection.names, s_test.values, v_test.values),
        share=_share(s, v, None, seed) if with_share else None, scores={"collection": s, "nonmembers": v})


def members_test(fit: Fit, collection: SliceSet, collection_ids: list[str], nonmembers: SliceSet,
                 nonmember_ids: list[str], features: tuple[Features, Features] | None = None,
                 seed: int = 0) -> CollectionTest:
    """Whether S holds training pairs, with known members: ``fit`` is the per-pair audit's cross-validated
    fit (``per_pair.fit_reference``) on the known members against one half of V; ``nonmembers`` is the
    other half, which no fit saw. S and that half are scored alike, by the mean of the fold models, so the
    two samples are exchangeable when S holds no training pair. For the share, each is also scored by the
    one fold model its id falls to, the same kind of function as the known members' out-of-fold scores.
    ``features`` (S's and the half's :func:`model_features`) name what separates them, for the report."""
    if set(collection_ids) & set(fit.reference_ids):
        raise ValueError("a pair of the collection is one of the fit's reference pairs: leave it out of the test")
    fresh_s, fresh_v = np.full(len(collection_ids), -1), np.full(len(nonmember_ids), -1)
    # the test: the mean of the fold models' scores, one function for both samples and steadier than one
    # fold model's; the share: each pair by one fold model, as M's out-of-fold scores were made
    s_mean = fit.chosen.score_probes(collection, fresh_s)
    v_mean = fit.chosen.score_probes(nonmembers, fresh_v)
    s = fit.chosen.score_probes(collection, fresh_s, fold_of_ids(collection_ids, fit.folds))
    v = fit.chosen.score_probes(nonmembers, fresh_v, fold_of_ids(nonmember_ids, fit.folds))
    m = fit.chosen.scores[:fit.n_members]
    p, auc, ci = _held_out(s_mean, v_mean, seed)
    carried = [{"feature": f"per-pair method '{fit.method}' (its cross-validated AUROC {fit.chosen.auroc:.3f})",
                "held_out_auroc": auc}]
    if features is not None:
        carried += _univariate(features[0].names, features[0].values, features[1].values)
    return CollectionTest(
        p_value=p, auroc=auc, auroc_ci=ci, design="known members",
        n_fit={"members": fit.n_members, "nonmembers": fit.n_nonmembers},
        n_test={"collection": int(s.size), "nonmembers": int(v.size), "members": int(m.size)},
        features=carried, share=_share(s, v, m, seed), scores={"collection": s_mean, "nonmembers": v_mean})


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


def audit_collection(test: CollectionTest, collection_blind: Features, nonmember_blind: Features,
                     collection_ids: list[str], nonmember_ids: list[str], seed: int = 0) -> CollectionAudit:
    """The test on the model's view (:func:`members_test` or :func:`split_test`) beside the blind guard:
    the split-sample test of S's own halves against V's on features that never touch the model."""
    guard = split_test(collection_blind, nonmember_blind, collection_ids, nonmember_ids, seed=seed, with_share=False)
    return CollectionAudit(test, guard)
