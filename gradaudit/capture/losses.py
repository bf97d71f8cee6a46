"""The per-sample loss that capture differentiates, and the per-token quantities the logit baselines read,
both from the same forward pass (docs/data-and-runs.md)."""

from __future__ import annotations

import torch


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
    """What the logit baselines need, per text token (docs/method.md, the baselines), from the same forward pass.

    For each position predicting a label ≠ -100: the label's log-probability; the mean and standard
    deviation of log p under p (Min-K%++); Rényi entropies of p at α = 0.5, 1, 2, ∞; the top-1 − top-2
    log-probability gap. Returns (values (N_text, 8) float32 in the order of gradaudit.schema.TOKEN_FIELDS,
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
