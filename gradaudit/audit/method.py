"""The GradAudit score on plain arrays (docs/method.md); it never sees a model.

A :class:`SliceSet` holds per-pair slice statistics (dot products with R and squared norms of every row
and column of every selected weight's gradient) and R's own slice norms. From them come the slice
cosines s_k(x), exact leave-one-out cosines for the pairs that built R, and the estimator
:class:`GradAudit`: Δ_k = mean over members − mean over non-members, a mask, and S(x) = the mean of the
kept cosines (signed by Δ_k for the signed variant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator

MASKS = ("tau", "topq", "tau_or_topq", "min_keep")


@dataclass
class SliceSet:
    """Slice statistics of n pairs, float64 arrays keyed by weight name.

    row_dot, row_sq: (n, d_out); col_dot, col_sq: (n, d_in); ref_row_sq (d_out,), ref_col_sq (d_in,):
    R's squared slice norms; n_ref: how many members built R; in_ref (n,) bool: which of these pairs
    were among them (their leave-one-out features remove them from R); extra: other per-pair scores
    (the baselines) that the combined head reads beside the gradient features.
    """

    weights: list[str]
    row_dot: dict[str, np.ndarray]
    row_sq: dict[str, np.ndarray]
    col_dot: dict[str, np.ndarray]
    col_sq: dict[str, np.ndarray]
    ref_row_sq: dict[str, np.ndarray]
    ref_col_sq: dict[str, np.ndarray]
    n_ref: int
    in_ref: np.ndarray = field(default=None)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # other per-pair scores, e.g. baselines (n,)
    # derived features kept once computed (every fold model scores the same probes): the arrays above are
    # never changed in place; subset/concat build new sets
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        n = self.num_pairs
        if self.in_ref is None:
            self.in_ref = np.zeros(n, dtype=bool)
        self.in_ref = np.asarray(self.in_ref, dtype=bool)
        if self.in_ref.shape != (n,):
            raise ValueError(f"in_ref must have shape ({n},); got {self.in_ref.shape}")
        for k, v in self.extra.items():
            if np.shape(v) != (n,):
                raise ValueError(f"extra score {k!r} must have shape ({n},); got {np.shape(v)}")
        for w in self.weights:
            for name, arrays, ref in (("row", (self.row_dot, self.row_sq), self.ref_row_sq),
                                      ("col", (self.col_dot, self.col_sq), self.ref_col_sq)):
                shapes = {a[w].shape for a in arrays}
                if shapes != {(n, ref[w].shape[0])}:
                    raise ValueError(f"{w}: {name} statistics have shapes {shapes}, expected {(n, ref[w].shape[0])}")

    @property
    def num_pairs(self) -> int:
        return self.row_sq[self.weights[0]].shape[0]

    def subset(self, index) -> SliceSet:
        """The pairs at ``index`` (an index array or boolean mask), R unchanged."""
        pick = {k: {w: v[w][index] for w in self.weights} for k, v in
                (("row_dot", self.row_dot), ("row_sq", self.row_sq), ("col_dot", self.col_dot), ("col_sq", self.col_sq))}
        return SliceSet(self.weights, **pick, ref_row_sq=self.ref_row_sq, ref_col_sq=self.ref_col_sq,
                        n_ref=self.n_ref, in_ref=self.in_ref[index],
                        extra={k: np.asarray(v)[index] for k, v in self.extra.items()})

    @staticmethod
    def concat(a: SliceSet, b: SliceSet) -> SliceSet:
        """The pairs of ``a`` then those of ``b`` (statistics against the same R)."""
        if a.weights != b.weights or a.n_ref != b.n_ref or any(
                not np.array_equal(x[w], y[w]) for x, y in ((a.ref_row_sq, b.ref_row_sq), (a.ref_col_sq, b.ref_col_sq))
                for w in a.weights):
            raise ValueError("only slice sets scored against the same R can be joined")
        if set(a.extra) != set(b.extra):
            raise ValueError("joined slice sets need the same extra scores")
        join = {k: {w: np.concatenate([getattr(a, k)[w], getattr(b, k)[w]]) for w in a.weights}
                for k in ("row_dot", "row_sq", "col_dot", "col_sq")}
        return SliceSet(a.weights, **join, ref_row_sq=a.ref_row_sq, ref_col_sq=a.ref_col_sq, n_ref=a.n_ref,
                        in_ref=np.concatenate([a.in_ref, b.in_ref]),
                        extra={k: np.concatenate([a.extra[k], b.extra[k]]) for k in a.extra})

    def groups(self) -> tuple[np.ndarray, list[str]]:
        """(K,) group index of every slice column of :meth:`cosines`, and the group names
        ("<weight>:rows", "<weight>:cols"): masks are chosen per group."""
        sizes, names = [], []
        for w in self.weights:
            sizes += [self.ref_row_sq[w].shape[0], self.ref_col_sq[w].shape[0]]
            names += [f"{w}:rows", f"{w}:cols"]
        return np.repeat(np.arange(len(sizes)), sizes), names

    def cosines(self, loo: bool = False) -> np.ndarray:
        """(n, K) slice cosines with R, rows then columns of each weight in order; 0 where either slice is
        zero. With ``loo``, pairs that built R are scored against R without themselves (exact):
        ⟨G, R₋ₓ⟩ = (N⟨G,R⟩ − ‖G‖²)/(N−1), ‖R₋ₓ‖² = (N²‖R‖² − 2N⟨G,R⟩ + ‖G‖²)/(N−1)² (clamped at 0)."""
        if loo and self.n_ref < 2 and self.in_ref.any():
            raise ValueError("leave-one-out needs R built from at least 2 members")
        key = ("cosines", bool(loo and self.in_ref.any()))
        if key not in self.memo:
            self.memo[key] = self._cosines(loo)
        return self.memo[key]

    def _cosines(self, loo: bool) -> np.ndarray:
        parts = []
        for w in self.weights:
            for dot, sq, ref in ((self.row_dot[w], self.row_sq[w], self.ref_row_sq[w]),
                                 (self.col_dot[w], self.col_sq[w], self.ref_col_sq[w])):
                dot, sq = np.asarray(dot, np.float64), np.asarray(sq, np.float64)
                ref = np.broadcast_to(np.asarray(ref, np.float64), dot.shape).copy()
                if loo and self.in_ref.any():
                    n, m = self.n_ref, self.in_ref
                    ref[m] = np.maximum((n * n * ref[m] - 2 * n * dot[m] + sq[m]) / (n - 1) ** 2, 0.0)
                    dot = dot.copy()
                    dot[m] = (n * dot[m] - sq[m]) / (n - 1)
                denom = np.sqrt(np.maximum(sq, 0) * ref)
                cos = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)
                parts.append(np.clip(cos, -1.0, 1.0))
        return np.concatenate(parts, axis=1)


def select_slices(delta: np.ndarray, groups: np.ndarray, mask: str, tau: float, q: float, min_keep: float) -> np.ndarray:
    """Which slices to keep from their Δ (docs/method.md, the mask), per (weight, axis) group:
    ``tau`` Δ > τ; ``topq`` Δ ≥ the group's q-quantile; ``tau_or_topq`` τ, or the group's q-quantile
    where nothing passes τ; ``min_keep`` τ, topped up to the group's min_keep fraction by largest Δ."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}; got {mask!r}")
    keep = delta > tau if mask != "topq" else np.zeros(delta.shape, dtype=bool)
    if mask == "tau":
        return keep
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        d = delta[members]
        if mask in ("topq", "tau_or_topq"):
            if mask == "topq" or not keep[members].any():
                keep[members] = d >= np.quantile(d, q)
        else:
            need = int(np.ceil(min_keep * members.size))
            if keep[members].sum() < need:
                keep[members[np.argsort(-d, kind="stable")[:need]]] = True
    return keep


