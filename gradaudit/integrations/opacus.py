"""GradAudit as Opacus' per-sample gradient-norm sampler for ``nn.Linear`` (ghost clipping, Opacus ≥ 1.5).

Opacus' fast gradient clipping asks a *norm sampler* per layer type for each sample's gradient norm
from the layer's activations and backprops (``GradSampleModuleFastGradientClipping.NORM_SAMPLERS``,
filled by ``register_norm_sampler``). Its own ``nn.Linear`` sampler builds two B×T×T Gram tensors
(``einsum``), whatever T. This one takes the cheapest route (``gradaudit.grads.routes``: the Gram route
for short samples, else the fused direct kernel, which never holds a T×T or d_out×d_in tensor per
sample):

    from gradaudit.integrations.opacus import use_gradaudit_norms
    with use_gradaudit_norms():
        model, optimizer, criterion, loader = PrivacyEngine().make_private(..., grad_sample_mode="ghost")
        ...

Everything else — clipping, noise, accounting — stays Opacus'.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gradaudit.grads.routes import norms_and_dots


def linear_norm_sample(layer: nn.Linear, activations: list, backprops: torch.Tensor, backend: str = "auto") -> dict:
    """Per-sample gradient norms (B,) of ``layer.weight`` and ``layer.bias`` (those that require grad), from
    activations[0] (B, ..., d_in) and backprops (B, ..., d_out) as Opacus hands them over (batch first;
    every position of a row belongs to its sample). Norms in the backprops' dtype, as Opacus' own."""
    x = activations[0]
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    g = backprops.reshape(b, -1, backprops.shape[-1])
    dtype = backprops.dtype
    if g.dtype == torch.float64:
        g = g.float()
    x = x.to(g.dtype)  # as Opacus' own sampler does
    out = {}
    if layer.weight.requires_grad:
        t = x.shape[1]
        offsets = torch.arange(b + 1, dtype=torch.int64) * t
        sq, _ = norms_and_dots(x.reshape(b * t, -1), g.reshape(b * t, -1), offsets, backend=backend)
        out[layer.weight] = sq.clamp(min=0).sqrt().to(dtype)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.float().sum(1).norm(dim=1).to(dtype)
    return out


@contextlib.contextmanager
def use_gradaudit_norms(backend: str = "auto"):
    """Within the block, Opacus' ghost clipping computes ``nn.Linear`` per-sample norms with GradAudit;
    Opacus' own sampler is put back after it."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as GSM

    previous = GSM.NORM_SAMPLERS.get(nn.Linear)
    GSM.NORM_SAMPLERS[nn.Linear] = lambda layer, a, g: linear_norm_sample(layer, a, g, backend)
    try:
        yield
    finally:
        if previous is None:
            GSM.NORM_SAMPLERS.pop(nn.Linear, None)
        else:
            GSM.NORM_SAMPLERS[nn.Linear] = previous
