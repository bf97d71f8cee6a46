"""The collection audit on plain arrays (gradaudit.audit.collection): the split, the test's validity and
power on features with a known answer, the share, the blind guard. Its false-positive rate on the
embedded models is measured by benchmarks/eval_collection.py, not here."""

import numpy as np
import pytest

from gradaudit.audit.collection import (Features, audit_collection, blind_features, members_test, model_features,
                                        split, split_test, text_features)
from gradaudit.audit.method import SliceSet

NAMES = [f"f{i}" for i in range(30)]


def _features(rng, n, shift=0.0):
    x = rng.standard_normal((n, len(NAMES)))
    x[:, :4] += shift  # members differ a little in a few features
    return Features(NAMES, x)


def _ids(prefix, n):
    return [f"{prefix}{i}" for i in range(n)]


def test_split_is_exact_deterministic_and_order_free():
    ids = _ids("p", 101)
    fit = split(ids, 0.5, seed=3)
    assert fit.sum() == 50 and np.array_equal(fit, split(ids, 0.5, seed=3))
    order = np.random.default_rng(0).permutation(101)
    assert np.array_equal(split([ids[i] for i in order], 0.5, seed=3), fit[order])
    assert not np.array_equal(split(ids, 0.5, seed=4), fit)
    with pytest.raises(ValueError, match="fit_share"):
        split(ids, 1.0)


def test_null_collection_is_not_detected_and_a_used_one_is():
    rng = np.random.default_rng(0)
    v = _features(rng, 300)
    null = split_test(_features(rng, 200), v, _ids("s", 200), _ids("v", 300))
    assert null.p_value > 0.05 and null.design == "split collection"
    assert null.n_fit == {"collection": 100, "nonmembers": 150} and null.n_test == {"collection": 100, "nonmembers": 150}
    used = split_test(_features(rng, 200, 0.5), v, _ids("s", 200), _ids("v", 300))
    assert used.p_value < 1e-4 and used.auroc > 0.6
    assert {f["feature"] for f in used.features[:4]} & {"f0", "f1", "f2", "f3"}  # what carried it is named
    assert used.share["kind"] == "lower bound" and 0 < used.share["ci"][0] <= 1


def test_tested_pairs_never_reach_the_fit():
    """Changing the features of a tested pair changes that pair's score alone: the aggregator is a
    function of the fitting halves."""
    rng = np.random.default_rng(1)
    s, v = _features(rng, 60, 0.3), _features(rng, 80)
    ids_s, ids_v = _ids("s", 60), _ids("v", 80)
    first = split_test(s, v, ids_s, ids_v, with_share=False)
    tested = np.flatnonzero(~split(ids_s))
    s.values[tested[0]] += 5.0
    second = split_test(s, v, ids_s, ids_v, with_share=False)
    changed = first.scores["collection"] != second.scores["collection"]
    assert changed.sum() == 1 and changed[0]
    assert np.array_equal(first.scores["nonmembers"], second.scores["nonmembers"])


def _slices(rng, n, shift=0.0, extra_shift=0.0):
    """Slice statistics of n pairs on two small weights: a member's gradient leans towards R by ``shift``,
    its baselines by ``extra_shift``."""
    shapes = {"w1": (6, 5), "w2": (4, 4)}
    arrays = {"row_dot": {}, "row_sq": {}, "col_dot": {}, "col_sq": {}}
    for w, (d_out, d_in) in shapes.items():
        for axis, d in (("row", d_out), ("col", d_in)):
            sq = rng.gamma(4.0, 1.0, (n, d))
            arrays[f"{axis}_sq"][w] = sq
            arrays[f"{axis}_dot"][w] = np.sqrt(sq) * (rng.standard_normal((n, d)) + shift)
    extra = {"loss": rng.standard_normal(n) + extra_shift, "min_k_plus_plus": rng.standard_normal(n)}
    return SliceSet(list(shapes), **arrays, ref_row_sq={w: np.ones(d) for w, (d, _) in shapes.items()},
                    ref_col_sq={w: np.ones(d) for w, (_, d) in shapes.items()}, n_ref=50, extra=extra)


