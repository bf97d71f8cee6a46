"""Honest model selection on the reference sets alone (DESIGN.md §2.4).

Every variant is refitted inside each of 5 stratified folds over the reference pairs (mask, head,
regularisation) and scored on the held-out fold; a reference member is always evaluated with its
leave-one-out features, which are distributed like a probe member's (neither is in the R it is scored
against). The out-of-fold scores give each variant's AUROC and TPR at low FPR; ``method="auto"`` takes
the best by that estimate, the paper's variant is always computed and reported, and probes never enter
a fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradaudit.method import GradAudit, SliceSet
from gradaudit.metrics import auroc, tpr_at_fpr

# name: (kind, options). "score": a GradAudit variant; "head": logistic regression on slice features.
VARIANTS = {
    "paper": ("score", dict()),
    "loo": ("score", dict(loo=True)),
    "signed": ("score", dict(loo=True, signed=True)),
    "head-cosine": ("head", dict(features="cosine")),
    "head-lognorm": ("head", dict(features="lognorm")),
    "head-both": ("head", dict(features="both")),
    "combined": ("combined", dict()),
}


def head_features(pairs: SliceSet, features: str) -> np.ndarray:
    """(n, F) features of the supervised head: leave-one-out slice cosines, log slice norms, or both."""
    if features not in ("cosine", "lognorm", "both"):
        raise ValueError(f"features must be 'cosine', 'lognorm' or 'both'; got {features!r}")
    if ("head", features) not in pairs.memo:
        pairs.memo[("head", features)] = _head_features(pairs, features)
    return pairs.memo[("head", features)]


def _head_features(pairs: SliceSet, features: str) -> np.ndarray:
    parts = []
    if features in ("cosine", "both"):
        parts.append(pairs.cosines(loo=True))
    if features in ("lognorm", "both"):
        norms = [np.log(np.concatenate([pairs.row_sq[w], pairs.col_sq[w]], axis=1) + 1e-30) for w in pairs.weights]
        parts.append(0.5 * np.concatenate(norms, axis=1))
    return np.concatenate(parts, axis=1)


class Head:
    """Regularised logistic regression on standardised slice features, its strength chosen by inner
    cross-validation on the training pairs only. ``score_samples`` gives the logit (higher = member)."""

    def __init__(self, features: str = "both", seed: int = 0):
        self.features, self.seed = features, seed

    def fit(self, members: SliceSet, nonmembers: SliceSet) -> Head:
        x = np.concatenate([head_features(members, self.features), head_features(nonmembers, self.features)])
        y = np.r_[np.ones(members.num_pairs), np.zeros(nonmembers.num_pairs)]
        self.model_ = _logistic(self.seed, min(members.num_pairs, nonmembers.num_pairs)).fit(x, y)
        return self

    def score_samples(self, pairs: SliceSet) -> np.ndarray:
        return self.model_.decision_function(head_features(pairs, self.features))


class RowSpace:
    """Coordinates in the span of the training rows: with n pairs and p ≫ n features, an L2-penalised
    linear model's weights lie in that span (w = Vβ, ‖w‖ = ‖β‖, Xw = (XV)β), so fitting on the
    n-dimensional coordinates solves the same problem, and cross-validation inside them too (a subset's
    span lies in the whole's). V = XᵀU/√λ from the eigenpairs of the Gram matrix XXᵀ (O(n²p) once);
    directions with singular values under 1e-6 of the largest are dropped."""

    def fit(self, x, y=None):
        x = np.asarray(x, dtype=np.float64)
        eigenvalues, u = np.linalg.eigh(x @ x.T)
        keep = eigenvalues > max(eigenvalues[-1], 0.0) * 1e-12
        if not keep.any():
            self.components_ = np.zeros((x.shape[1], 1))
        else:
            self.components_ = (x.T @ u[:, keep]) / np.sqrt(eigenvalues[keep])
        return self

    def transform(self, x):
        return np.asarray(x, dtype=np.float64) @ self.components_

    def fit_transform(self, x, y=None):
        return self.fit(x).transform(x)

    def get_params(self, deep=True):
        return {}

    def set_params(self, **params):
        return self


def _logistic(seed: int, n_min: int):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RowSpace(), LogisticRegressionCV(
        Cs=np.logspace(-4, 2, 7), l1_ratios=(0.0,), cv=max(2, min(3, n_min)), scoring="roc_auc", max_iter=200,
        solver="newton-cholesky", random_state=seed, use_legacy_attributes=False))  # L2 penalty, its strength by inner cross-validation


class Combined:
    """The gradient head's score beside the baselines' (``SliceSet.extra``) in one small logistic
    regression, so that what the gradients add over the baselines is measured, not assumed. The head's
    scores that train the combination are out-of-fold within the training pairs (stacking), so a head that
    memorised its training pairs cannot pass for a signal."""

    def __init__(self, features: str = "both", folds: int = 3, seed: int = 0):
        self.features, self.folds, self.seed = features, folds, seed

    def _stack(self, grad_scores, pairs: SliceSet) -> np.ndarray:
        if not pairs.extra:
            raise ValueError("the combined head needs the baselines' scores (SliceSet.extra)")
        return np.column_stack([grad_scores] + [pairs.extra[k] for k in sorted(pairs.extra)])

    def fit(self, members: SliceSet, nonmembers: SliceSet) -> Combined:
        n_m, n_n = members.num_pairs, nonmembers.num_pairs
        fold = stratified_folds(n_m, n_n, self.folds, self.seed)
        inner = np.empty(n_m + n_n)
        for k in range(self.folds):
            tm, tn = fold[:n_m] != k, fold[n_m:] != k
            head = Head(self.features, self.seed).fit(members.subset(tm), nonmembers.subset(tn))
            inner[:n_m][~tm] = head.score_samples(members.subset(~tm))
            inner[n_m:][~tn] = head.score_samples(nonmembers.subset(~tn))
        x = np.concatenate([self._stack(inner[:n_m], members), self._stack(inner[n_m:], nonmembers)])
        self.combiner_ = _logistic(self.seed, min(n_m, n_n)).fit(x, np.r_[np.ones(n_m), np.zeros(n_n)])
        self.head_ = Head(self.features, self.seed).fit(members, nonmembers)
        return self

    def score_samples(self, pairs: SliceSet) -> np.ndarray:
        return self.combiner_.decision_function(self._stack(self.head_.score_samples(pairs), pairs))


def make_variant(name: str):
    kind, options = VARIANTS[name]
    return {"score": GradAudit, "head": Head, "combined": Combined}[kind](**options)


def _evaluate(model, pairs: SliceSet) -> np.ndarray:
    """Scores of reference pairs: leave-one-out features for the members that built R."""
    if isinstance(model, GradAudit):
        return model.score_samples(pairs, loo=True)
    return model.score_samples(pairs)


def stratified_folds(n_members: int, n_nonmembers: int, folds: int, seed: int) -> np.ndarray:
    """Fold of every reference pair (members first, then non-members), each class spread evenly."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_members, n_nonmembers):
        f = np.arange(n) % folds
        rng.shuffle(f)
        out.append(f)
    return np.concatenate(out)


@dataclass
class Estimate:
    """A variant's out-of-fold scores on the reference pairs, the figures they give, and the models fitted
    in the folds (``models[k]`` never saw the pairs of fold k)."""

    scores: np.ndarray  # (n_members + n_nonmembers,), members first
    auroc: float
    tpr_at_1pct: float | None
    tpr_at_5pct: float | None
    models: list
    fold: np.ndarray

    def score_probes(self, probes: SliceSet, reference_position: np.ndarray) -> np.ndarray:
        """Scores of audited pairs on the same footing as the out-of-fold scores (which calibration
        reads): a probe that is itself reference pair i gets its out-of-fold score; any other gets the mean
        of the fold models' scores, none of which saw it. ``reference_position[j]`` is probe j's index
        among the reference pairs (members first), or -1."""
        fresh = reference_position < 0
        out = np.empty(probes.num_pairs)
        out[~fresh] = self.scores[reference_position[~fresh]]
        if fresh.any():
            subset = probes if fresh.all() else probes.subset(fresh)  # the same object keeps its features
            out[fresh] = self.fold_scores(subset).mean(axis=0)
        return out

    def fold_scores(self, pairs: SliceSet) -> np.ndarray:
        """(folds, n) scores of pairs none of the fold models saw, one row per fold model."""
        return np.array([_evaluate(m, pairs) for m in self.models])


def cross_validate(members: SliceSet, nonmembers: SliceSet, variants=tuple(VARIANTS), folds: int = 5,
                   seed: int = 0) -> dict[str, Estimate]:
    """Out-of-fold estimates of each variant, everything refitted inside every fold."""
    if members.num_pairs < folds or nonmembers.num_pairs < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} members and non-members; "
                         f"got {members.num_pairs} and {nonmembers.num_pairs}")
    n_m = members.num_pairs
    fold = stratified_folds(n_m, nonmembers.num_pairs, folds, seed)
    out = {}
    for name in variants:
        scores, models = np.empty(fold.size), []
        for k in range(folds):
            train_m, train_n = fold[:n_m] != k, fold[n_m:] != k
            model = make_variant(name).fit(members.subset(train_m), nonmembers.subset(train_n))
            scores[:n_m][~train_m] = _evaluate(model, members.subset(~train_m))
            scores[n_m:][~train_n] = _evaluate(model, nonmembers.subset(~train_n))
            models.append(model)
        pos, neg = scores[:n_m], scores[n_m:]
        out[name] = Estimate(scores, auroc(pos, neg), tpr_at_fpr(pos, neg, 0.01), tpr_at_fpr(pos, neg, 0.05),
                             models, fold)
    return out


def choose(estimates: dict[str, Estimate], method: str = "auto") -> str:
    """The variant to use: the best out-of-fold AUROC for ``auto`` (the paper's on a tie), else ``method``."""
    if method != "auto":
        if method not in estimates:
            raise ValueError(f"method must be 'auto' or one of {sorted(estimates)}; got {method!r}")
        return method
    return max(estimates, key=lambda n: (estimates[n].auroc, n == "paper"))