class GradAudit(BaseEstimator):
    """The GradAudit score, scikit-learn style, on :class:`SliceSet` values.

    ``fit(members, nonmembers)`` computes the slice cosines, Δ_k and the mask; ``score_samples(pairs)``
    gives S(x), higher = member. The paper's variant is the default (member cosines against the full R
    in the fit, as the paper computes them); ``loo=True`` computes Δ from leave-one-out cosines for the
    pairs that built R; ``signed=True`` keeps slices by |Δ_k| and weighs each by the sign of Δ_k. Scoring
    always takes a pair that built R against R without it, as every variant does: a score of a pair
    against a reference it is part of says nothing about membership.

    Fitted: ``delta_`` (K,), ``keep_`` (K,) bool, ``weight_`` (K,) ±1/0, ``kept_`` {group: (kept, size)}.
    """

    def __init__(self, mask: str = "tau_or_topq", tau: float = 0.10, q: float = 0.90, min_keep: float = 0.20,
                 signed: bool = False, loo: bool = False):
        self.mask, self.tau, self.q, self.min_keep, self.signed, self.loo = mask, tau, q, min_keep, signed, loo

    def fit(self, members: SliceSet, nonmembers: SliceSet) -> GradAudit:
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}; got {self.mask!r}")
        if not 0 < self.q < 1 or not 0 < self.min_keep <= 1:
            raise ValueError(f"q must lie in (0, 1) and min_keep in (0, 1]; got q={self.q}, min_keep={self.min_keep}")
        if members.num_pairs == 0 or nonmembers.num_pairs == 0:
            raise ValueError("fit needs at least one member and one non-member")
        groups, names = members.groups()
        delta = members.cosines(self.loo).mean(0) - nonmembers.cosines(self.loo).mean(0)
        keep = select_slices(np.abs(delta) if self.signed else delta, groups, self.mask, self.tau, self.q,
                             self.min_keep)
        if not keep.any():
            raise ValueError(f"no slice passes the mask (mask={self.mask!r}, tau={self.tau}); "
                             "lower tau or use 'tau_or_topq'")
        self.delta_, self.keep_, self.group_names_ = delta, keep, names
        self.weight_ = np.where(keep, np.sign(delta) if self.signed else 1.0, 0.0)
        self.kept_ = {n: (int(keep[groups == g].sum()), int((groups == g).sum())) for g, n in enumerate(names)}
        return self

    def score_samples(self, pairs: SliceSet) -> np.ndarray:
        """S(x) for each pair (n,): the kept cosines' mean, signed for the signed variant; pairs that built
        R are scored against R without themselves (exact leave-one-out)."""
        if not hasattr(self, "keep_"):
            raise ValueError("call fit before score_samples")
        cos = pairs.cosines(loo=True)
        if cos.shape[1] != self.keep_.size:
            raise ValueError(f"these pairs have {cos.shape[1]} slices; the fit had {self.keep_.size}")
        return cos @ self.weight_ / self.keep_.sum()
