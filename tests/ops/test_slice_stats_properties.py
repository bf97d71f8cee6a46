"""Property: whatever arguments slice_stats is given, it returns statistics of the right shapes and values
or raises a ValueError that names the argument at fault — never a TypeError, RuntimeError or an error
from inside a backend."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradaudit import slice_stats
from gradaudit.ops.backends import NAMES
from tests.reference import slice_stats_reference

ARGUMENTS = ("x ", "x and grad_out", "grad_out ", "offsets ", "ref ", "backend ", "backend=")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]


@st.composite
def tensors(draw, rows, cols):
    """A tensor of about (rows, cols), sometimes of another shape, dtype or layout, or no tensor at all."""
    kind = draw(st.sampled_from(["fit"] * 14 + ["shape", "dtype", "1-D", "sparse", "list", "none"]))
    if kind == "none":
        return None
    if kind == "list":
        return [[1.0] * cols] * rows
    if kind == "shape":
        rows, cols = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    if kind == "1-D":
        return torch.randn(rows)
    dtype = draw(st.sampled_from(DTYPES)) if kind == "dtype" else torch.float32
    t = (torch.randn(rows, cols) * 3).to(dtype)
    if kind == "sparse":
        return t.to_sparse()
    if draw(st.booleans()) and t.is_floating_point():
        t.requires_grad_()
    return t


@st.composite
def offsets(draw, n_tok):
    """Sample boundaries: valid ones, unordered or out-of-range ints, floats, None entries, tensors of
    other dtypes or dimensions, or None."""
    cuts = sorted(draw(st.lists(st.integers(0, n_tok), max_size=4)))
    valid = [0, *cuts, n_tok]
    kind = draw(st.sampled_from(["list"] * 8 + ["tensor", "int32", "none", "shuffled", "ints", "float", "float tensor",
                                 "holes", "2-D", "huge", "empty", "bool"]))
    return {"list": lambda: valid, "tensor": lambda: torch.tensor(valid), "none": lambda: None,
            "int32": lambda: torch.tensor(valid, dtype=torch.int32),
            "shuffled": lambda: draw(st.permutations(valid)),
            "ints": lambda: draw(st.lists(st.integers(-3, n_tok + 3), max_size=5)),
            "float": lambda: [float(v) + draw(st.sampled_from([0.0, 0.5])) for v in valid],
            "float tensor": lambda: torch.tensor(valid, dtype=torch.float32),
            "holes": lambda: [0, None, n_tok], "2-D": lambda: torch.tensor([valid]),
            "huge": lambda: [0, 2**63 + 5], "empty": lambda: [], "bool": lambda: torch.tensor([False, True])}[kind]()


@st.composite
def arguments(draw):
    n_tok, d_in, d_out = draw(st.integers(0, 6)), draw(st.integers(0, 4)), draw(st.integers(0, 4))
    ref = draw(st.one_of(st.none(), tensors(d_out, d_in)))
    return dict(x=draw(tensors(n_tok, d_in)), grad_out=draw(tensors(n_tok, d_out)), offsets=draw(offsets(n_tok)),
                ref=ref, backend=draw(st.sampled_from([*NAMES * 3, "cuda", None])))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arguments())
def test_any_arguments_give_statistics_or_a_named_value_error(args):
    try:
        stats = slice_stats(**args)
    except ValueError as exc:
        assert str(exc).startswith(ARGUMENTS), f"the error names no argument: {exc}"
        return
    x, g, ref = args["x"], args["grad_out"], args["ref"]
    bounds = args["offsets"] if args["offsets"] is not None else [0, x.shape[0]]
    want = slice_stats_reference(x, g, torch.as_tensor(bounds).tolist(), ref)
    for key, value in want.items():
        got = getattr(stats, key)
        assert got.dtype == torch.float32 and got.shape == value.shape and not got.requires_grad, key
        if x.dtype == torch.float32:
            torch.testing.assert_close(got.double(), value, rtol=1e-4, atol=1e-4)
    assert (stats.row_dot is None) == (ref is None)

