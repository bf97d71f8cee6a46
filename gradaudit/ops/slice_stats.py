"""The slice-statistics primitive: argument checks, the route per sample, and dispatch through the
backend table (``backends.py``).

For one weight matrix, B samples packed without padding (``offsets``, like ``cu_seqlens``), inputs
x (N_tok, d_in), output gradients grad_out (N_tok, d_out) and an optional reference R (d_out, d_in),
per sample b with G_b = grad_out[b]ᵀ x[b]::

    row_dot[b, i] = ⟨G_b[i, :], R[i, :]⟩      row_sq[b, i] = ‖G_b[i, :]‖²      (B, d_out)
    col_dot[b, j] = ⟨G_b[:, j], R[:, j]⟩      col_sq[b, j] = ‖G_b[:, j]‖²      (B, d_in)

G_b is never materialised by the ``triton`` and ``cpp`` backends. Results are float32 (docs/kernels.md).

Inputs that require grad are accepted on every backend: the statistics are computed from their values
(detached) and carry no gradient themselves.

Non-finite inputs: a NaN or infinity in sample b's rows of x or grad_out (or in R) makes some of
sample b's statistics non-finite, as the arithmetic dictates; the other samples' statistics are
unaffected. Nothing raises: check ``torch.isfinite`` on the results if that matters to you.
"""

from __future__ import annotations

import contextlib

import torch

from gradaudit.ops.backends import NAMES, resolve
from gradaudit.ops.result import SliceStats

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gram_is_cheaper(num_tokens: int, d_in: int, d_out: int, slowdown: float = 1.0) -> bool:
    """Whether the Gram route (≈4T²(d_in+d_out) FLOPs, each ``slowdown`` times as dear) beats the direct
    one (2T·d_in·d_out) for the norms of a sample of ``num_tokens`` tokens."""
    return 2 * slowdown * num_tokens * (d_in + d_out) < d_in * d_out


def _check_args(x, grad_out, offsets, ref) -> None:
    """Checks of shapes, dtypes and devices that need no look at the data."""
    for name, t, dims in (("x", x, "(N_tok, d_in)"), ("grad_out", grad_out, "(N_tok, d_out)")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape {dims}; got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D {dims}; got shape {tuple(t.shape)}")
        if t.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor; got layout {t.layout}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16; got {t.dtype}")
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(
            f"grad_out must have shape (N_tok={x.shape[0]}, d_out) like x's first dimension; "
            f"got {tuple(grad_out.shape)}"
        )
    if grad_out.dtype != x.dtype:
        raise ValueError(f"x and grad_out must have the same dtype; got {x.dtype} and {grad_out.dtype}")
    if grad_out.device != x.device:
        raise ValueError(f"x and grad_out must be on the same device; got {x.device} and {grad_out.device}")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be 1-D of length B+1 >= 1; got shape {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"offsets must be int64 (or int32); got {offsets.dtype}")
    if offsets.device.type != "cpu" and offsets.device != x.device:
        raise ValueError(f"offsets must be on the CPU or on x's device {x.device}; got {offsets.device}")
    if ref is not None:
        d_out, d_in = grad_out.shape[1], x.shape[1]
        if not isinstance(ref, torch.Tensor) or ref.dim() != 2 or tuple(ref.shape) != (d_out, d_in):
            shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ValueError(f"ref must have shape (d_out, d_in) = ({d_out}, {d_in}); got {shape}")
        if ref.dtype not in (torch.float32, x.dtype):
            raise ValueError(f"ref must be float32 or x's dtype {x.dtype}; got {ref.dtype}")
        if ref.device != x.device:
            raise ValueError(f"ref must be on x's device {x.device}; got {ref.device}")
        if ref.layout != torch.strided:
            raise ValueError(f"ref must be a dense (strided) tensor; got layout {ref.layout}")


def _check_offsets(bounds: list[int], num_tokens: int) -> None:
    if bounds[0] == 0 and bounds[-1] == num_tokens and bounds == sorted(bounds):
        return  # the common case, checked at C speed
    if bounds[0] != 0 or bounds[-1] != num_tokens:
        raise ValueError(
            f"offsets must run from 0 to N_tok={num_tokens}; got offsets[0]={bounds[0]}, "
            f"offsets[-1]={bounds[-1]}"
        )
    for b in range(len(bounds) - 1):
        if bounds[b + 1] < bounds[b]:
            raise ValueError(
                f"offsets must be non-decreasing; offsets[{b + 1}]={bounds[b + 1]} < offsets[{b}]={bounds[b]}"
            )


def _as_offsets(offsets) -> torch.Tensor:
    """``offsets`` as a tensor, refusing what would be truncated or cannot be read as integers."""
    if isinstance(offsets, torch.Tensor):
        return offsets
    try:
        tensor = torch.as_tensor(offsets)
    except (TypeError, ValueError, RuntimeError) as exc:  # None, strings, ragged lists, beyond int64
        raise ValueError(f"offsets must be a 1-D list or tensor of integers; got {offsets!r} ({exc})") from None
    if tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"offsets must be integers; got {offsets!r}, which would be truncated")
    return tensor


