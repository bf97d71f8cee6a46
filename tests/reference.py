"""Naive, materialising float64 references, independent of every shipped backend."""

import torch


def slice_stats_reference(x, grad_out, offsets, ref=None):
    """Per sample, G_b = grad_out[b]ᵀ x[b] in float64, then its rows' and columns' statistics.

    Returns a dict of float64 CPU tensors row_sq, col_sq (and row_dot, col_dot with ref).
    """
    x64, g64 = x.detach().double().cpu(), grad_out.detach().double().cpu()
    r64 = ref.detach().double().cpu() if ref is not None else None
    bounds = [int(v) for v in offsets]
    out = {k: [] for k in ("row_sq", "col_sq", "row_dot", "col_dot")}
    for s, e in zip(bounds[:-1], bounds[1:]):
        g = g64[s:e].T @ x64[s:e]
        out["row_sq"].append((g**2).sum(1))
        out["col_sq"].append((g**2).sum(0))
        if r64 is not None:
            out["row_dot"].append((g * r64).sum(1))
            out["col_dot"].append((g * r64).sum(0))
    d_in, d_out = x.shape[1], grad_out.shape[1]
    empty = {"row_sq": (0, d_out), "col_sq": (0, d_in), "row_dot": (0, d_out), "col_dot": (0, d_in)}
    return {
        k: (torch.stack(v) if v else torch.zeros(empty[k], dtype=torch.float64))
        for k, v in out.items()
        if v or k in ("row_sq", "col_sq") or r64 is not None
    }


def dot_scales(x, grad_out, offsets, ref):
    """Σ_j |G_b[i, j] R[i, j]| per row and Σ_i |…| per column (float64): the size of the terms a dot
    product adds up, against which its rounding error is judged (the sum itself may cancel to ~0)."""
    x64, g64, r64 = x.detach().double().cpu(), grad_out.detach().double().cpu(), ref.detach().double().cpu().abs()
    bounds = [int(v) for v in offsets]
    rows, cols = [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        g = (g64[s:e].T @ x64[s:e]).abs()
        rows.append((g * r64).sum(1))
        cols.append((g * r64).sum(0))
    return {"row_dot": torch.stack(rows), "col_dot": torch.stack(cols)}


def cosines_reference(x, grad_out, offsets, ref):
    """Row and column cosines of each G_b with R in float64; 0 where either slice is zero."""
    x64, g64, r64 = x.double().cpu(), grad_out.double().cpu(), ref.double().cpu()
    bounds = [int(v) for v in offsets]
    rows, cols = [], []
    for s, e in zip(bounds[:-1], bounds[1:]):
        g = g64[s:e].T @ x64[s:e]
        for dim, acc in ((1, rows), (0, cols)):
            num = (g * r64).sum(dim)
            den = (g.norm(dim=dim) * r64.norm(dim=dim))
            acc.append(torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0))
    return torch.stack(rows), torch.stack(cols)
