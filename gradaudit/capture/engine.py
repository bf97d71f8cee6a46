"""Capture engine: per-sample slice statistics of selected linear layers without weight gradients.

Every parameter is frozen; a forward pre-hook makes each selected layer's input require grad where
nothing below it does, so backward computes activation gradients only and stops below the lowest
selected layer. A forward hook keeps each selected layer's input; a hook on its output receives
Δ = ∂L/∂y in backward, where L = Σ_b L_b sums the per-sample mean text-token losses, so that Δ restricted
to sample b's positions is exactly ∂L_b/∂y. The pair is packed (padding dropped), reduced at once
(`slice_stats`, or Δᵀx into R in the reference pass) and freed.

Which positions belong to which sample depends on the layer's domain (language rows are samples with an
attention mask; vision and projector rows are images): the model family's
:class:`~gradaudit.models.Layout` says it per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from gradaudit.capture.losses import per_sample_text_loss, token_quantities
from gradaudit.errors import ModelError
from gradaudit.models import Layout, Target
from gradaudit.ops import SliceStats, slice_stats
from gradaudit.schema import STAT_KEYS


class _Hooks:
    """Installs the three hooks on every target for one forward/backward; calls ``reduce(target, x, Δ)``
    with the layer's input and output gradient as they arrive in backward."""

    def __init__(self, targets: Iterable[Target], reduce: Callable[[Target, torch.Tensor, torch.Tensor], None]):
        self.targets = list(targets)
        self.reduce = reduce
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.handles = []

    def __enter__(self):
        for t in self.targets:
            self.handles.append(t.module.register_forward_pre_hook(self._needs_grad))
            self.handles.append(t.module.register_forward_hook(self._keep_input(t)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False

    @staticmethod
    def _needs_grad(module, args):
        x = args[0]
        if not x.requires_grad:  # nothing below needs a gradient: start the graph here
            return (x.detach().requires_grad_(True),) + tuple(args[1:])
        return None

    def _keep_input(self, target: Target):
        def hook(module, args, output):
            self.pending.setdefault(target.name, []).append(args[0].detach())
            # backward visits a module's calls in reverse order, so Δ pairs with the last input kept
            output.register_hook(lambda grad: self._arrived(target, grad))

        return hook

    def _arrived(self, target: Target, grad: torch.Tensor):
        x = self.pending[target.name].pop()
        self.reduce(target, x, grad.detach())

    def unreached(self) -> list[str]:
        return [name for name, xs in self.pending.items() if xs]


def _backward(model, batch: dict, targets, reduce, tokens: list | None = None) -> torch.Tensor:
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with _Hooks(targets, reduce) as hooks:
        logits = model(**inputs).logits
        if tokens is not None:
            tokens.extend(token_quantities(logits, labels))
        losses = per_sample_text_loss(logits, labels)
        del logits
        if losses.requires_grad:  # False when no selected layer reaches the loss
            losses.sum().backward()
    missing = hooks.unreached()
    if missing:
        raise ModelError(f"selected layers received no gradient (they do not reach the loss): {', '.join(missing)}")
    return losses.detach()


def reference_sums(model, batches: Iterable[tuple[dict, Layout]], targets: list[Target]):
    """Σ over samples of each target's per-sample gradient G_b (fp32, shaped like the weight) and the
    number of samples N. R = sums / N. One Δᵀx product per layer and batch: no per-sample work."""
    sums = {t.name: torch.zeros_like(t.module.weight, dtype=torch.float32) for t in targets}
    count = 0
    for batch, layout in batches:
        def reduce(target, x, grad):
            x, grad, _ = layout.pack(target.domain, x, grad)
            sums[target.name] += grad.float().T @ x.float()

        _backward(model, batch, targets, reduce)
        count += layout.num_samples
    return sums, count


@dataclass
class BatchResult:
    """One batch's capture: slice statistics per weight (B rows each), per-sample losses (B,), and the
    per-token quantities of :func:`token_quantities` with their offsets."""

    stats: dict[str, SliceStats]
    losses: torch.Tensor
    tokens: torch.Tensor
    token_offsets: torch.Tensor
    base_tokens: torch.Tensor | None = None  # the same quantities under the base model (adapter off)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a run folder stores of the batch: "<weight>|<stat>" (B, d), "loss" (B,), "tokens"
        (N_text, 8), "token_offsets" (B+1,), and for an adapter "base_tokens" (N_text, 8), float32
        (offsets int64), on the CPU."""
        out = {"loss": self.losses.float().cpu(), "tokens": self.tokens.float().cpu(),
               "token_offsets": self.token_offsets.cpu()}
        if self.base_tokens is not None:
            out["base_tokens"] = self.base_tokens.float().cpu()
        for target, s in self.stats.items():
            for key in STAT_KEYS:
                value = getattr(s, key)
                if value is not None:
                    out[f"{target}|{key}"] = value.float().cpu()
        return out


def batch_stats(model, batch: dict, layout: Layout, targets: list[Target], refs: dict | None = None, *,
                backend: str = "auto") -> BatchResult:
    """Per-sample slice statistics of every target for one batch, against ``refs[name]`` (R) if given,
    and the logit baselines' per-token quantities from the same forward pass (and, for an adapter, from
    its base model's)."""
    out: dict[str, SliceStats] = {}
    tokens: list = []

    def reduce(target, x, grad):
        x, grad, offsets = layout.pack(target.domain, x, grad)
        ref = refs[target.name] if refs is not None else None
        out[target.name] = slice_stats(x, grad.to(x.dtype), offsets, ref, backend=backend)

    base = _base_tokens(model, batch)
    losses = _backward(model, batch, targets, reduce, tokens)
    return BatchResult(out, losses, *tokens, base_tokens=base)


@torch.no_grad()
def _base_tokens(model, batch: dict) -> torch.Tensor | None:
    """For a model with a PEFT adapter, the baselines' per-token quantities of its base model (the adapter
    switched off: one more forward pass, no backward), which a fine-tune's audit compares with the
    fine-tuned model's (DESIGN.md §2.5: target-minus-base features). None for any other model."""
    if not hasattr(model, "disable_adapter"):
        return None
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # PEFT switches the adapter back on with requires_grad=True on its weights; the capture runs with
    # every weight frozen (no weight gradients), so the flags are put back as they were.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with model.disable_adapter():
            return token_quantities(model(**inputs).logits, batch["labels"])[0]
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
