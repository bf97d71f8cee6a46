"""The GradAudit score on hand-computed cases and against brute force from explicit per-pair gradients."""

import numpy as np
import pytest

from gradaudit.audit.method import GradAudit, SliceSet, select_slices


def _slice_set(grads, ref, n_ref, in_ref):
    """A SliceSet from explicit per-pair gradients {weight: (n, d_out, d_in)} and R {weight: (d_out, d_in)}."""
    w = list(grads)
    return SliceSet(
        weights=w,
        row_dot={k: (grads[k] * ref[k]).sum(2) for k in w}, row_sq={k: (grads[k] ** 2).sum(2) for k in w},
        col_dot={k: (grads[k] * ref[k]).sum(1) for k in w}, col_sq={k: (grads[k] ** 2).sum(1) for k in w},
        ref_row_sq={k: (ref[k] ** 2).sum(1) for k in w}, ref_col_sq={k: (ref[k] ** 2).sum(0) for k in w},
        n_ref=n_ref, in_ref=in_ref,
    )


def _brute_cos(g, r):
    """Rows then columns of g against r."""
    out = []
    for axis in (1, 0):
        num = (g * r).sum(axis)
        den = np.linalg.norm(g, axis=axis) * np.linalg.norm(r, axis=axis)
        out.append(np.where(den > 0, num / np.where(den > 0, den, 1), 0.0))
    return np.concatenate(out)


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    grads = {"a.weight": rng.normal(size=(7, 3, 4)), "b.weight": rng.normal(size=(7, 2, 5))}
    grads["a.weight"][6] = 0.0  # a pair whose gradient vanishes
    members = np.array([True, True, True, True, False, False, False])
    ref = {k: g[members].mean(0) for k, g in grads.items()}
    return grads, ref, members


def test_cosines_and_exact_leave_one_out(pairs):
    grads, ref, members = pairs
    s = _slice_set(grads, ref, n_ref=4, in_ref=members)
    cos, loo = s.cosines(), s.cosines(loo=True)
    assert cos.shape == (7, (3 + 4) + (2 + 5))
    for i in range(7):
        want = np.concatenate([_brute_cos(grads[k][i], ref[k]) for k in grads])
        np.testing.assert_allclose(cos[i], want, atol=1e-12)
        r_without = {k: (grads[k][members].sum(0) - grads[k][i]) / 3 if members[i] else ref[k] for k in grads}
        want_loo = np.concatenate([_brute_cos(grads[k][i], r_without[k]) for k in grads])
        np.testing.assert_allclose(loo[i], want_loo, atol=1e-9)
    assert (cos[6, :7] == 0).all()  # zero gradient: 0, never NaN
    groups, names = s.groups()
    assert names == ["a.weight:rows", "a.weight:cols", "b.weight:rows", "b.weight:cols"]
    assert np.bincount(groups).tolist() == [3, 4, 2, 5]


def test_mask_strategies_by_hand():
    delta = np.array([0.2, 0.05, -0.1, 0.01, 0.02, 0.03])
    groups = np.array([0, 0, 0, 1, 1, 1])
    pick = lambda mask: select_slices(delta, groups, mask, tau=0.1, q=0.5, min_keep=0.5).tolist()  # noqa: E731
    assert pick("tau") == [True, False, False, False, False, False]
    assert pick("tau_or_topq") == [True, False, False, False, True, True]  # group 1: its median and above
    assert pick("topq") == [True, True, False, False, True, True]
    assert pick("min_keep") == [True, True, False, False, True, True]  # 2 of 3 in each group
    with pytest.raises(ValueError, match="mask must be one of"):
        select_slices(delta, groups, "top", 0.1, 0.5, 0.5)


def test_score_is_the_mean_of_kept_cosines(pairs):
    grads, ref, members = pairs
    s = _slice_set(grads, ref, n_ref=4, in_ref=members)
    ref_members, ref_non = s.subset(members), s.subset(~members)
    audit = GradAudit(mask="topq", q=0.5).fit(ref_members, ref_non)
    cos, cos_loo = s.cosines(), s.cosines(loo=True)
    assert not np.allclose(cos[members], cos_loo[members]) and np.array_equal(cos[~members], cos_loo[~members])
    want_delta = cos[members].mean(0) - cos[~members].mean(0)  # the paper's fit: builders against the full R
    np.testing.assert_allclose(audit.delta_, want_delta)
    # scoring takes every pair that built R against R without it
    np.testing.assert_allclose(audit.score_samples(s), cos_loo[:, audit.keep_].mean(1))
    np.testing.assert_allclose(audit.score_samples(s.subset(~members)), cos[~members][:, audit.keep_].mean(1))
    assert sum(k for k, _ in audit.kept_.values()) == audit.keep_.sum()

    signed = GradAudit(mask="topq", q=0.5, signed=True).fit(ref_members, ref_non)
    chosen = signed.keep_
    np.testing.assert_allclose(signed.score_samples(s), (cos_loo[:, chosen] * np.sign(want_delta[chosen])).mean(1))

    loo = GradAudit(mask="topq", q=0.5, loo=True).fit(ref_members, ref_non)
    np.testing.assert_allclose(loo.delta_, cos_loo[members].mean(0) - cos_loo[~members].mean(0))
    np.testing.assert_allclose(loo.score_samples(s), cos_loo[:, loo.keep_].mean(1))


def test_errors(pairs):
    grads, ref, members = pairs
    s = _slice_set(grads, ref, n_ref=4, in_ref=members)
    with pytest.raises(ValueError, match="no slice passes"):
        GradAudit(mask="tau", tau=1.5).fit(s.subset(members), s.subset(~members))
    with pytest.raises(ValueError, match="call fit"):
        GradAudit().score_samples(s)
    with pytest.raises(ValueError, match="in_ref must have shape"):
        _slice_set(grads, ref, 4, members[:3])
    with pytest.raises(ValueError, match="at least 2 members"):
        _slice_set(grads, ref, 1, members).cosines(loo=True)


def test_concat_joins_pairs_scored_against_one_r(pairs):
    grads, ref, members = pairs
    s = _slice_set(grads, ref, n_ref=4, in_ref=members)
    s.extra = {"loss": np.arange(7.0)}
    joined = SliceSet.concat(s.subset(np.array([5, 0])), s.subset(np.array([3])))
    np.testing.assert_array_equal(joined.cosines(loo=True), s.subset(np.array([5, 0, 3])).cosines(loo=True))
    np.testing.assert_array_equal(joined.extra["loss"], [5.0, 0.0, 3.0])
    other = _slice_set(grads, {k: 2 * v for k, v in ref.items()}, n_ref=4, in_ref=members)
    with pytest.raises(ValueError, match="same R"):
        SliceSet.concat(s, other)
