"""Cross-validated model selection on synthetic slice statistics with and without a planted signal."""

import numpy as np
import pytest

from gradaudit.audit.method import SliceSet
from gradaudit.audit.protocol import choose, cross_validate, stratified_folds


def _reference(signal: float, n=40, d_out=6, d_in=8, seed=0):
    """Members' gradients share a direction with R (signal > 0), non-members' do not; R is the members' mean."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(d_out, d_in))
    g_m = rng.normal(size=(n, d_out, d_in)) + signal * direction
    g_n = rng.normal(size=(n, d_out, d_in))
    ref = g_m.mean(0)

    def pack(g, in_ref):
        return SliceSet(["w"], row_dot={"w": (g * ref).sum(2)}, row_sq={"w": (g**2).sum(2)},
                        col_dot={"w": (g * ref).sum(1)}, col_sq={"w": (g**2).sum(1)},
                        ref_row_sq={"w": (ref**2).sum(1)}, ref_col_sq={"w": (ref**2).sum(0)}, n_ref=n,
                        in_ref=np.full(len(g), in_ref))

    return pack(g_m, True), pack(g_n, False)


def test_folds_are_stratified():
    f = stratified_folds(23, 17, 5, seed=1)
    assert f.size == 40
    for part in (f[:23], f[23:]):
        counts = np.bincount(part, minlength=5)
        assert counts.max() - counts.min() <= 1


def test_planted_signal_is_found_and_leave_one_out_is_honest():
    members, nonmembers = _reference(signal=0.6)
    est = cross_validate(members, nonmembers, variants=("paper", "loo", "signed", "head-cosine"))
    assert est["loo"].auroc > 0.9 and est["head-cosine"].auroc > 0.85
    assert choose(est) in est and est[choose(est)].auroc == max(e.auroc for e in est.values())
    assert choose(est, "paper") == "paper"
    with pytest.raises(ValueError, match="method must be"):
        choose(est, "best")


def test_combined_head_uses_the_baselines():
    """A baseline that separates the classes carries the combined head where gradients have no signal."""
    members, nonmembers = _reference(signal=0.0, seed=4)
    rng = np.random.default_rng(5)
    members.extra = {"loss": rng.normal(1.5, 1, members.num_pairs)}
    nonmembers.extra = {"loss": rng.normal(0.0, 1, nonmembers.num_pairs)}
    est = cross_validate(members, nonmembers, variants=("head-both", "combined"))
    assert est["combined"].auroc > 0.75 and est["head-both"].auroc < 0.7
    members.extra, nonmembers.extra = {}, {}
    with pytest.raises(ValueError, match="needs the baselines"):
        cross_validate(members, nonmembers, variants=("combined",))


def test_no_signal_reads_as_chance():
    """Without a planted direction nothing separates members from non-members once members are scored
    leave-one-out; the paper's in-sample R would flatter them (docs/method.md)."""
    members, nonmembers = _reference(signal=0.0, seed=3)
    est = cross_validate(members, nonmembers, variants=("paper", "loo", "head-both"))
    for name, e in est.items():
        assert 0.3 < e.auroc < 0.7, (name, e.auroc)
    assert est["paper"].tpr_at_1pct is None  # 40 non-members do not support a 1% FPR


def test_too_few_pairs():
    members, nonmembers = _reference(signal=0.5, n=4)
    with pytest.raises(ValueError, match="at least 5 members"):
        cross_validate(members, nonmembers)


@pytest.mark.parametrize("folds", [2, 3, 4, 5])
def test_min_pairs_is_the_least_every_variant_fits(folds):
    """min_pairs(folds) of each class fit every variant (the combined head's nested folds included); one
    fewer is refused with the count, never sent on to scikit-learn."""
    from gradaudit.audit.protocol import min_pairs

    need = min_pairs(folds)
    for seed in range(3):
        members, nonmembers = _reference(signal=0.5, n=need, seed=seed)
        members.extra, nonmembers.extra = {"loss": np.arange(need) + 1.0}, {"loss": np.arange(need) + 0.5}
        cross_validate(members, nonmembers, folds=folds, seed=seed)
    members, nonmembers = _reference(signal=0.5, n=need - 1)
    with pytest.raises(ValueError, match=f"at least {need} members"):
        cross_validate(members, nonmembers, folds=folds)


def test_row_space_coordinates_give_the_same_l2_logistic_fit():
    """p ≫ n: the penalised fit on the row-space coordinates equals the fit on the raw features."""
    from sklearn.linear_model import LogisticRegression

    from gradaudit.audit.variants import RowSpace

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 400)), np.r_[np.ones(15), np.zeros(15)]
    x[:15, :5] += 0.8
    fresh = rng.normal(size=(10, 400))
    raw = LogisticRegression(C=0.1, tol=1e-12, max_iter=10_000).fit(x, y)
    rs = RowSpace().fit(x)
    reduced = LogisticRegression(C=0.1, tol=1e-12, max_iter=10_000).fit(rs.transform(x), y)
    np.testing.assert_allclose(reduced.decision_function(rs.transform(fresh)), raw.decision_function(fresh),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(rs.components_ @ reduced.coef_.ravel(), raw.coef_.ravel(), rtol=1e-6, atol=1e-9)