def _run(x, grad_out, offsets, ref, backend: str):
    """Checks the offsets' values, picks each sample's route and runs one backend; returns four tensors,
    the dots None without R. A weight with no rows or no columns takes the torch route whatever the
    backend: its statistics are empty or zero, and the compiled kernels need at least one of each."""
    bounds = offsets.tolist()
    _check_offsets(bounds, x.shape[0])
    chosen = resolve(backend, x.device)
    d_in, d_out = x.shape[1], grad_out.shape[1]
    if d_in == 0 or d_out == 0:
        chosen = resolve("torch", x.device)
    if ref is None:
        gram = [gram_is_cheaper(e - s, d_in, d_out, chosen.gram_slowdown) for s, e in zip(bounds[:-1], bounds[1:])]
    else:
        gram = [False] * (len(bounds) - 1)
    return chosen.runner()(x, grad_out, bounds, ref, gram)


@torch.library.custom_op("gradaudit::slice_stats", mutates_args=())
def _slice_stats_op(
    x: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, ref: torch.Tensor | None, backend: str
) -> list[torch.Tensor]:
    out = _run(x, grad_out, offsets, ref, backend)
    return [t if t._base is None else t.clone() for t in out if t is not None]  # outputs may not alias


@_slice_stats_op.register_fake
def _(x, grad_out, offsets, ref, backend):
    n_samples = offsets.shape[0] - 1
    shapes = [(n_samples, grad_out.shape[1]), (n_samples, x.shape[1])]
    if ref is not None:
        shapes += shapes
    return [x.new_empty(s, dtype=torch.float32) for s in shapes]


def slice_stats(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    offsets: torch.Tensor | list[int] | None = None,
    ref: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> SliceStats:
    """Per-sample row and column statistics of G_b = grad_out[b]ᵀ x[b], without materialising G_b.

    Args:
        x: (N_tok, d_in) layer inputs, float32, float16 or bfloat16, any strides, CPU or CUDA.
        grad_out: (N_tok, d_out) gradients at the layer's output, same dtype and device as x.
        offsets: (B+1,) int64 sample boundaries from 0 to N_tok, non-decreasing (a sample may have no
            tokens); on the CPU or x's device; a list of ints will do. None means one sample holding
            every token. Floats are refused, not truncated.
        ref: optional reference R (d_out, d_in), float32 or x's dtype, on x's device.
        backend: "auto" (fastest available), "triton", "cpp" or "torch".

    Returns:
        :class:`SliceStats` with row_sq, row_dot (B, d_out) and col_sq, col_dot (B, d_in), float32;
        row_dot and col_dot are None when ref is None. They carry no gradient, even when the inputs
        require grad (the statistics are computed from the inputs' detached values).
    """
    if offsets is None:
        n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() >= 1 else 0
        offsets = torch.tensor([0, n], dtype=torch.int64)
    offsets = _as_offsets(offsets)
    _check_args(x, grad_out, offsets, ref)
    # Backends that write into preallocated outputs (cpp) refuse inputs that require grad; none of
    # them is differentiable, so every backend sees the detached values.
    x, grad_out = x.detach(), grad_out.detach()
    ref = ref.detach() if ref is not None else None
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}; got {backend!r}")
    if offsets.dtype != torch.int64:
        offsets = offsets.to(torch.int64)
    # Under torch.compile the call goes through the registered op, so the graph can hold it. In eager
    # mode it calls the same implementation directly: the op layer costs 95–243 µs per call on an H200,
    # as much as the whole direct call at small shapes (benchmarks/results/dispatch_NVIDIA_H200.md).
    if torch.compiler.is_compiling():
        out = _slice_stats_op(x, grad_out, offsets, ref, backend)
    else:
        # a model split over GPUs (device_map) hands in tensors of any of them: kernels launch on x's
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            out = [t for t in _run(x, grad_out, offsets, ref, backend) if t is not None]
    return SliceStats(*out) if ref is not None else SliceStats(out[0], out[1])


def slice_stats_padded(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    attention_mask: torch.Tensor,
    ref: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> SliceStats:
    """:func:`slice_stats` for padded batches: x (B, T, d_in), grad_out (B, T, d_out), attention_mask (B, T).

    Positions where ``attention_mask`` is 0 are dropped (left, right or scattered padding alike);
    each row of the batch is one sample.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, T, d_in); got shape {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(grad_out, torch.Tensor) or grad_out.dim() != 3 or grad_out.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"grad_out must have shape (B, T, d_out) = ({x.shape[0]}, {x.shape[1]}, d_out); "
            f"got {tuple(getattr(grad_out, 'shape', ()))}"
        )
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"attention_mask must have shape (B, T) = {tuple(x.shape[:2])}; "
            f"got {tuple(getattr(attention_mask, 'shape', ()))}"
        )
    keep = attention_mask.to(device=x.device, dtype=torch.bool)
    lengths = keep.sum(dim=1).to(torch.int64)
    offsets = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(lengths, 0)
    return slice_stats(x[keep], grad_out[keep], offsets, ref, backend=backend)
