"""The plain PyTorch backend: one sample at a time, so memory stays at one d_out × d_in matrix."""

from __future__ import annotations

import torch


def slice_stats_torch(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    offsets: list[int],
    ref: torch.Tensor | None,
    gram: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row/column statistics in float32 by materialising one G_b at a time.

    x (N, d_in) and grad_out (N, d_out) in any float dtype, upcast per sample; ``offsets`` the B+1
    sample boundaries as Python ints; ``gram[b]`` asks for the Gram route for sample b (norms only,
    used only when ``ref`` is None). Returns (row_sq, col_sq, row_dot, col_dot).
    """
    n_samples = len(offsets) - 1
    d_in, d_out = x.shape[1], grad_out.shape[1]
    kw = dict(dtype=torch.float32, device=x.device)
    row_sq, col_sq = torch.zeros(n_samples, d_out, **kw), torch.zeros(n_samples, d_in, **kw)
    row_dot = torch.zeros(n_samples, d_out, **kw) if ref is not None else None
    col_dot = torch.zeros(n_samples, d_in, **kw) if ref is not None else None
    r = ref.float() if ref is not None else None
    for b in range(n_samples):
        s, e = offsets[b], offsets[b + 1]
        if e == s:
            continue
        xb, gb = x[s:e].float(), grad_out[s:e].float()
        if gram[b] and r is None:
            row_sq[b] = ((xb @ xb.T) @ gb * gb).sum(0)
            col_sq[b] = ((gb @ gb.T) @ xb * xb).sum(0)
            continue
        g = gb.T @ xb
        sq = g * g
        row_sq[b], col_sq[b] = sq.sum(1), sq.sum(0)
        if r is not None:
            gr = g * r
            row_dot[b], col_dot[b] = gr.sum(1), gr.sum(0)
    return row_sq, col_sq, row_dot, col_dot
