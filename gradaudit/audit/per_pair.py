"""The per-pair audit on plain arrays (docs/protocol.md): the cross-validated fit on the reference pairs,
the scores of an audited set on the same footing, calibrated probabilities at the set's own prior, the
exposure estimate, the collection test, the evaluation on the set's own labels, and the association test.

State passes as small dataclasses: :class:`Fit` (stored in the run folder and reused), :class:`ScoredSet`
and :class:`Evaluation`. :func:`result` turns them into the JSON that ``metrics.json`` holds and the
verdict reads (``gradaudit.audit.claims``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradaudit.audit import metrics
from gradaudit.audit.calibration import Calibrator
from gradaudit.audit.folds import fold_of_ids
from gradaudit.audit.method import GradAudit, SliceSet
from gradaudit.audit.protocol import Estimate, choose, cross_validate
from gradaudit.audit.variants import VARIANTS, export_model, restore_model
from gradaudit.errors import ConfigError, LabelsMissing

N_BOOT = 2000


def oof_auroc_ci(scores: np.ndarray, n_members: int) -> list[float]:
    """95% interval of the AUROC of out-of-fold scores (members first), the one the claim rule reads."""
    _, low, high = metrics.auroc_ci(scores[:n_members], scores[n_members:], n_boot=N_BOOT)
    return [low, high]


@dataclass
class Fit:
    """Every variant cross-validated on the reference pairs, and the one chosen.

    ``estimates[name]``: out-of-fold scores (members first) and the fold models; ``paper``: the paper's
    variant fitted on all reference pairs (its Δ and mask, which the report draws); ``reference_ids``:
    the reference pairs' ids, members first; ``baseline_aurocs``: each baseline's AUROC on the reference
    pairs (nothing is fitted for a baseline); ``auroc_cis``: each variant's out-of-fold AUROC interval."""

    method: str
    requested_method: str
    folds: int
    estimates: dict[str, Estimate]
    paper: GradAudit
    reference_ids: list[str]
    n_members: int
    n_nonmembers: int
    r_builders: int
    members_in_r: int
    baseline_aurocs: dict[str, float]
    auroc_cis: dict[str, list[float]]

    @property
    def chosen(self) -> Estimate:
        return self.estimates[self.method]

    def summary(self) -> dict:
        """The fit as ``metrics.json`` reports it."""
        return {
            "method": self.method, "requested_method": self.requested_method,
            "reference": {"members": self.n_members, "nonmembers": self.n_nonmembers, "folds": self.folds,
                          "r_builders": self.r_builders, "members_in_r": self.members_in_r},
            "cross_validated": {k: {"auroc": e.auroc, "auroc_ci": self.auroc_cis[k], "tpr_at_0.01_fpr": e.tpr_at_1pct,
                                    "tpr_at_0.05_fpr": e.tpr_at_5pct} for k, e in self.estimates.items()},
            "cross_validated_baselines": dict(self.baseline_aurocs),
        }

    def export(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able description, arrays): everything needed to score later, no pickles."""
        meta = {"method": self.method, "requested_method": self.requested_method, "folds": self.folds,
                "reference_ids": self.reference_ids, "n_members": self.n_members, "n_nonmembers": self.n_nonmembers,
                "r_builders": self.r_builders, "members_in_r": self.members_in_r,
                "baseline_aurocs": self.baseline_aurocs, "auroc_cis": self.auroc_cis, "estimates": {}}
        arrays = {}
        for name, estimate in self.estimates.items():
            meta["estimates"][name], part = estimate.export(f"estimates/{name}/")
            arrays.update(part)
        meta["paper"], part = export_model(self.paper, "paper/")
        arrays.update(part)
        return meta, arrays

    @classmethod
    def restore(cls, meta: dict, arrays: dict[str, np.ndarray]) -> Fit:
        estimates = {name: Estimate.restore(m, arrays, f"estimates/{name}/") for name, m in meta["estimates"].items()}
        return cls(meta["method"], meta["requested_method"], meta["folds"], estimates,
                   restore_model(meta["paper"], arrays, "paper/"), list(meta["reference_ids"]), meta["n_members"],
                   meta["n_nonmembers"], meta["r_builders"], meta["members_in_r"], meta["baseline_aurocs"],
                   meta["auroc_cis"])

    def score(self, pairs: SliceSet, ids: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every score of ``pairs`` on the footing of the out-of-fold scores — "gradaudit" (the chosen
        variant), "paper" and each baseline — and each pair's index among the reference pairs (or -1:
        a pair that is itself a reference pair gets its out-of-fold score; any other the score of the
        one fold model its id falls to)."""
        position = {pid: i for i, pid in enumerate(self.reference_ids)}
        reference_position = np.array([position.get(pid, -1) for pid in ids])
        fold_of = fold_of_ids(ids, self.folds)
        scores = {"gradaudit": self.chosen.score_probes(pairs, reference_position, fold_of),
                  "paper": self.estimates["paper"].score_probes(pairs, reference_position, fold_of), **pairs.extra}
        return scores, reference_position


