"""Capture engine: per-sample slice statistics of selected linear layers without weight gradients.

DESIGN.md §4. Every parameter is frozen; a forward pre-hook makes each selected layer's input require
grad where nothing below it does, so backward computes activation gradients only and stops below the
lowest selected layer. A forward hook keeps each selected layer's input; a hook on its output receives
Δ = ∂L/∂y in backward, where L = Σ_b L_b sums the per-sample mean text-token losses, so that Δ restricted
to sample b's positions is exactly ∂L_b/∂y. The pair is packed (padding dropped), reduced at once
(`slice_stats`, or Δᵀx into R in the reference pass) and freed.

Which positions belong to which sample depends on the layer's domain (language rows are samples with an
attention mask; vision and projector rows are images): :class:`Layout` says it per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from gradaudit.ops import slice_stats
from gradaudit.stats import SliceStats


@dataclass(frozen=True)
class Target:
    """A selected weight: its qualified parameter name, the module, and the domain of its inputs
    ("language", "vision" or "projector")."""

    name: str
    module: nn.Linear
    domain: str


@dataclass
class Layout:
    """Where each sample's positions are, per domain, for one batch.

    For layer inputs shaped (R0, R1, d): ``keep[domain]`` (R0, R1) bool marks real positions, or is None
    when every position is real (vision patches); ``row_sample[domain]`` (R0,) int64 gives the sample of
    each row, non-decreasing. For inputs already packed, (N, d) as in Qwen2-VL's vision tower:
    ``flat_offsets[domain]`` (B+1,) int64 gives each sample's span.
    """

    num_samples: int
    keep: dict[str, torch.Tensor | None] = field(default_factory=dict)
    row_sample: dict[str, torch.Tensor] = field(default_factory=dict)
    flat_offsets: dict[str, torch.Tensor] = field(default_factory=dict)
    _packing: dict = field(default_factory=dict, repr=False)  # per (domain, shape, device): mask, offsets

    def _plan(self, domain: str, shape: tuple, device):
        key = (domain, shape, device)
        if key not in self._packing:
            if domain not in self.keep:
                raise ValueError(f"the batch layout has no '{domain}' positions; known: {sorted(self.keep)}")
            keep = self.keep[domain]
            rows = self.row_sample[domain]
            if (keep is not None and tuple(keep.shape) != shape) or len(rows) != shape[0]:
                expected = tuple(keep.shape) if keep is not None else (len(rows), "any")
                raise ValueError(f"a {domain} layer saw input rows/positions {shape}, but the batch layout "
                                 f"expects {expected}")
            per_row = torch.full((shape[0],), shape[1]) if keep is None else keep.sum(1).cpu()
            counts = torch.zeros(self.num_samples, dtype=torch.int64).index_add_(0, rows.cpu(), per_row)
            offsets = torch.zeros(self.num_samples + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(counts, 0)
            mask = None if keep is None or bool(keep.all()) else keep.to(device)
            self._packing[key] = (mask, offsets)
        return self._packing[key]

    def pack(self, domain: str, x: torch.Tensor, grad: torch.Tensor):
        """Packs real positions of x (R0, R1, d_in) or (N, d_in) and grad alike: returns x, grad (N, d)
        and offsets (B+1,) int64 on the CPU."""
        if x.dim() == 2:
            offsets = self.flat_offsets.get(domain)
            if offsets is None or int(offsets[-1]) != x.shape[0]:
                raise ValueError(f"a {domain} layer saw {x.shape[0]} packed positions, but the batch layout "
                                 f"gives {'none' if offsets is None else int(offsets[-1])}")
            return x, grad, offsets
        mask, offsets = self._plan(domain, tuple(x.shape[:2]), x.device)
        if mask is None:
            return x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]), offsets
        return x[mask], grad[mask], offsets


def freeze(model: nn.Module) -> nn.Module:
    """Turns off weight gradients everywhere: backward then computes activation gradients only."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def per_sample_text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sample over positions whose label is not -100.

    logits (B, L, V), labels (B, L) aligned with the inputs (shifted here). Returns (B,) float32; a
    sample without text tokens gets 0 (and no gradient).
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    valid = target != -100
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.clamp_min(0).reshape(-1), reduction="none"
    ).view(target.shape)
    n_text = valid.sum(1)
    return (nll * valid).sum(1) / n_text.clamp_min(1)


@torch.no_grad()
def token_quantities(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the logit baselines need, per text token (DESIGN.md §4), from the same forward pass.

    For each position predicting a label ≠ -100: the label's log-probability; the mean and standard
    deviation of log p under p (Min-K%++); Rényi entropies of p at α = 0.5, 1, 2, ∞; the top-1 − top-2
    log-probability gap. Returns (values (N_text, 8) float32 in the order of gradaudit.stats.TOKEN_FIELDS,
    offsets (B+1,) int64 on the CPU), samples in batch order.
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    valid = target != -100
    logp = torch.log_softmax(logits[valid], dim=-1)  # (N, V)
    p = logp.exp()
    label = logp.gather(1, target[valid].unsqueeze(1)).squeeze(1)
    mean = (p * logp).sum(1)
    std = ((p * logp * logp).sum(1) - mean * mean).clamp_min(0).sqrt()
    top2 = logp.topk(2, dim=1).values
    values = torch.stack([
        label, mean, std,
        2 * torch.logsumexp(0.5 * logp, dim=1),  # α = 0.5: 1/(1-α) log Σ p^α
        -mean,  # α = 1: Shannon
        -torch.logsumexp(2 * logp, dim=1),  # α = 2
        -top2[:, 0],  # α = ∞
        top2[:, 0] - top2[:, 1],
    ], dim=1)
    offsets = torch.zeros(labels.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(valid.sum(1).cpu(), 0)
    return values, offsets


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
        raise ValueError(
            f"selected layers received no gradient (they do not reach the loss): {', '.join(missing)}; "
            "drop them from the selection"
        )
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


def batch_stats(model, batch: dict, layout: Layout, targets: list[Target], refs: dict | None = None, *,
                backend: str = "auto") -> BatchResult:
    """Per-sample slice statistics of every target for one batch, against ``refs[name]`` (R) if given,
    and the logit baselines' per-token quantities from the same forward pass."""
    out: dict[str, SliceStats] = {}
    tokens: list = []

    def reduce(target, x, grad):
        x, grad, offsets = layout.pack(target.domain, x, grad)
        ref = refs[target.name] if refs is not None else None
        out[target.name] = slice_stats(x, grad.to(x.dtype), offsets, ref, backend=backend)

    losses = _backward(model, batch, targets, reduce, tokens)
    return BatchResult(out, losses, *tokens)
