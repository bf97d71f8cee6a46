"""Per-sample gradient statistics of the linear layers of any ``nn.Module``, from one backward of a summed
per-sample loss, without materialising per-sample gradients (DESIGN.md §3.1, docs/grads.md).

For a covered layer and sample b, with the sample's layer inputs X_b (T_b × d_in) and output gradients
Δ_b (T_b × d_out), the weight's per-sample gradient is G_b = Δ_bᵀ X_b and the bias's g_b = Σ_t Δ_b[t].
The statistics:

- ``sq_norm[b]`` = ‖G_b‖² (+ ‖g_b‖² in ``bias_sq_norm``) and ``dots[k][b]`` = ⟨G_b, R_k⟩ (+ ⟨g_b, r_k⟩)
  for each given reference gradient R_k, by the cheapest route (``routes.py``: samples of one length by
  the Gram route or the fused direct kernel, mixed lengths through ``slice_stats``, the projection for
  the dots the route does not give);
- on request, ``slices``: the row and column statistics of ``slice_stats`` (against one reference).

Covered: ``nn.Linear`` (PEFT's LoRA A and B matrices are ``nn.Linear`` modules, and are covered as such)
and transformers' ``Conv1D`` (weight stored d_in × d_out). Every other parameter in question — those that
require grad, or all of them when none does — is listed in ``GradStats.uncovered``, never dropped silently.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from gradaudit.grads.hooks import LayerHooks, merge_calls, true_positions
from gradaudit.grads.routes import norms_and_dots, projection_dots
from gradaudit.ops import SliceStats, slice_stats


@functools.cache
def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional here
        return None
    return Conv1D


def covered_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module whose per-sample gradient statistics this package computes, by qualified name."""
    conv1d = _conv1d_type()
    kinds = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _transposed(module: nn.Module) -> bool:
    """transformers' Conv1D stores its weight d_in × d_out (y = x W + b): its G_b is X_bᵀ Δ_b."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


@dataclass
class LayerStats:
    """One layer's per-sample statistics, float32 (B,) each: ``sq_norm`` = ‖G_b‖² of the weight, ``dots``
    = {reference: ⟨G_b, R⟩}; the bias's alike (None without a covered bias); ``slices`` (on request) the
    weight's row and column statistics in the weight's own layout (rows = its first dimension)."""

    sq_norm: torch.Tensor
    dots: dict[str, torch.Tensor] = field(default_factory=dict)
    bias_sq_norm: torch.Tensor | None = None
    bias_dots: dict[str, torch.Tensor] = field(default_factory=dict)
    slices: SliceStats | None = None


@dataclass
class GradStats:
    """Per-sample statistics of every covered layer of one backward (``layers``, by module name); the
    parameters in question that no layer covers (``uncovered``, by parameter name)."""

    num_samples: int
    layers: dict[str, LayerStats]
    uncovered: list[str]
    covered: list[str]  # the parameter names the statistics cover

    def sq_norm(self) -> torch.Tensor:
        """(B,) Σ over covered parameters of the per-sample squared gradient norm."""
        total = torch.zeros(self.num_samples)
        for s in self.layers.values():
            total = total.to(s.sq_norm.device) + s.sq_norm
            if s.bias_sq_norm is not None:
                total = total + s.bias_sq_norm
        return total

    def dot(self, reference: str) -> torch.Tensor:
        """(B,) Σ over covered parameters of ⟨per-sample gradient, the reference's gradient⟩."""
        total = torch.zeros(self.num_samples)
        for s in self.layers.values():
            total = total.to(s.sq_norm.device) + s.dots[reference]
            if reference in s.bias_dots:
                total = total + s.bias_dots[reference]
        return total


