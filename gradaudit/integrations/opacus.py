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

Ghost clipping runs two backward passes: the first for the per-sample norms, whose weight gradients are
computed and then discarded (``optimizer.zero_grad()``), the second, reweighted, for the update.
``use_gradaudit_norms(skip_discarded_weight_grads=True)`` asks autograd in the first pass only for what
the norms need — the gradients that reach the lowest trainable layers' outputs: every hook on the way
fires and no weight-gradient GEMM runs. The update is the same (tests/integrations/test_opacus.py).
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
def use_gradaudit_norms(backend: str = "auto", skip_discarded_weight_grads: bool = False):
    """Within the block, Opacus' ghost clipping computes ``nn.Linear`` per-sample norms with GradAudit;
    Opacus' own sampler is put back after it. ``skip_discarded_weight_grads``: the first of ghost clipping's
    two backward passes computes no weight gradients (:func:`first_backward_for_norms_only`)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as GSM

    previous = GSM.NORM_SAMPLERS.get(nn.Linear)
    GSM.NORM_SAMPLERS[nn.Linear] = lambda layer, a, g: linear_norm_sample(layer, a, g, backend)
    try:
        with first_backward_for_norms_only() if skip_discarded_weight_grads else contextlib.nullcontext():
            yield
    finally:
        if previous is None:
            GSM.NORM_SAMPLERS.pop(nn.Linear, None)
        else:
            GSM.NORM_SAMPLERS[nn.Linear] = previous


@contextlib.contextmanager
def first_backward_for_norms_only():
    """Within the block, the first backward pass of Opacus' ghost clipping (``DPTensorFastGradientClipping
    .backward``) computes only the gradients its norm hooks need, not the weight gradients it would discard.

    Each forward pass records its *roots*: the outputs of modules with trainable weights whose inputs need
    no gradient, and inputs that are leaves needing one. A trainable module reached from the loss on the way
    to a root has its backward hook run while no weight's gradient is on any path, so none is computed. A
    trainable module that such a pass would not reach (a leaf that needs a gradient entering through plain
    code, say) is caught, not skipped: each trainable module's output is watched, and the first pass raises
    naming the modules it did not reach — use ``skip_discarded_weight_grads=False`` there. The second pass
    is Opacus' own. A forward pass under gradients must be followed by its backward before the next."""
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping as DPTensor

    roots: list[torch.Tensor] = []
    watched: dict[int, str] = {}  # trainable modules called in this step: id -> class name
    reached: set[int] = set()
    first_pass = [False]

    def record(module, args, kwargs, output):
        if not torch.is_grad_enabled():
            return
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        roots.extend(a for a in inputs if a.is_leaf and a.requires_grad)  # any module's: frozen ones may sit between
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            return
        outputs = [o for o in (output if isinstance(output, (tuple, list)) else [output])
                   if isinstance(o, torch.Tensor) and o.requires_grad]
        if not any(a.requires_grad for a in inputs):
            roots.extend(outputs)
        if outputs:  # watched where the pass has something to reach
            watched[id(module)] = type(module).__name__
        for o in outputs:  # a tensor hook holds nothing; it only says that the first pass got here
            o.register_hook(lambda grad, key=id(module): reached.add(key) if first_pass[0] else None)

    original = DPTensor.backward

    def backward(self):
        # Opacus 1.6's DPTensorFastGradientClipping.backward, its first pass asking for the roots alone
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction = {self.loss_reduction}. Only 'sum' and 'mean' losses are supported")
        reduced = self.loss_per_sample.mean(0) if self.loss_reduction == "mean" else self.loss_per_sample.sum(0)
        needed = list({id(t): t for t in roots}.values())
        expected = dict(watched)
        roots.clear(), watched.clear(), reached.clear()
        if not needed:  # nothing recorded (a forward outside the block): Opacus' own two passes
            return original(self)
        first_pass[0] = True
        try:
            torch.autograd.grad(reduced, needed, retain_graph=True, allow_unused=True)
        finally:
            first_pass[0] = False
        missed = sorted({name for key, name in expected.items() if key not in reached})
        if missed:
            raise RuntimeError(f"the first backward pass for the norms alone did not reach trainable module(s) "
                               f"{missed}: their inputs' gradients come through a path it does not follow; run "
                               "with skip_discarded_weight_grads=False")
        self.optimizer.zero_grad()
        coeff = self.module.get_clipping_coef()
        second = torch.sum(coeff.to(self.loss_per_sample.device) * self.loss_per_sample)
        self.module.disable_hooks()
        second.backward()
        self.module.enable_hooks()

    handle = torch.nn.modules.module.register_module_forward_hook(record, with_kwargs=True)
    DPTensor.backward = backward
    try:
        yield
    finally:
        DPTensor.backward = original
        handle.remove()
        roots.clear(), watched.clear(), reached.clear()
