"""Capture engine: per-sample slice statistics of selected linear layers without weight gradients.

Every parameter is frozen; the hooks of ``gradaudit.grads.LayerHooks`` (the package's one hook
mechanism) make each selected layer's input require grad where nothing below it does, so backward
computes activation gradients only and stops below the lowest selected layer; they keep each selected
layer's input and receive Δ = ∂L/∂y in backward, where L = Σ_b L_b sums the per-sample mean text-token
losses, so that Δ restricted to sample b's positions is exactly ∂L_b/∂y. The pair is packed (padding dropped), reduced at once
(`slice_stats`, or Δᵀx into R in the reference pass) and freed.

Which positions belong to which sample depends on the layer's domain (language rows are samples with an
attention mask; vision and projector rows are images): the model family's
:class:`~gradaudit.models.Layout` says it per batch.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from gradaudit.capture.losses import TextRows, per_sample_text_loss, token_quantities
from gradaudit.errors import ModelError
from gradaudit.grads.hooks import LayerHooks, merge_calls
from gradaudit.models import Layout, Target
from gradaudit.ops import SliceStats, slice_stats
from gradaudit.schema import STAT_KEYS


def _backward(model, batch: dict, layout: Layout, targets, reduce, tokens: list | None = None) -> torch.Tensor:
    """One forward and backward of the summed per-sample losses; ``reduce(target, xs, grads)`` receives every
    call's input and output gradient of each target (``gradaudit.grads.LayerHooks``)."""
    inputs, labels, rows = _loss_inputs(model, batch, layout)
    by_name = {t.name: t for t in targets}
    with LayerHooks({t.name: t.module for t in targets}, lambda name, _, xs, grads: reduce(by_name[name], xs, grads)) as hooks:
        logits = model(**inputs).logits
        if tokens is not None:
            tokens.extend(token_quantities(logits, labels, rows))
        losses = per_sample_text_loss(logits, labels, rows)
        del logits
        if losses.requires_grad:  # False when no selected layer reaches the loss
            losses.sum().backward()
    missing = hooks.unreached()
    if missing:
        raise ModelError(f"selected layers received no gradient (they do not reach the loss): {', '.join(missing)}")
    return losses.detach()


def _loss_inputs(model, batch: dict, layout: Layout | None = None):
    """The model's inputs, the labels and their :class:`TextRows`, found before the forward (one wait on the
    device while it is idle, instead of one after the forward). Where the model takes ``logits_to_keep``,
    it computes logits only for the trailing positions that predict a text token: the output head's
    forward and backward and the loss then cover those positions, not the image's; the labels are trimmed
    alike, and ``layout`` told, so that a selected output head's inputs are packed from the same positions
    (the others carry no loss: their gradient there is zero)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    cpu = labels.cpu()
    predicts = (cpu[:, 1:] != -100).any(0).nonzero()
    keep = cpu.shape[1] - int(predicts[0]) if len(predicts) else 1  # from the first predicting position on
    if keep < cpu.shape[1] and _takes_logits_to_keep(model):
        inputs["logits_to_keep"] = keep
        labels, cpu = labels[:, -keep:], cpu[:, -keep:]
        if layout is not None:
            layout.tail = keep
    return inputs, labels, TextRows.of(labels, cpu)


def _takes_logits_to_keep(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes it through
    return _forward_takes_logits_to_keep(type(inner))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:  # once per model class, not per batch
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def reference_sums(model, batches: Iterable[tuple[dict, Layout]], targets: list[Target]):
    """Σ over samples of each target's per-sample gradient G_b (fp32, shaped like the weight) and the
    number of samples N. R = sums / N. One Δᵀx product per layer and batch: no per-sample work."""
    sums = {}  # on the device each layer runs on (a weight a device map keeps on disk is on meta between passes)
    count = 0
    for batch, layout in batches:
        def reduce(target, xs, grads):
            for x, grad in zip(xs, grads):  # Σ_b G_b: the calls of a layer simply add up
                x, grad, _ = layout.pack(target.domain, x, grad)
                part = grad.float().T @ x.float()
                sums[target.name] = sums[target.name] + part if target.name in sums else part

        _backward(model, batch, layout, targets, reduce)
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


def join_chunks(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The :meth:`BatchResult.tensors` of two consecutive parts of a batch as those of the whole batch."""
    out = {k: torch.cat([v, second[k]]) for k, v in first.items() if k != "token_offsets"}
    out["token_offsets"] = torch.cat([first["token_offsets"], second["token_offsets"][1:] + first["token_offsets"][-1]])
    return out


def batch_stats(model, batch: dict, layout: Layout, targets: list[Target], refs: dict | None = None, *,
                backend: str = "auto") -> BatchResult:
    """Per-sample slice statistics of every target for one batch, against ``refs[name]`` (R) if given,
    and the logit baselines' per-token quantities from the same forward pass (and, for an adapter, from
    its base model's)."""
    out: dict[str, SliceStats] = {}
    tokens: list = []

    def reduce(target, xs, grads):
        x, grad, offsets = merge_calls([layout.pack(target.domain, x, g) for x, g in zip(xs, grads)])
        ref = refs[target.name].to(x.device) if refs is not None else None  # a no-op but under a disk offload
        out[target.name] = slice_stats(x, grad.to(x.dtype), offsets, ref, backend=backend)

    base = _base_tokens(model, batch)
    losses = _backward(model, batch, layout, targets, reduce, tokens)
    return BatchResult(out, losses, *tokens, base_tokens=base)


@torch.no_grad()
def _base_tokens(model, batch: dict) -> torch.Tensor | None:
    """For a model with a PEFT adapter, the baselines' per-token quantities of its base model (the adapter
    switched off: one more forward pass, no backward), which a fine-tune's audit compares with the
    fine-tuned model's (DESIGN.md §2.5: target-minus-base features). None for any other model."""
    if not hasattr(model, "disable_adapter"):
        return None
    inputs, labels, rows = _loss_inputs(model, batch)
    # PEFT switches the adapter back on with requires_grad=True on its weights; the capture runs with
    # every weight frozen (no weight gradients), so the flags are put back as they were.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with model.disable_adapter():
            return token_quantities(model(**inputs).logits, labels, rows)[0]
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
