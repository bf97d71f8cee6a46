"""Gradient inner products for data attribution (TracIn, Grad-Dot) without per-sample gradients.

TracIn (Pruthi et al., 2020) scores a training sample z against a test sample z' as
Σ_c η_c ⟨∇ℓ(z; θ_c), ∇ℓ(z'; θ_c)⟩ over checkpoints c. Tools such as dattri materialise every training
sample's gradient (``torch.func.vmap``) and usually project it to a few hundred dimensions. Here the test
gradients — few — are computed by ordinary backward and become the references of
:class:`gradaudit.grads.per_sample_grads`, so each training batch costs one forward, one backward and, per
covered layer and test sample, one GEMM: exact inner products, no per-sample gradient held.

``per_sample_loss(model, batch)`` returns the (B,) losses of a batch; ``bounds(batch)`` (optional) the
keyword arguments that say where each sample's positions are (``{"mask": ...}`` or
``{"cu_seqlens": ...}``); without it each layer's input's first dimension is the sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from gradaudit.grads import per_sample_grads


def sample_gradients(model: nn.Module, batches: Iterable, per_sample_loss: Callable, params: list[str]) -> list[dict]:
    """The gradient of each sample's own loss, {parameter name: tensor} per sample, by one backward each
    (for the few test samples whose gradients become references)."""
    named = dict(model.named_parameters())
    out = []
    for batch in batches:
        losses = per_sample_loss(model, batch)
        for b in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[b], [named[p] for p in params], retain_graph=b + 1 < losses.shape[0],
                                        allow_unused=True)
            out.append({p: (torch.zeros_like(named[p]) if g is None else g.detach()) for p, g in zip(params, grads)})
    return out


def gradient_dots(model: nn.Module, batches: Iterable, per_sample_loss: Callable, references: Mapping[str, Mapping],
                  bounds: Callable | None = None, backend: str = "auto") -> tuple[torch.Tensor, list[str]]:
    """(N, K) ⟨∇ℓ(z_n), reference_k⟩ over the covered parameters for every sample of ``batches``, and the
    parameters the dots leave out (not covered: embeddings, norms; see ``GradStats.uncovered``)."""
    names = list(references)
    rows, uncovered = [], []
    for batch in batches:
        with per_sample_grads(model, references=references, backend=backend, **(bounds(batch) if bounds else {})) as rec:
            per_sample_loss(model, batch).sum().backward()
        stats = rec.result()
        uncovered = stats.uncovered
        rows.append(torch.stack([stats.dot(k) for k in names], 1).cpu())
    model.zero_grad(set_to_none=True)
    return torch.cat(rows), uncovered


def tracin(model: nn.Module, checkpoints: list[Mapping[str, torch.Tensor]], weights: list[float],
           train_batches: Callable[[], Iterable], test_batches: Callable[[], Iterable], per_sample_loss: Callable,
           bounds: Callable | None = None, backend: str = "auto") -> torch.Tensor:
    """(N_train, N_test) TracIn scores: Σ_c weights[c] ⟨∇ℓ(train_n; θ_c), ∇ℓ(test_m; θ_c)⟩ over the
    covered parameters that require grad (``train_batches()`` and ``test_batches()`` give fresh iterables
    over the same samples, in order, for each checkpoint)."""
    if len(checkpoints) != len(weights):
        raise ValueError(f"{len(checkpoints)} checkpoints but {len(weights)} weights")
    total = None
    for state, weight in zip(checkpoints, weights):
        model.load_state_dict(state)
        with per_sample_grads(model) as probe:  # which parameters the statistics cover
            pass
        tests = sample_gradients(model, test_batches(), per_sample_loss, probe.covered)
        dots, _ = gradient_dots(model, train_batches(), per_sample_loss, {str(m): g for m, g in enumerate(tests)},
                                bounds, backend)
        total = weight * dots if total is None else total + weight * dots
    return total
