"""Baselines on hand-computed cases."""

import math
import zlib

import numpy as np
import pytest

from gradaudit.audit.baselines import all_baselines, gradient_norm, token_baselines, zlib_ratio
from gradaudit.schema import TOKEN_FIELDS
from gradaudit.audit.method import SliceSet


def _tokens(rows):
    """rows: dicts of some fields per token; the rest 0."""
    out = np.zeros((len(rows), len(TOKEN_FIELDS)))
    for i, r in enumerate(rows):
        for k, v in r.items():
            out[i, TOKEN_FIELDS.index(k)] = v
    return out


def test_token_baselines_by_hand():
    # pair 0: five tokens, pair 1: two tokens
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0, -0.5, -0.1]
    mean = [-2.0] * 5 + [-1.0, -1.0]
    std = [1.0] * 5 + [0.5, 0.5]
    gap = [0.1, 0.2, 0.3, 0.4, 0.5, 1.0, 3.0]
    h1 = [0.5, 1.5, 2.5, 0.1, 0.2, 1.0, 2.0]
    rows = [dict(label_logp=a, mean_logp=b, std_logp=c, top_gap=d, renyi_1=e) for a, b, c, d, e in zip(lp, mean, std, gap, h1)]
    out = token_baselines(_tokens(rows), [0, 5, 7])
    assert out["loss"] == pytest.approx([-3.0, -0.3])
    assert out["min_k"] == pytest.approx([-5.0, -0.5])  # lowest ⌈20%⌉ = 1 token each
    assert out["min_k_plus_plus"] == pytest.approx([(-5.0 + 2.0) / 1.0, (-0.5 + 1.0) / 0.5])
    assert out["max_prob_gap"] == pytest.approx([0.3, 2.0])
    assert out["max_renyi_0_1"] == pytest.approx([-2.5, -2.0])  # the largest entropy, negated
    assert out["max_renyi_10_1"] == pytest.approx([-2.5, -2.0])  # ⌈10% of 5⌉ = 1 token
    assert out["max_renyi_100_1"] == pytest.approx([-np.mean(h1[:5]), -1.5])
    assert len([k for k in out if k.startswith("max_renyi_")]) == 12


def test_zlib_and_gradient_norm_and_errors():
    texts = ["aaaaaaaaaaaaaaaaaaaaaaaa", "a quick brown fox jumps"]
    z = zlib_ratio([-2.0, -2.0], texts)
    assert z == pytest.approx([-2.0 / len(zlib.compress(t.encode())) for t in texts])
    assert z[0] < z[1]  # the same loss on a more compressible text is less telling
    pairs = SliceSet(["w"], row_dot={"w": np.zeros((2, 2))}, row_sq={"w": np.array([[1.0, 3.0], [4.0, 12.0]])},
                     col_dot={"w": np.zeros((2, 1))}, col_sq={"w": np.array([[4.0], [16.0]])},
                     ref_row_sq={"w": np.ones(2)}, ref_col_sq={"w": np.ones(1)}, n_ref=2)
    assert gradient_norm(pairs) == pytest.approx([-math.log(2.0), -math.log(4.0)])
    tokens = _tokens([dict(label_logp=-1.0)] * 3)
    assert set(all_baselines(tokens, [0, 1, 3], ["x", "yy"], pairs)) >= {"loss", "zlib", "gradient_norm", "min_k"}
    with pytest.raises(ValueError, match="no text tokens"):
        token_baselines(tokens, [0, 0, 3])
    with pytest.raises(ValueError, match="2 scores but 1 texts"):
        zlib_ratio([1.0, 2.0], ["x"])
