"""slice_stats on every CPU backend (torch, cpp, triton through its interpreter) against float64."""

import os

import pytest
import torch

import gradaudit
from gradaudit import gram_is_cheaper, ref_slice_norms, slice_cosines, slice_stats, slice_stats_padded
from gradaudit.ops.backends import BY_NAME, resolve
from tests.reference import cosines_reference, dot_scales, slice_stats_reference

CPU_BACKENDS = ["torch", "cpp", "triton"]
KEYS = ("row_sq", "col_sq", "row_dot", "col_dot")


def _offsets(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int64)


def _inputs(lengths, d_in, d_out, dtype=torch.float32, ref=True, ref_dtype=torch.float32, scale=1.0, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    n = sum(lengths)
    x = (torch.randn(n, d_in, generator=gen) * scale).to(dtype)
    g = (torch.randn(n, d_out, generator=gen) * scale).to(dtype)
    r = torch.randn(d_out, d_in, generator=gen).to(ref_dtype) if ref else None
    return x, g, _offsets(lengths), r


def _check(stats, x, g, off, r=None, rtol=2e-5):
    """Per sample: ‖got − want‖ ≤ rtol·‖scale‖ against the float64 reference, and exactly zero where the
    reference is zero. The scale is the statistic itself for norms and Σ|terms| for dot products, whose
    sums may cancel to near zero."""
    expected = slice_stats_reference(x, g, off, r)
    scales = dot_scales(x, g, off, r) if r is not None else {}
    for key in KEYS:
        got = getattr(stats, key)
        if key not in expected:
            assert got is None, key
            continue
        want = expected[key]
        assert got.dtype == torch.float32 and tuple(got.shape) == tuple(want.shape), key
        got = got.double().cpu()
        assert torch.isfinite(got).all(), key
        scale = scales.get(key, want)
        for b in range(want.shape[0]):
            norm = scale[b].norm()
            err = (got[b] - want[b]).norm()
            assert err <= rtol * norm or (norm == 0 and err == 0), f"{key}[{b}]: |err| {err:.3e} vs scale {norm:.3e}"


def _dtypes(backend):
    # The interpreter mis-computes bf16 tl.dot (docs/kernels.md): bf16 runs in the GPU tests.
    return [torch.float32, torch.float16] if backend == "triton" else [torch.float32, torch.float16, torch.bfloat16]


def test_backends_are_built():
    found = gradaudit.available_backends("cpu")
    assert "torch" in found and "triton" in found
    if os.environ.get("GRADAUDIT_NO_EXT", "0") in ("", "0"):
        assert "cpp" in found, "gradaudit._C did not build: see the pip install output"
    assert found[0] == "cpp"  # auto picks the C++ extension on CPU tensors


SHAPES = [  # (lengths, d_in, d_out): odd sizes, empty and one-token samples, several tiles under the interpreter
    ([5], 1, 17),
    ([3, 0, 1, 9], 17, 1),
    ([1, 33, 0, 7, 20], 40, 33),
    ([2, 12, 30], 19, 37),
    ([4, 1, 21], 123, 17),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths,d_in,d_out", SHAPES)
@pytest.mark.parametrize("with_ref", [True, False])
def test_matches_float64_reference(backend, lengths, d_in, d_out, with_ref):
    for dtype in _dtypes(backend):
        for ref_dtype in ([torch.float32, dtype] if with_ref else [torch.float32]):
            x, g, off, r = _inputs(lengths, d_in, d_out, dtype, with_ref, ref_dtype)
            _check(slice_stats(x, g, off, r, backend=backend), x, g, off, r)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("d_in,d_out", [(1100, 37), (29, 1031), (300, 257)])
def test_large_dimensions(backend, d_in, d_out):
    x, g, off, r = _inputs([40, 0, 1, 300], d_in, d_out)
    _check(slice_stats(x, g, off, r, backend=backend), x, g, off, r)
    _check(slice_stats(x, g, off, backend=backend), x, g, off)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_of_64(backend):
    lengths = torch.randint(0, 9, (64,)).tolist()
    x, g, off, r = _inputs(lengths, 24, 20)
    _check(slice_stats(x, g, off, r, backend=backend), x, g, off, r)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gram_and_direct_routes_in_one_batch(backend):
    d_in, d_out = 48, 40  # Gram is cheaper below T = 48·40 / (2·88·slowdown) ≈ 10.9 / slowdown tokens
    lengths = [3, 40, 10, 11, 1]
    slow = BY_NAME[backend].gram_slowdown
    assert {gram_is_cheaper(n, d_in, d_out, slow) for n in lengths} == {True, False}
    x, g, off, _ = _inputs(lengths, d_in, d_out, ref=False)
    _check(slice_stats(x, g, off, backend=backend), x, g, off)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_inputs(backend):
    lengths, d_in, d_out = [7, 0, 13], 21, 18
    n = sum(lengths)
    x = torch.randn(d_in, 2 * n)[:, ::2].T  # strides (2, 2n)
    g = torch.randn(n, d_out + 5)[:, 3 : 3 + d_out]  # row stride d_out + 5
    r = torch.randn(d_in, d_out).T  # column-major
    assert not (x.is_contiguous() or g.is_contiguous() or r.is_contiguous())
    off = _offsets(lengths)
    _check(slice_stats(x, g, off, r, backend=backend), x, g, off, r)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_tiny_and_huge_magnitudes(backend, scale):
    x, g, off, r = _inputs([6, 11], 23, 19, scale=scale)
    _check(slice_stats(x, g, off, r, backend=backend), x, g, off, r)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_gradients_give_zero_statistics_and_cosines(backend):
    x, _, off, r = _inputs([4, 9], 20, 18)
    g = torch.zeros(x.shape[0], 18)
    stats = slice_stats(x, g, off, r, backend=backend)
    for key in KEYS:
        assert torch.equal(getattr(stats, key), torch.zeros_like(getattr(stats, key))), key
    row_cos, col_cos = slice_cosines(stats, *ref_slice_norms(r))
    assert torch.equal(row_cos, torch.zeros_like(row_cos)) and torch.equal(col_cos, torch.zeros_like(col_cos))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_and_column_norms_sum_to_the_gradient_norm(backend):
    x, g, off, _ = _inputs([8, 1, 25], 31, 26, ref=False)
    stats = slice_stats(x, g, off, backend=backend)
    want = torch.stack([(g[s:e].double().T @ x[s:e].double()).pow(2).sum() for s, e in [(0, 8), (8, 9), (9, 34)]])
    torch.testing.assert_close(stats.row_sq.double().sum(1), want, rtol=2e-5, atol=0)
    torch.testing.assert_close(stats.col_sq.double().sum(1), want, rtol=2e-5, atol=0)
    torch.testing.assert_close(stats.grad_sq().double(), want, rtol=2e-5, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bit_identical_when_repeated(backend):
    x, g, off, r = _inputs([9, 30, 2], 37, 29)
    a, b = slice_stats(x, g, off, r, backend=backend), slice_stats(x, g, off, r, backend=backend)
    for key in KEYS:
        assert torch.equal(getattr(a, key), getattr(b, key)), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_spoils_only_its_own_sample(backend, bad):
    x, g, off, r = _inputs([5, 7, 4], 19, 17)
    x[6, 3] = bad  # a token of sample 1
    stats = slice_stats(x, g, off, r, backend=backend)
    assert not torch.isfinite(stats.row_sq[1]).all()
    expected, scales = slice_stats_reference(x, g, off, r), dot_scales(x, g, off, r)
    for key in KEYS:
        got = getattr(stats, key).double()
        for b in (0, 2):
            scale = scales.get(key, expected[key])[b].norm()
            assert (got[b] - expected[key][b]).norm() <= 2e-5 * scale, (key, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padded_helper_equals_packed_call(backend):
    bsz, t, d_in, d_out = 4, 11, 17, 22
    x, g = torch.randn(bsz, t, d_in), torch.randn(bsz, t, d_out)
    mask = torch.zeros(bsz, t, dtype=torch.long)
    mask[0, :11] = 1  # full
    mask[1, 4:] = 1  # left padding
    mask[2, :3] = 1  # right padding
    mask[3, [1, 5, 6]] = 1  # scattered
    r = torch.randn(d_out, d_in)
    keep = mask.bool()
    packed = slice_stats(x[keep], g[keep], _offsets(mask.sum(1).tolist()), r, backend=backend)
    padded = slice_stats_padded(x, g, mask, r, backend=backend)
    for key in KEYS:
        assert torch.equal(getattr(packed, key), getattr(padded, key)), key
    _check(padded, x[keep], g[keep], _offsets(mask.sum(1).tolist()), r)


def test_cosines_match_reference_and_are_zero_for_zero_slices():
    x, g, off, r = _inputs([6, 0, 12], 15, 13)
    g[:6, 4] = 0.0  # row 4 of G_0 is zero
    r[:, 2] = 0.0  # column 2 of R is zero
    row_cos, col_cos = slice_cosines(slice_stats(x, g, off, r), *ref_slice_norms(r))
    want_row, want_col = cosines_reference(x, g, off, r)
    torch.testing.assert_close(row_cos.double(), want_row, rtol=0, atol=1e-5)
    torch.testing.assert_close(col_cos.double(), want_col, rtol=0, atol=1e-5)
    assert row_cos[0, 4] == 0 and (col_cos[:, 2] == 0).all() and (row_cos[1] == 0).all()
    assert not torch.isnan(row_cos).any() and not torch.isnan(col_cos).any()
    with pytest.raises(ValueError, match="ref=R"):
        slice_cosines(slice_stats(x, g, off), *ref_slice_norms(r))
    with pytest.raises(ValueError, match="ref_row_sq"):
        slice_cosines(slice_stats(x, g, off, r), torch.ones(3), torch.ones(15))


def test_offsets_default_to_one_sample_and_accept_lists():
    x, g, _, r = _inputs([10], 9, 8)
    one = slice_stats(x, g, ref=r)
    assert one.row_sq.shape == (1, 8)
    _check(one, x, g, [0, 10], r)
    assert torch.equal(slice_stats(x, g, [0, 4, 10]).row_sq, slice_stats(x, g, _offsets([4, 6])).row_sq)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    stats = slice_stats(torch.zeros(0, 5), torch.zeros(0, 3), [0], torch.zeros(3, 5), backend=backend)
    assert stats.row_sq.shape == (0, 3) and stats.col_dot.shape == (0, 5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.randn(4, 3, 1)), "x must be 2-D"),
        (dict(grad_out=torch.randn(5, 2)), r"grad_out must have shape \(N_tok=4"),
        (dict(grad_out=torch.randn(4, 2, dtype=torch.float64)), "grad_out must be float32"),
        (dict(grad_out=torch.randn(4, 2).half()), "same dtype"),
        (dict(offsets=[0, 3, 2, 4]), "non-decreasing"),
        (dict(offsets=[0, 2, 5]), "from 0 to N_tok=4"),
        (dict(offsets=[1, 4]), "from 0 to N_tok=4"),
        (dict(offsets=torch.tensor([[0, 4]])), "offsets must be 1-D"),
        (dict(offsets=torch.tensor([0.0, 4.0])), "offsets must be int64"),
        (dict(offsets=[0, 1.5, 4]), "offsets must be integers"),
        (dict(offsets=[0.0, 1.0, 4.0]), "offsets must be integers"),
        (dict(offsets=[0, None, 4]), "offsets must be a 1-D list or tensor of integers"),
        (dict(offsets=[0, 2**70]), "offsets must be a 1-D list or tensor of integers"),
        (dict(offsets="04"), "offsets must be a 1-D list or tensor of integers"),
        (dict(x=torch.randn(4, 3).to_sparse()), "x must be a dense"),
        (dict(ref=torch.randn(2, 3).to_sparse()), "ref must be a dense"),
        (dict(ref=torch.randn(3, 2)), r"ref must have shape \(d_out, d_in\) = \(2, 3\)"),
        (dict(ref=torch.randn(2, 3, dtype=torch.float64)), "ref must be float32"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(x=torch.randn(4, 3, device="meta")), "same device"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(x=torch.randn(4, 3), grad_out=torch.randn(4, 2), offsets=[0, 1, 4], ref=None, backend="auto")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        slice_stats(args.pop("x"), args.pop("grad_out"), args.pop("offsets"), args.pop("ref"), **args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_that_require_grad_give_the_same_statistics(backend):
    """Every backend takes inputs that require grad (a hook's tensors, a leaf being trained); the
    statistics are those of the values and carry no gradient."""
    x, g, off, r = _inputs([3, 0, 6], 11, 9, seed=5)
    plain = slice_stats(x, g, off, r, backend=backend)
    tracked = [t.clone().requires_grad_() for t in (x, g, r)]
    stats = slice_stats(*tracked[:2], off, tracked[2], backend=backend)
    for key in KEYS:
        assert torch.equal(getattr(stats, key), getattr(plain, key)) and not getattr(stats, key).requires_grad, key
    padded = slice_stats_padded(tracked[0][:6].reshape(2, 3, 11), tracked[1][:6].reshape(2, 3, 9),
                                torch.ones(2, 3), backend=backend)
    assert not padded.row_sq.requires_grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d_in,d_out", [(0, 3), (4, 0), (0, 0)])
def test_weights_without_rows_or_columns(backend, d_in, d_out):
    """A weight with no rows or columns has empty or zero statistics on every backend."""
    x, g, off, r = _inputs([2, 0, 3], d_in, d_out, seed=1)
    stats = slice_stats(x, g, off, r, backend=backend)
    assert stats.row_sq.shape == stats.row_dot.shape == (3, d_out) and stats.col_dot.shape == (3, d_in)
    for key in KEYS:
        assert not getattr(stats, key).any(), key


def test_padded_helper_checks_shapes():
    with pytest.raises(ValueError, match="x must be 3-D"):
        slice_stats_padded(torch.randn(3, 4), torch.randn(3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        slice_stats_padded(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.ones(2, 4))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_unavailable_backend_is_explained(backend):
    with pytest.raises(ValueError, match=f"backend='{backend}' is not available for meta tensors"):
        resolve(backend, torch.device("meta"))


def test_registered_as_a_custom_op_that_compiles():
    x, g, off, r = _inputs([3, 5], 7, 6)
    torch.library.opcheck(torch.ops.gradaudit.slice_stats.default, (x, g, off, r, "torch"))
    torch.library.opcheck(torch.ops.gradaudit.slice_stats.default, (x, g, off, None, "cpp"))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, g, off, r):
        s = slice_stats(x, g, off, r, backend="torch")
        return s.row_dot.sum() + s.col_sq.sum()

    want = slice_stats(x, g, off, r, backend="torch")
    torch.testing.assert_close(f(x, g, off, r), want.row_dot.sum() + want.col_sq.sum())


@pytest.mark.parametrize("config", [("triton", 16, 32, 16, 4, 1), ("triton", 32, 16, 8, 4, 1)])
def test_triton_direct_kernel_under_other_configurations(monkeypatch, config):
    """Tile shapes that the GPU tuner may pick compute the same statistics."""
    from gradaudit.kernels import slice_stats as ks

    monkeypatch.setattr(ks, "INTERPRET_CONFIG", config)
    x, g, off, r = _inputs([9, 0, 1, 30, 17], 37, 41)
    _check(slice_stats(x, g, off, r, backend="triton"), x, g, off, r)
