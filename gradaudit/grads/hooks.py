"""The one hook mechanism that sees a layer's input and output gradient in backward.

For every watched module, a forward hook keeps the input (detached) and puts a hook on the output
tensor, which receives Δ = ∂L/∂y in backward; ``on_grad(name, module, x, Δ)`` is called as soon as every
call's Δ of that module in this forward has arrived (``xs`` and ``grads`` as lists, one entry per call,
in forward order), and the kept inputs are freed at once.

A module whose weight does not require grad gets a forward pre-hook that makes its input require grad
where nothing below does, so backward reaches it while computing activation gradients only (no weight
gradient anywhere) and stops below the lowest watched layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

OnGrad = Callable[[str, nn.Module, list, list], None]


class LayerHooks:
    """Context manager: installs the hooks on ``modules`` ({name: module}) for forwards and backwards run
    inside it. ``on_grad(name, module, xs, grads)`` gets every call's input and output gradient of one
    module once the last of them has arrived."""

    def __init__(self, modules: Mapping[str, nn.Module], on_grad: OnGrad):
        self.modules = dict(modules)
        self.on_grad = on_grad
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.grads: dict[str, list] = {}
        self.handles = []

    def __enter__(self) -> LayerHooks:
        for name, module in self.modules.items():
            weight = getattr(module, "weight", None)
            if weight is None or not weight.requires_grad:
                self.handles.append(module.register_forward_pre_hook(_input_needs_grad))
            self.handles.append(module.register_forward_hook(self._keep_input(name)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False

    def _keep_input(self, name: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return  # under torch.no_grad, or nothing above needs this layer: no backward will come
            calls = self.inputs.setdefault(name, [])
            self.grads.setdefault(name, []).append(None)
            index = len(calls)
            calls.append(args[0].detach())
            output.register_hook(lambda grad: self._arrived(name, module, index, grad))

        return hook

    def _arrived(self, name: str, module: nn.Module, index: int, grad: torch.Tensor) -> None:
        grads = self.grads[name]
        grads[index] = grad.detach()
        if all(g is not None for g in grads):  # backward visits calls in reverse: the first call comes last
            xs = self.inputs.pop(name)
            self.grads.pop(name)
            self.on_grad(name, module, xs, grads)

    def unreached(self) -> list[str]:
        """Modules called in a forward whose output gradient has not (all) arrived: they do not reach the
        loss, or backward has not run yet."""
        return sorted(self.inputs)


def _input_needs_grad(module, args):
    x = args[0]
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad and torch.is_grad_enabled():
        return (x.detach().requires_grad_(True),) + tuple(args[1:])
    return None


def true_positions(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The flat indices of ``mask``'s true entries (row-major), on ``device``: rows of a (R0, R1, d) tensor
    reshaped to (R0·R1, d) are gathered with ``index_select`` without the device sync a boolean mask costs
    each time it indexes. Found once per mask (one sync)."""
    return mask.reshape(-1).nonzero().squeeze(1).to(device)


def merge_calls(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """One module called several times in a forward: its per-sample gradient sums over the calls, so each
    sample's packed rows of every call go together. ``parts``: (x, grad, offsets) per call, packed (offsets
    (B+1,) on the CPU); returns the same for all calls at once."""
    if len(parts) == 1:
        return parts[0]
    xs, grads, offsets = zip(*parts)
    counts = [o[1:] - o[:-1] for o in offsets]
    sample = torch.cat([torch.repeat_interleave(torch.arange(len(c)), c) for c in counts])
    order = torch.argsort(sample, stable=True).to(xs[0].device)
    merged = torch.zeros_like(offsets[0])
    merged[1:] = torch.cumsum(sum(counts), 0)
    return torch.cat(xs)[order], torch.cat(grads)[order], merged
