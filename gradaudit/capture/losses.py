"""The per-sample loss that capture differentiates, and the per-token quantities the logit baselines read,
both from the same forward pass (docs/data-and-runs.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradaudit.grads.hooks import true_positions


@dataclass(frozen=True)
class TextRows:
    """Where a batch's loss reads its logits: the positions that predict a text token (label ≠ -100 at
    the next position), found once per batch on the CPU so that no step after the forward waits on the
    device for them.

    ``index`` (N_text,) int64: flat positions b·L + t in the (B, L) grid of the logits, on the labels'
    device; ``target`` (N_text,): the label each predicts; ``offsets`` (B+1,) int64 on the CPU: sample
    b's rows are index[offsets[b]:offsets[b+1]]; ``counts`` (B,) float32 on the device.
    """

    index: torch.Tensor
    target: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def of(cls, labels: torch.Tensor, labels_cpu: torch.Tensor | None = None) -> TextRows:
        """From labels (B, L) aligned with the inputs; ``labels_cpu`` a CPU copy if one is at hand."""
        cpu = labels.cpu() if labels_cpu is None else labels_cpu
        predicts = torch.zeros(cpu.shape, dtype=torch.bool)
        predicts[:, :-1] = cpu[:, 1:] != -100
        per_sample = predicts.sum(1)
        offsets = torch.zeros(cpu.shape[0] + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(per_sample, 0)
        index = true_positions(predicts, labels.device)
        target = labels.reshape(-1).index_select(0, index + 1)  # position t predicts the label at t + 1
        return cls(index, target, offsets, per_sample.to(labels.device, torch.float32))

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows of logits (B, L, V) that predict text tokens, (N_text, V) float32: only these rows are
        converted, not the whole batch's logits."""
        return logits.reshape(-1, logits.shape[-1]).index_select(0, self.index).float()


def per_sample_text_loss(logits: torch.Tensor, labels: torch.Tensor, rows: TextRows | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy per sample over positions whose label is not -100.

    logits (B, L, V), labels (B, L) aligned with the inputs (shifted here); ``rows`` the batch's
    :class:`TextRows` if already found. Returns (B,) float32; a sample without text tokens gets 0 (and no
    gradient).
    """
    rows = TextRows.of(labels) if rows is None else rows
    nll = torch.nn.functional.cross_entropy(rows.logits(logits), rows.target, reduction="none")
    # back into the (B, L) grid, each position written once (deterministic, unlike a scattered add)
    grid = nll.new_zeros(labels.numel()).index_copy(0, rows.index, nll).view(labels.shape)
    return grid[:, :-1].sum(1) / rows.counts.clamp_min(1)


@torch.no_grad()
def token_quantities(logits: torch.Tensor, labels: torch.Tensor,
                     rows: TextRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the logit baselines need, per text token (docs/method.md, the baselines), from the same forward pass.

    For each position predicting a label ≠ -100: the label's log-probability; the mean and standard
    deviation of log p under p (Min-K%++); Rényi entropies of p at α = 0.5, 1, 2, ∞; the top-1 − top-2
    log-probability gap. Returns (values (N_text, 8) float32 in the order of gradaudit.schema.TOKEN_FIELDS,
    offsets (B+1,) int64 on the CPU), samples in batch order. ``rows``: the batch's :class:`TextRows` if
    already found.
    """
    rows = TextRows.of(labels) if rows is None else rows
    logp = torch.log_softmax(rows.logits(logits), dim=-1)  # (N, V)
    p = logp.exp()
    label = logp.gather(1, rows.target.unsqueeze(1)).squeeze(1)
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
    return values, rows.offsets
