"""Honest model selection on the reference sets alone (docs/protocol.md).

Every variant is refitted inside each of 5 stratified folds over the reference pairs (mask, head,
regularisation) and scored on the held-out fold; a reference member is always evaluated with its
leave-one-out features, which are distributed like a probe member's (neither is in the R it is scored
against): every variant's ``score_samples`` does so. The out-of-fold scores give each variant's AUROC
and TPR at low FPR; ``method="auto"`` takes the best by that estimate, the paper's variant is always
computed and reported, and probes never enter a fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradaudit.audit.folds import stratified_folds
from gradaudit.audit.method import SliceSet
from gradaudit.audit.metrics import auroc, tpr_at_fpr
from gradaudit.audit.variants import VARIANTS, export_model, make_variant, restore_model


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

    def score_probes(self, probes: SliceSet, reference_position: np.ndarray, fold_of: np.ndarray | None = None) -> np.ndarray:
        """Scores of audited pairs: a probe that is itself reference pair i gets its out-of-fold score. Any
        other gets, with ``fold_of`` (each probe's fold, ``folds.fold_of_ids``), the score of that fold's
        model: one fold model that never saw it, the same footing as the out-of-fold scores that
        calibration reads. Without ``fold_of``, the mean of the fold models' scores (a steadier ranking,
        for evaluations that calibrate nothing). ``reference_position[j]`` is probe j's index among the
        reference pairs (members first), or -1."""
        fresh = reference_position < 0
        out = np.empty(probes.num_pairs)
        out[~fresh] = self.scores[reference_position[~fresh]]
        if fresh.any():
            subset = probes if fresh.all() else probes.subset(fresh)  # the same object keeps its features
            each = self.fold_scores(subset)
            out[fresh] = each.mean(axis=0) if fold_of is None else each[fold_of[fresh], np.arange(each.shape[1])]
        return out

    def fold_scores(self, pairs: SliceSet) -> np.ndarray:
        """(folds, n) scores of pairs none of the fold models saw, one row per fold model."""
        return np.array([m.score_samples(pairs) for m in self.models])

    def export(self, prefix: str) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able description, arrays under ``prefix``); :meth:`restore` inverts it exactly."""
        meta = {"auroc": self.auroc, "tpr_at_1pct": self.tpr_at_1pct, "tpr_at_5pct": self.tpr_at_5pct, "models": []}
        arrays = {f"{prefix}scores": self.scores, f"{prefix}fold": self.fold}
        for k, model in enumerate(self.models):
            model_meta, model_arrays = export_model(model, f"{prefix}{k}/")
            meta["models"].append(model_meta)
            arrays.update(model_arrays)
        return meta, arrays

    @classmethod
    def restore(cls, meta: dict, arrays: dict[str, np.ndarray], prefix: str) -> Estimate:
        models = [restore_model(m, arrays, f"{prefix}{k}/") for k, m in enumerate(meta["models"])]
        return cls(arrays[f"{prefix}scores"], meta["auroc"], meta["tpr_at_1pct"], meta["tpr_at_5pct"], models,
                   arrays[f"{prefix}fold"])


def min_pairs(folds: int) -> int:
    """The fewest pairs of each class that ``folds``-fold cross-validation of every variant can fit: one
    per fold, and 3 in every training fold (the combined head stacks over 3 inner folds, each of whose
    training parts needs 2 of a class for its logistic regression's own inner cross-validation)."""
    n = folds
    while n - -(-n // folds) < 3:
        n += 1
    return n


def cross_validate(members: SliceSet, nonmembers: SliceSet, variants=tuple(VARIANTS), folds: int = 5,
                   seed: int = 0) -> dict[str, Estimate]:
    """Out-of-fold estimates of each variant, everything refitted inside every fold."""
    need = min_pairs(folds)
    if members.num_pairs < need or nonmembers.num_pairs < need:
        raise ValueError(f"{folds}-fold cross-validation needs at least {need} members and {need} non-members; "
                         f"got {members.num_pairs} and {nonmembers.num_pairs}")
    n_m = members.num_pairs
    fold = stratified_folds(n_m, nonmembers.num_pairs, folds, seed)
    out = {}
    for name in variants:
        scores, models = np.empty(fold.size), []
        for k in range(folds):
            train_m, train_n = fold[:n_m] != k, fold[n_m:] != k
            model = make_variant(name).fit(members.subset(train_m), nonmembers.subset(train_n))
            scores[:n_m][~train_m] = model.score_samples(members.subset(~train_m))
            scores[n_m:][~train_n] = model.score_samples(nonmembers.subset(~train_n))
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