class per_sample_grads:
    """Context manager: per-sample gradient statistics of ``model``'s linear layers from the backward run
    inside it.

    ``loss`` must be the **sum** of per-sample losses (``loss_reduction="mean"`` for a batch mean: the
    statistics are then of B × the mean's gradient, i.e. of each sample's own loss).

    Sample boundaries, for every layer's input:
    - ``mask`` (B, T): inputs shaped (B, T, d) keep the positions where the mask is true (padding
      dropped: make sure the loss gives padding no gradient); inputs (B, T', d) with another T' (an encoder
      of another modality) and (B, d) belong to their row's sample whole;
    - ``cu_seqlens`` (B+1,): inputs packed as (N, d) or (1, N, d), sample b spanning
      ``cu_seqlens[b]:cu_seqlens[b+1]``;
    - neither: the input's first dimension is the sample.

    ``layers``: module names to cover (default: every covered module whose weight requires grad, or all of
    them when no parameter of the model requires grad: activation gradients only). ``references``:
    {reference name: {parameter name: gradient}}; each covered parameter missing from a reference is an
    error. ``slices``: also the row/column statistics, against reference ``slices`` if a name is given.

        with per_sample_grads(model, mask=batch["attention_mask"], references={"val": val_grad}) as rec:
            per_sample_loss(model(**batch), batch).sum().backward()
        stats = rec.result()          # stats.sq_norm(), stats.dot("val"), stats.layers[...]
    """

    def __init__(self, model: nn.Module, *, layers=None, references: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                 mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, slices: bool | str = False,
                 loss_reduction: str = "sum", backend: str = "auto"):
        if mask is not None and cu_seqlens is not None:
            raise ValueError("give mask (padded batches) or cu_seqlens (packed ones), not both")
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean'; got {loss_reduction!r}")
        self.model, self.backend, self.loss_reduction = model, backend, loss_reduction
        self.mask = None if mask is None else mask.bool()
        # tokens per sample on the CPU, known before any layer runs: no device sync per layer
        self.mask_counts = None if mask is None else self.mask.sum(1).cpu()
        self._mask_indices: dict[torch.device, torch.Tensor] = {}
        self.cu_seqlens = None if cu_seqlens is None else cu_seqlens.to(torch.int64).cpu()
        named = covered_modules(model)
        trainable = any(p.requires_grad for p in model.parameters())
        if layers is None:
            layers = [n for n, m in named.items() if not trainable or m.weight.requires_grad]
        unknown = [n for n in layers if n not in named]
        if unknown:
            raise ValueError(f"not covered layers (nn.Linear or Conv1D modules of the model): {unknown}")
        self.modules = {n: named[n] for n in layers}
        self.covered = [f"{n}.{p}" for n, m in self.modules.items() for p in ("weight", "bias")
                        if getattr(m, p, None) is not None and (not trainable or getattr(m, p).requires_grad)]
        in_question = [n for n, p in model.named_parameters() if p.requires_grad or not trainable]
        self.uncovered = sorted(set(in_question) - set(self.covered))
        self.references = {k: dict(v) for k, v in (references or {}).items()}
        for k, ref in self.references.items():
            missing = [n for n in self.covered if n not in ref]
            if missing:
                raise ValueError(f"reference {k!r} has no gradient for {missing}")
        if isinstance(slices, str) and slices not in self.references:
            raise ValueError(f"slices={slices!r} names no reference; known: {sorted(self.references)}")
        self.slices = slices
        self.layers: dict[str, LayerStats] = {}
        self.num_samples = None if self.mask is None else self.mask.shape[0]
        if self.cu_seqlens is not None:
            self.num_samples = len(self.cu_seqlens) - 1
        self.hooks = LayerHooks(self.modules, self._reduce)

    def __enter__(self) -> per_sample_grads:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        return self.hooks.__exit__(*exc)

    def result(self) -> GradStats:
        """The statistics of the backward run inside the context. Raises if a layer called in the forward
        received no gradient (it does not reach the loss)."""
        missing = self.hooks.unreached()
        if missing:
            raise RuntimeError(f"layers called in the forward received no gradient (do they reach the loss? "
                               f"was backward run?): {missing}")
        if self.num_samples is None:
            raise RuntimeError("no covered layer received a gradient: run forward and backward inside the context")
        return GradStats(self.num_samples, dict(self.layers), list(self.uncovered), list(self.covered))

    # -- packing and reduction ---------------------------------------------------------------------------

    def _pack(self, x: torch.Tensor, grad: torch.Tensor):
        """x (N, d_in), grad (N, d_out) of real positions, sample by sample, and each sample's row count
        (B,) on the CPU (known from the mask, cu_seqlens or shapes: no device sync)."""
        if self.cu_seqlens is not None:
            x, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
            if x.shape[0] != int(self.cu_seqlens[-1]):
                raise ValueError(f"a layer saw {x.shape[0]} packed positions; cu_seqlens gives {int(self.cu_seqlens[-1])}")
            return x, grad, self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        b = x.shape[0]
        if self.num_samples is None:
            self.num_samples = b
        if b != self.num_samples:
            raise ValueError(f"a layer's input has {b} rows; the batch has {self.num_samples} samples")
        if x.dim() == 2:
            return x, grad, torch.ones(b, dtype=torch.int64)
        x3, g3 = x.reshape(b, -1, x.shape[-1]), grad.reshape(b, -1, grad.shape[-1])
        if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
            index = self._mask_index(x.device)
            return (x3.reshape(-1, x.shape[-1]).index_select(0, index),
                    g3.reshape(-1, grad.shape[-1]).index_select(0, index), self.mask_counts)
        return (x3.reshape(-1, x.shape[-1]), g3.reshape(-1, grad.shape[-1]),
                torch.full((b,), x3.shape[1], dtype=torch.int64))

    def _mask_index(self, device: torch.device) -> torch.Tensor:
        """The mask's true positions on ``device``, found once for every layer (``true_positions``)."""
        if device not in self._mask_indices:
            self._mask_indices[device] = true_positions(self.mask, device)
        return self._mask_indices[device]

    def _reduce(self, name: str, module: nn.Module, xs: list, grads: list) -> None:
        parts = []
        for x, g in zip(xs, grads):
            x, g, counts = self._pack(x, g)
            parts.append((x, g, torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])))
        # calls of one module: each sample's rows together (G_b sums over the calls)
        x, grad, offsets = merge_calls(parts)
        counts = offsets[1:] - offsets[:-1]
        sample = torch.repeat_interleave(torch.arange(self.num_samples), counts).to(x.device, non_blocking=True)
        if self.loss_reduction == "mean":
            grad = grad * self.num_samples
        if _transposed(module):  # Conv1D: G_b = X_bᵀ Δ_b, which slice_stats computes with the roles swapped
            x, grad = grad, x
        if x.dtype == torch.float64:  # the statistics are float32 whatever the inputs (slice_stats' contract)
            x = x.float()
        grad = grad.to(x.dtype)
        weight_name, bias_name = f"{name}.weight", f"{name}.bias"
        out = LayerStats(sq_norm=torch.zeros(self.num_samples, device=x.device))
        if weight_name in self.covered:
            refs = {k: self._ref(k, weight_name).to(x.device, torch.float32) for k in self.references}
            if self.slices:  # rows and columns: the primitive, against the named reference; dots by projection
                stats = slice_stats(x, grad, offsets.to(x.device), refs.get(self.slices) if isinstance(self.slices, str) else None,
                                    backend=self.backend)
                out.sq_norm, out.slices = stats.row_sq.sum(1), stats
                out.dots = {k: projection_dots(x, grad, counts, r) for k, r in refs.items()}
            else:  # each sample by its cheapest route (grads.routes)
                out.sq_norm, dots = norms_and_dots(x, grad, offsets, list(refs.values()), backend=self.backend)
                out.dots = dict(zip(refs, dots))
        if bias_name in self.covered:
            bias_grad = grad if not _transposed(module) else x  # Δ, whichever side it sits on now
            g = torch.zeros(self.num_samples, bias_grad.shape[1], device=x.device).index_add_(0, sample, bias_grad.float())
            out.bias_sq_norm = (g * g).sum(1)
            for k in self.references:
                out.bias_dots[k] = g @ self.references[k][bias_name].to(x.device, torch.float32)
        self.layers[name] = out

    def _ref(self, reference: str, weight_name: str) -> torch.Tensor:
        return self.references[reference][weight_name]  # in the weight's layout, as the swap above computes G_b
