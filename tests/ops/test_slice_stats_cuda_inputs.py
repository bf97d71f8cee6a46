"""On CUDA tensors too (pytest -m gpu), every backend takes inputs that require grad and weights with no
rows or columns; the CPU backends are tested the same way in test_slice_stats.py."""

import pytest
import torch

import gradaudit
from gradaudit import slice_stats

pytestmark = pytest.mark.gpu
BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_that_require_grad_give_the_same_statistics(backend):
    assert backend in gradaudit.available_backends("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, g = torch.randn(40, 48, device="cuda", generator=gen), torch.randn(40, 32, device="cuda", generator=gen)
    r, off = torch.randn(32, 48, device="cuda", generator=gen), torch.tensor([0, 3, 3, 40])
    plain = slice_stats(x, g, off, r, backend=backend)
    stats = slice_stats(*(t.clone().requires_grad_() for t in (x, g)), off, r.clone().requires_grad_(), backend=backend)
    for key in ("row_sq", "col_sq", "row_dot", "col_dot"):  # a kernel may add in another order from call to call
        torch.testing.assert_close(getattr(stats, key), getattr(plain, key), rtol=1e-5, atol=1e-6)
        assert not getattr(stats, key).requires_grad, key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_in,d_out", [(0, 3), (4, 0)])
def test_weights_without_rows_or_columns(backend, d_in, d_out):
    x, g = torch.randn(5, d_in, device="cuda"), torch.randn(5, d_out, device="cuda")
    stats = slice_stats(x, g, [0, 2, 5], torch.randn(d_out, d_in, device="cuda"), backend=backend)
    assert stats.row_sq.shape == (2, d_out) and stats.col_dot.shape == (2, d_in)
    assert not any(getattr(stats, k).any() for k in ("row_sq", "col_sq", "row_dot", "col_dot"))
