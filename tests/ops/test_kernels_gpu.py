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
    got = slice_stats(x, g, off, r, backend="triton")
    want = slice_stats_reference(x, g, bounds, r)
    plain = _plain_torch(x, g, bounds, r)
    for key in want:
        ours, theirs = _rel_err(getattr(got, key), want[key]), _rel_err(plain[key], want[key])
        assert ours <= max(2 * theirs, 1e-5), f"{key}: ours {ours:.2e}, plain {dtype} {theirs:.2e}"
        assert torch.isfinite(getattr(got, key)).all()
    empty = [b for b, n in enumerate(lengths) if n == 0]
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


# The Gluon kernel for Hopper (gradaudit/kernels/slice_stats_hopper.py). The tuner picks it only where it is
# faster, and GRADAUDIT_AUTOTUNE=0 (make test-gpu) takes the Triton kernel: these tests force it.
from gradaudit.kernels import slice_stats as ks  # noqa: E402
from gradaudit.kernels import slice_stats_hopper as hopper  # noqa: E402


@pytest.fixture
def force_config(monkeypatch):
    """``force_config(cfg)``: every direct-route call from now on runs in configuration ``cfg``."""

    def force(cfg):
        def tune(key, launch, options):
            assert cfg in options, f"{cfg} is not a candidate for {key}"
            return cfg

        monkeypatch.setattr(ks, "_chosen", {})
        monkeypatch.setattr(ks, "_tune", tune)

    return force


def _on_hopper():
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("cfg", hopper.CONFIGS)
@pytest.mark.parametrize(
    "lengths,d_in,d_out,dtype,ref_dtype",
    [([300, 0, 1, 77, 700], 1024, 1024, torch.bfloat16, torch.float32),
     ([5, 129, 64, 0, 33], 520, 1000, torch.bfloat16, torch.bfloat16),
     ([3], 2048, 64, torch.float16, torch.float32),
     ([40] * 37, 256, 4096, torch.float16, None)],
)
def test_hopper_kernel_error_at_most_twice_plain_pytorch(force_config, cfg, lengths, d_in, d_out, dtype, ref_dtype):
    """The ping-pong kernel: ragged samples, empty ones, a block past the last token, odd group sizes."""
    if not _on_hopper():
        pytest.fail("the Gluon kernel needs a Hopper GPU (sm_90); this card is not one")
    force_config(cfg)
    x, g, off, bounds, r = _case(lengths, d_in, d_out, dtype, ref_dtype is not None, seed=4)
    r = r.to(ref_dtype) if r is not None else None
    assert hopper.usable(x, g)
    got = slice_stats(x, g, off, r, backend="triton")
    want = slice_stats_reference(x, g, bounds, r)
    plain = _plain_torch(x, g, bounds, r)
    for key in want:
        ours, theirs = _rel_err(getattr(got, key), want[key]), _rel_err(plain[key], want[key])
        assert ours <= max(2 * theirs, 1e-5), f"{key}: ours {ours:.2e}, plain {dtype} {theirs:.2e}"
    empty = [b for b, n in enumerate(lengths) if n == 0]
    for key in want:
        assert (getattr(got, key)[empty] == 0).all()
    again = slice_stats(x, g, off, r, backend="triton")
    for key in want:
        assert torch.equal(getattr(got, key), getattr(again, key)), f"{key} not bit-identical when repeated"


@pytest.mark.parametrize("cfg", hopper.CONFIGS)
def test_hopper_kernel_keeps_a_non_finite_value_in_its_sample(force_config, cfg):
    """A NaN in one sample's x and an Inf in its Δ leave the samples on either side finite (the ping-pong
    kernel zeroes both operands' rows past a sample's end, so the next sample's values never mix in)."""
    force_config(cfg)
    x, g, off, _, r = _case([100, 50, 0, 70, 20], 1024, 512, torch.bfloat16, True, seed=5)
    x[120, 3] = float("nan")
    g[130, 5] = float("inf")  # both in sample 1 (tokens 100–149)
    got = slice_stats(x, g, off, r, backend="triton")
    for key in KEYS:
        finite = torch.isfinite(getattr(got, key)).all(dim=1).tolist()
        assert finite == [True, False, True, True, True], (key, finite)


def test_hopper_kernel_is_offered_only_for_inputs_it_can_read():
    x, g, *_ = _case([64, 64], 1024, 512, torch.bfloat16, False)
    assert (hopper.CONFIGS[0] in ks.candidates(x, g)) == _on_hopper()
    assert not hopper.usable(x.float(), g.float())  # fp32: the Triton kernel only
    assert not hopper.usable(x[:, 1:], g[:, 1:])  # rows not 16-byte aligned
    assert not hopper.usable(x[:, :127], g)  # a row of 254 bytes, here a view of aligned rows
    assert not hopper.usable(x[:, :127].contiguous(), g)  # and as its own tensor, a stride TMA cannot step
    assert not hopper.usable(x.T.contiguous().T, g)  # columns contiguous instead of rows
    assert ks.candidates(x.float(), g.float()) == ks.CONFIGS