def fit_reference(members: SliceSet, nonmembers: SliceSet, member_ids: list[str], nonmember_ids: list[str],
                  method: str = "auto", folds: int = 5, seed: int = 0) -> Fit:
    """Cross-validates every variant on known members and non-members (their baselines in ``extra``)
    and chooses one (``auto``: the best out-of-fold AUROC)."""
    if method != "auto" and method not in VARIANTS:
        raise ConfigError(f"method must be 'auto' or one of {sorted(VARIANTS)}; got {method!r}")
    estimates = cross_validate(members, nonmembers, folds=folds, seed=seed)
    n_m = members.num_pairs
    return Fit(method=choose(estimates, method), requested_method=method, folds=folds, estimates=estimates,
               paper=GradAudit().fit(members, nonmembers), reference_ids=list(member_ids) + list(nonmember_ids),
               n_members=n_m, n_nonmembers=nonmembers.num_pairs, r_builders=members.n_ref,
               members_in_r=int(members.in_ref.sum()),
               baseline_aurocs={k: metrics.auroc(members.extra[k], nonmembers.extra[k]) for k in members.extra},
               auroc_cis={k: oof_auroc_ci(e.scores, n_m) for k, e in estimates.items()})


@dataclass
class ScoredSet:
    """An audited set scored against a fit: ``scores`` ("gradaudit", "paper", each baseline; (n,) each),
    P(member) at the set's own estimated prior, and the exposure estimate with its interval. (Whether the
    set was used is the collection audit's answer, ``audit.collection``.)"""

    name: str
    ids: list[str]
    labels: list
    reference_position: np.ndarray
    scores: dict[str, np.ndarray]
    calibrator: Calibrator
    probability: np.ndarray
    exposure: tuple[float, float, float]

    @property
    def baselines(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.scores.items() if k not in ("gradaudit", "paper")}

    @property
    def labelled(self) -> bool:
        """Every pair labelled 0/1 and both classes present: the set can be evaluated."""
        return all(label is not None for label in self.labels) and len(set(self.labels)) == 2


def score_set(fit: Fit, name: str, pairs: SliceSet, ids: list[str], labels: list) -> ScoredSet:
    """Scores, calibrated probabilities at the set's own prior and the exposure estimate of a set."""
    scores, reference_position = fit.score(pairs, ids)
    oof, n_m = fit.chosen.scores, fit.n_members
    calibrator = Calibrator().fit(oof[:n_m], oof[n_m:])
    prior, low, high = calibrator.exposure(scores["gradaudit"], reference=(oof[:n_m], oof[n_m:]))
    return ScoredSet(name, list(ids), list(labels), reference_position, scores, calibrator,
                     calibrator.predict_proba(scores["gradaudit"], prior), (prior, low, high))


def expected_calibration_error(probability, y, bins: int = 10) -> float:
    """Σ over equal-width probability bins of (bin share) × |mean predicted − observed member share|."""
    which = np.clip((np.asarray(probability) * bins).astype(int), 0, bins - 1)
    return float(sum((which == b).mean() * abs(probability[which == b].mean() - y[which == b].mean())
                     for b in range(bins) if (which == b).any()))


@dataclass
class Evaluation:
    """Every score measured on the set's own labels: ``metrics`` (what metrics.json's "evaluation"
    holds), ``y`` the labels as booleans."""

    metrics: dict
    y: np.ndarray = field(repr=False)

    @property
    def true_member_share(self) -> float:
        return float(self.y.mean())


def evaluate(scored: ScoredSet) -> Evaluation:
    """AUROC and TPR at low FPR of every score with intervals, GradAudit against the best baseline
    (paired bootstrap), balanced accuracy and calibration error of the probabilities, ROC curves."""
    if not scored.labelled:
        raise LabelsMissing(f"set {scored.name!r} needs a 0/1 label on every pair, both classes present, "
                            "to be evaluated")
    y = np.array(scored.labels, dtype=bool)
    s = scored.scores
    ev = {k: metrics.summary(v[y], v[~y], n_boot=N_BOOT) for k, v in s.items()}
    best = max(scored.baselines, key=lambda k: ev[k]["auroc"])
    diff = metrics.paired_auroc_difference(s["gradaudit"][y], s["gradaudit"][~y], s[best][y], s[best][~y],
                                           n_boot=N_BOOT)
    ev["gradaudit_minus_best_baseline"] = {"baseline": best, "difference": diff[0], "ci": [diff[1], diff[2]]}
    ev["balanced_accuracy_at_0.5"] = metrics.balanced_accuracy(scored.probability[y], scored.probability[~y], 0.5)
    ev["expected_calibration_error"] = expected_calibration_error(scored.probability, y)
    ev["roc"] = {k: dict(zip(("fpr", "tpr"), (a.tolist() for a in metrics.roc_curve(s[k][y], s[k][~y]))))
                 for k in ("gradaudit", "paper")}
    return Evaluation(ev, y)


def association(scored: ScoredSet, shuffled_scores: dict[str, np.ndarray], correct: np.ndarray) -> dict:
    """Correct pairs against the same images with other pairs' texts: AUROC with its interval for every
    score. ``correct[j]`` is the index in ``scored`` of shuffled pair j's correct pair. It shows whether a
    score ties a text to its image; it does not show membership (both sides hold the same images and
    texts)."""
    out = {k: metrics.summary(v[correct], shuffled_scores[k], n_boot=N_BOOT) for k, v in scored.scores.items()}
    return dict(pairs=len(correct), scores=out)


def result(fit: Fit, scored: ScoredSet, evaluation: Evaluation | None = None, **context) -> dict:
    """What ``metrics.json`` holds: ``context`` first (the model, the selection, the run folder), then the
    fit, the set, its exposure, and the evaluation where there is one."""
    prior, low, high = scored.exposure
    out = dict(context, **fit.summary(), set=scored.name, probes=len(scored.ids),
               probes_in_reference=int((scored.reference_position >= 0).sum()),
               exposure={"estimate": prior, "ci": [low, high]})
    if evaluation is not None:
        out["evaluation"] = evaluation.metrics
        out["true_member_share"] = evaluation.true_member_share
    return out