def test_known_members_test_the_whole_collection_against_held_out_nonmembers_and_give_the_share():
    from gradaudit.audit.per_pair import fit_reference

    rng = np.random.default_rng(2)
    m, v_fit, v_test = _slices(rng, 80, 0.3, 0.3), _slices(rng, 80), _slices(rng, 150)
    fit = fit_reference(m, v_fit, _ids("m", 80), _ids("f", 80), folds=3)
    half = SliceSet.concat(_slices(rng, 100, 0.3, 0.3), _slices(rng, 100))
    t = members_test(fit, half, _ids("s", 200), v_test, _ids("v", 150))
    assert t.design == "known members" and t.n_test == {"collection": 200, "nonmembers": 150, "members": 80}
    assert t.p_value < 1e-3 and t.share["kind"] == "estimate" and t.share["ci"][0] <= 0.5 <= t.share["ci"][1]
    assert t.features[0]["feature"].startswith(f"per-pair method '{fit.method}'")
    nobody = members_test(fit, _slices(rng, 200), _ids("s", 200), v_test, _ids("v", 150))
    assert nobody.p_value > 0.05 and nobody.share["ci"][0] < 0.3
    with pytest.raises(ValueError, match="reference pairs"):
        members_test(fit, half, _ids("m", 200), v_test, _ids("v", 150))


def test_blind_guard_fires_when_texts_differ_without_the_model():
    rng = np.random.default_rng(3)
    short = [" ".join(["red dot"] * int(k)) for k in rng.integers(2, 5, 200)]
    long = [" ".join(["a large blue circle on grey"] * int(k)) for k in rng.integers(2, 5, 300)]
    s_blind, v_blind = blind_features(short, None), blind_features(long, None)
    assert s_blind.names == ["text characters", "text words", "text zlib ratio", "text mean word length"]
    test = split_test(_features(rng, 200), _features(rng, 300), _ids("s", 200), _ids("v", 300))
    result = audit_collection(test, s_blind, v_blind, _ids("s", 200), _ids("v", 300))
    assert result.guard_fired and result.guard.p_value < 1e-10
    same = blind_features(long[:200], None)
    assert not audit_collection(test, same, v_blind, _ids("s", 200), _ids("v", 300)).guard_fired
    summary = result.summary()
    assert summary["blind_guard"]["fired"] and "share" not in summary["blind_guard"]


def test_features_refuse_nan_and_text_features_read_compressibility():
    with pytest.raises(ValueError, match=r"\['b'\]"):
        Features(["a", "b"], np.array([[1.0, np.nan]]))
    t = text_features(["aaaa aaaa aaaa aaaa", "the quick brown fox jumps", ""])
    assert t.shape == (3, 4) and t[0, 2] < t[1, 2] and t[2].tolist()[:2] == [0, 0]


def test_model_features_summarise_each_weight_axis():
    rng = np.random.default_rng(4)
    n, shapes = 5, {"w1": (3, 4), "w2": (2, 2)}
    arrays = {k: {w: rng.random((n, d_out if k.startswith("row") else d_in)) for w, (d_out, d_in) in shapes.items()}
              for k in ("row_dot", "row_sq", "col_dot", "col_sq")}
    pairs = SliceSet(list(shapes), **arrays, ref_row_sq={w: rng.random(d) + 1 for w, (d, _) in shapes.items()},
                     ref_col_sq={w: rng.random(d) + 1 for w, (_, d) in shapes.items()}, n_ref=10,
                     extra={"loss": rng.random(n)})
    f = model_features(pairs)
    assert f.names[0] == "baseline loss" and f.values.shape == (n, 1 + 4 * 2)
    assert "log norm w1:rows" in f.names and "cosine with R w2:cols" in f.names
    j = f.names.index("log norm w1:rows")
    assert np.allclose(f.values[:, j], 0.5 * np.log(arrays["row_sq"]["w1"]).mean(1))
