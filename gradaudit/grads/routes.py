"""Per-sample squared gradient norms and dots with a reference of one linear layer, each sample by its
cheapest route (DESIGN.md §3: FLOPs per sample of length T, G_b = Δ_bᵀ X_b of shape d_out × d_in):

- **Gram** (norms): ‖G_b‖² = ⟨X_b X_bᵀ, Δ_b Δ_bᵀ⟩, two T × T products: 2T²(d_in + d_out);
- **direct** (``slice_stats``, the fused kernel; norms, and dots with R in the same pass): 2T·d_in·d_out;
- **projection** (dots): ⟨G_b, R⟩ = Σ_t ⟨Δ_b[t], R X_b[t]⟩, one GEMM over the batch: 2T·d_in·d_out, but a
  plain cuBLAS GEMM with no per-sample epilogue.

Samples of one length go the Gram way when T(d_in + d_out) < s(T)·d_in·d_out (fewer Gram FLOPs than the
direct route's, counted at the direct kernel's measured rate s(T): ``direct_slowdown``), else direct,
their dots with R then coming from the same kernel pass. The total norm alone needs only the two Grams'
inner product, half of what ``slice_stats``' row and column norms by Gram cost, which is why this route
lives here and not in the primitive. Mixed lengths go to ``slice_stats``, whose own per-sample choice and
unpadded batching measured fastest there (the same benchmark).
"""

from __future__ import annotations

import torch

from gradaudit.ops import slice_stats


def direct_slowdown(t: int) -> float:
    """How many times dearer a FLOP of the fused direct kernel is than one of a cuBLAS Gram GEMM, by sample
    length: about 2 up to T = 1024, about 1 beyond (H100, bf16, Llama-1B and -7B layer shapes:
    benchmarks/results/grads_NVIDIA_H100_80GB_HBM3.md; the kernel nears cuBLAS's rate only on long samples)."""
    return 2.0 if t <= 1024 else 1.0


def gram_norm_is_cheaper(t: int, d_in: int, d_out: int) -> bool:
    """Whether a sample of ``t`` tokens gets its total squared norm cheaper by Gram than by the direct route."""
    return t * (d_in + d_out) < direct_slowdown(t) * d_in * d_out


def norms_and_dots(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, refs: list[torch.Tensor] = (),
                   backend: str = "auto") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-sample ‖G_b‖² (B,) and [⟨G_b, R⟩ (B,) for R in refs], float32, from packed x (N, d_in), grad
    (N, d_out) (same dtype) and offsets (B+1,) int64 — on the CPU, or it costs a device sync.

    Samples of one length (a padded batch without padding, or Opacus' view of one) go all one way: the
    Gram route as two batched GEMMs on views of x and grad (no copy) when it is cheaper, dots by
    projection; else the direct kernel, norms and the first R's dots in one pass. Samples of mixed
    lengths go to ``slice_stats``, which chooses per sample itself and batches them without padding."""
    cpu_offsets = offsets.cpu()
    lengths = cpu_offsets[1:] - cpu_offsets[:-1]
    b, t = len(lengths), int(lengths.max()) if len(lengths) else 0
    if b and t > 0 and bool((lengths == t).all()) and gram_norm_is_cheaper(t, x.shape[1], grad.shape[1]):
        x3, g3 = x.view(b, t, -1), grad.view(b, t, -1)
        # the product in the inputs' dtype, summed in float32: its rounding averages out over T² terms, and
        # it moves a third of the bytes of two float32 copies (the Gram route is memory-bound at short T)
        sq = (torch.bmm(x3, x3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2), dtype=torch.float32)
        return sq, [projection_dots(x, grad, lengths, r) for r in refs]
    stats = slice_stats(x, grad, cpu_offsets, refs[0] if refs else None, backend=backend)
    dots = [stats.row_dot.sum(1)] + [projection_dots(x, grad, lengths, r) for r in refs[1:]] if refs else []
    return stats.row_sq.sum(1), dots


def projection_dots(x: torch.Tensor, grad: torch.Tensor, lengths, ref: torch.Tensor) -> torch.Tensor:
    """(B,) ⟨G_b, R⟩ = Σ_t ⟨Δ_b[t], R X_b[t]⟩ of packed samples of ``lengths`` (a list or CPU tensor): one
    GEMM over their rows and a segment sum."""
    lengths = torch.as_tensor(lengths)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(x.device, non_blocking=True)
    per_token = (grad.float() * (x @ ref.to(x.dtype).T).float()).sum(1)
    return torch.zeros(len(lengths), device=x.device).index_add_(0, sample, per_token)
