"""The compiled Triton kernels on a CUDA device (pytest -m gpu, on the GPU machine).

Last passed: see the GPU test record in README.md (date and card).
"""

import pytest
import torch

import gradaudit
from gradaudit import gram_is_cheaper, slice_stats
from gradaudit.ops.backends import BY_NAME
from tests.reference import slice_stats_reference

pytestmark = pytest.mark.gpu
KEYS = ("row_sq", "col_sq", "row_dot", "col_dot")


def _plain_torch(x, g, bounds, ref):
    """Plain PyTorch in the inputs' own dtype: G_b by matmul, reductions in that dtype."""
    out = {k: [] for k in KEYS}
    for s, e in zip(bounds[:-1], bounds[1:]):
        gb = g[s:e].T @ x[s:e]
        out["row_sq"].append((gb * gb).sum(1))
        out["col_sq"].append((gb * gb).sum(0))
        if ref is not None:
            r = ref.to(x.dtype)
            out["row_dot"].append((gb * r).sum(1))
            out["col_dot"].append((gb * r).sum(0))
    return {k: torch.stack(v) for k, v in out.items() if v}


def _rel_err(got, want):
    return ((got.double().cpu() - want).norm() / want.norm()).item()


def _case(lengths, d_in, d_out, dtype, with_ref, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = sum(lengths)
    x = torch.randn(n, d_in, device="cuda", generator=gen).to(dtype)
    g = torch.randn(n, d_out, device="cuda", generator=gen).to(dtype)
    r = torch.randn(d_out, d_in, device="cuda", generator=gen) if with_ref else None
    bounds = [0]
    for n_tok in lengths:
        bounds.append(bounds[-1] + n_tok)
    return x, g, torch.tensor(bounds, device="cuda"), bounds, r


def test_auto_picks_triton_on_cuda():
    assert gradaudit.available_backends("cuda")[0] == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize(
    "lengths,d_in,d_out",
    [([300, 0, 1, 77, 700], 1024, 1024), ([5, 129, 64], 300, 1100), ([17, 3, 1000], 4096, 127)],
)
def test_error_at_most_twice_plain_pytorch(dtype, with_ref, lengths, d_in, d_out):
    """The flash-attention rule: error against float64 at most 2× plain PyTorch's in the same dtype."""
    x, g, off, bounds, r = _case(lengths, d_in, d_out, dtype, with_ref)
    check_against_float64(slice_stats(x, g, off, r, backend="triton"), x, g, bounds, r)


def check_against_float64(got, x, g, bounds, r):
    """The flash-attention rule for every statistic of ``got``, all finite, and zeros for empty samples."""
    want = slice_stats_reference(x, g, bounds, r)
    plain = _plain_torch(x, g, bounds, r)
    for key in want:
        ours, theirs = _rel_err(getattr(got, key), want[key]), _rel_err(plain[key], want[key])
        assert ours <= max(2 * theirs, 1e-5), f"{key}: ours {ours:.2e}, plain {x.dtype} {theirs:.2e}"
        assert torch.isfinite(getattr(got, key)).all()
    empty = [b for b in range(len(bounds) - 1) if bounds[b + 1] == bounds[b]]
    for key in want:
        assert (getattr(got, key)[empty] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gram_route_matches_reference(dtype):
    d_in, d_out = 2048, 1024
    lengths = [16, 60, 70, 900, 1]  # Gram below 2048·1024 / (2·5·3072) ≈ 68.3 tokens on triton, direct above
    slow = BY_NAME["triton"].gram_slowdown
    assert [gram_is_cheaper(n, d_in, d_out, slow) for n in lengths] == [True, True, False, False, True]
    x, g, off, bounds, _ = _case(lengths, d_in, d_out, dtype, False, seed=1)
    got = slice_stats(x, g, off, backend="triton")
    want = slice_stats_reference(x, g, bounds)
    plain = _plain_torch(x, g, bounds, None)
    for key in want:
        ours, theirs = _rel_err(getattr(got, key), want[key]), _rel_err(plain[key], want[key])
        assert ours <= max(2 * theirs, 1e-5), f"{key}: ours {ours:.2e}, plain {theirs:.2e}"


def test_bit_identical_when_repeated():
    x, g, off, _, r = _case([256] * 8 + [31], 1024, 4096, torch.bfloat16, True, seed=2)
    a, b = slice_stats(x, g, off, r), slice_stats(x, g, off, r)
    for key in KEYS:
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_memory_stays_far_below_per_sample_gradients():
    n_samples, n_tok, d_in, d_out = 16, 256, 4096, 4096
    x, g, off, _, r = _case([n_tok] * n_samples, d_in, d_out, torch.bfloat16, True, seed=3)
    slice_stats(x, g, off, r)  # compile and tune first
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    slice_stats(x, g, off, r)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    per_sample_grads = n_samples * d_in * d_out * 4
    # partial sums: rows ⌈d_in/128⌉ and columns ⌈d_out/128⌉ per sample, for squares and dots: 1/32 with R
    assert extra <= per_sample_grads / 32 * 1.25, extra / per_sample_grads

