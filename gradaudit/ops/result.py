"""The result type of the slice-statistics primitive and the arithmetic that follows from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SliceStats:
    """Per-sample statistics of the rows and columns of G_b = grad_out[b]ᵀ x[b].

    All tensors are float32 on the device of the inputs.

    row_sq  (B, d_out): ‖G_b[i, :]‖²          col_sq  (B, d_in): ‖G_b[:, j]‖²
    row_dot (B, d_out): ⟨G_b[i, :], R[i, :]⟩   col_dot (B, d_in): ⟨G_b[:, j], R[:, j]⟩
    The ``*_dot`` fields are None when no reference R was given.
    """

    row_sq: torch.Tensor
    col_sq: torch.Tensor
    row_dot: torch.Tensor | None = None
    col_dot: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return self.row_sq.shape[0]

    def grad_sq(self) -> torch.Tensor:
        """‖G_b‖² per sample, (B,) float32 (= Σ_i row_sq = Σ_j col_sq)."""
        return self.row_sq.sum(dim=1)


def ref_slice_norms(ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms of the rows (d_out,) and columns (d_in,) of R (d_out, d_in), float32."""
    if ref.dim() != 2:
        raise ValueError(f"ref must be 2-D (d_out, d_in); got shape {tuple(ref.shape)}")
    r = ref.float()
    return (r * r).sum(dim=1), (r * r).sum(dim=0)


def _cosine(dot: torch.Tensor, g_sq: torch.Tensor, r_sq: torch.Tensor) -> torch.Tensor:
    denom = torch.sqrt(g_sq.clamp_min(0) * r_sq.clamp_min(0))
    safe = denom > 0
    cos = torch.where(safe, dot / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(dot))
    return cos.clamp_(-1.0, 1.0)


def slice_cosines(
    stats: SliceStats, ref_row_sq: torch.Tensor, ref_col_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of every row and column of G_b with the same slice of R.

    ``ref_row_sq`` (d_out,) and ``ref_col_sq`` (d_in,) are R's own squared slice norms
    (see :func:`ref_slice_norms`). Returns ``(row_cos (B, d_out), col_cos (B, d_in))`` float32,
    0 (never NaN) wherever either slice is zero, clamped to [-1, 1] against rounding.
    """
    if stats.row_dot is None or stats.col_dot is None:
        raise ValueError("slice_cosines needs statistics computed with ref=R (row_dot/col_dot are None)")
    d_out, d_in = stats.row_sq.shape[1], stats.col_sq.shape[1]
    if tuple(ref_row_sq.shape) != (d_out,) or tuple(ref_col_sq.shape) != (d_in,):
        raise ValueError(
            f"ref_row_sq must have shape ({d_out},) and ref_col_sq ({d_in},); "
            f"got {tuple(ref_row_sq.shape)} and {tuple(ref_col_sq.shape)}"
        )
    dev = stats.row_sq.device
    row = _cosine(stats.row_dot, stats.row_sq, ref_row_sq.to(dev, torch.float32)[None, :])
    col = _cosine(stats.col_dot, stats.col_sq, ref_col_sq.to(dev, torch.float32)[None, :])
    return row, col
