"""The variants beyond the paper's score (docs/method.md): supervised logistic heads on slice features and
a combined head stacked over the logit baselines. Each is a scikit-learn-style estimator on
:class:`~gradaudit.audit.method.SliceSet` values; :data:`VARIANTS` names every variant the protocol
cross-validates, the paper's score among them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from gradaudit.audit.folds import stratified_folds
from gradaudit.audit.method import GradAudit, SliceSet

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


@dataclass(frozen=True)
class LinearScorer:
    """A fitted logistic pipeline (standardise, row-space coordinates, logistic regression) reduced to its
    arrays: ``decision_function`` computes what the pipeline's does, in the same operations and so
    bit-identically, and the arrays store as they are (no pickles)."""

    mean: np.ndarray  # (p,)
    scale: np.ndarray  # (p,)
    components: np.ndarray  # (p, k)
    coef: np.ndarray  # (1, k)
    intercept: np.ndarray  # (1,)

    @classmethod
    def of(cls, pipeline) -> LinearScorer:
        scaler, rows, logistic = (step for _, step in pipeline.steps)
        return cls(scaler.mean_, scaler.scale_, rows.components_, logistic.coef_, logistic.intercept_)

    def decision_function(self, x) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return ((z @ self.components) @ self.coef.T + self.intercept).reshape(-1)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("mean", "scale", "components", "coef", "intercept")}


class Head(BaseEstimator):
    """Regularised logistic regression on standardised slice features, its strength chosen by inner
    cross-validation on the training pairs only. ``score_samples`` gives the logit (higher = member)."""

    def __init__(self, features: str = "both", seed: int = 0):
        self.features, self.seed = features, seed

    def fit(self, members: SliceSet, nonmembers: SliceSet) -> Head:
        x = np.concatenate([head_features(members, self.features), head_features(nonmembers, self.features)])
        y = np.r_[np.ones(members.num_pairs), np.zeros(nonmembers.num_pairs)]
        self.scorer_ = LinearScorer.of(logistic(self.seed, min(members.num_pairs, nonmembers.num_pairs)).fit(x, y))
        return self

    def score_samples(self, pairs: SliceSet) -> np.ndarray:
        return self.scorer_.decision_function(head_features(pairs, self.features))


class RowSpace(TransformerMixin, BaseEstimator):
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


def logistic(seed: int, n_min: int):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RowSpace(), LogisticRegressionCV(
        Cs=np.logspace(-4, 2, 7), l1_ratios=(0.0,), cv=max(2, min(3, n_min)), scoring="roc_auc", max_iter=200,
        solver="newton-cholesky", random_state=seed, use_legacy_attributes=False))  # L2 penalty, its strength by inner cross-validation


class Combined(BaseEstimator):
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
        self.combiner_ = LinearScorer.of(logistic(self.seed, min(n_m, n_n)).fit(x, np.r_[np.ones(n_m), np.zeros(n_n)]))
        self.head_ = Head(self.features, self.seed).fit(members, nonmembers)
        return self

    def score_samples(self, pairs: SliceSet) -> np.ndarray:
        return self.combiner_.decision_function(self._stack(self.head_.score_samples(pairs), pairs))


KINDS = {"score": GradAudit, "head": Head, "combined": Combined}


def make_variant(name: str):
    """A fresh, unfitted estimator of variant ``name``."""
    kind, options = VARIANTS[name]
    return KINDS[kind](**options)


def export_model(model, prefix: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A fitted variant as (JSON-able description, arrays keyed under ``prefix``); :func:`restore_model`
    inverts it exactly."""
    kind = next(k for k, cls in KINDS.items() if type(model) is cls)
    meta = {"kind": kind, "params": model.get_params()}
    if kind == "score":
        meta.update(group_names=model.group_names_, kept={k: list(v) for k, v in model.kept_.items()})
        fitted = {"delta": model.delta_, "keep": model.keep_, "weight": model.weight_}
    elif kind == "head":
        fitted = model.scorer_.arrays()
    else:
        fitted = {**{f"head.{k}": v for k, v in model.head_.scorer_.arrays().items()},
                  **{f"combiner.{k}": v for k, v in model.combiner_.arrays().items()}}
    return meta, {f"{prefix}{k}": np.asarray(v) for k, v in fitted.items()}


def restore_model(meta: dict, arrays: dict[str, np.ndarray], prefix: str):
    """The fitted variant that :func:`export_model` described."""
    model = KINDS[meta["kind"]](**meta["params"])
    got = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if meta["kind"] == "score":
        model.delta_, model.keep_, model.weight_ = got["delta"], got["keep"].astype(bool), got["weight"]
        model.group_names_ = list(meta["group_names"])
        model.kept_ = {k: tuple(v) for k, v in meta["kept"].items()}
    elif meta["kind"] == "head":
        model.scorer_ = LinearScorer(**got)
    else:
        model.head_ = Head(model.features, model.seed)
        model.head_.scorer_ = LinearScorer(**{k[5:]: v for k, v in got.items() if k.startswith("head.")})
        model.combiner_ = LinearScorer(**{k[9:]: v for k, v in got.items() if k.startswith("combiner.")})
    return model
