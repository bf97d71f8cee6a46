"""Which prompt format the model was trained in: the known members fit their training format best, so the
candidate formats are ranked by the members' mean text loss (forward passes only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradaudit.capture.losses import per_sample_text_loss
from gradaudit.errors import GradAuditError
from gradaudit.models import PromptFormat, encode_pairs
from gradaudit.models.formats import CHAT_TEMPLATE, PLAIN, chat_templated
from gradaudit.store.manifest import Pair


@dataclass(frozen=True)
class FormatFit:
    """One candidate format's fit to the known members: the mean per-pair text loss (nats per token),
    or why the format could not be applied to this model."""

    spec: str
    loss: float | None
    error: str | None = None


def candidates(processor, stated: list[str] | None = None) -> list[str]:
    """The formats worth comparing: the stated ones, the folder's chat template if it has one, plain."""
    out = list(stated or [])
    for spec in ([CHAT_TEMPLATE] if chat_templated(processor) else []) + [PLAIN]:
        if spec not in out:
            out.append(spec)
    return out


@torch.no_grad()
def rank_formats(model, processor, pairs: list[Pair], specs: list[str], batch_size: int = 8,
                 device: str = "cpu") -> list[FormatFit]:
    """Each format's mean text loss on ``pairs`` (known members), best first; formats this model cannot
    take come last with the reason."""
    images = [p.load_image() for p in pairs]
    fits = []
    for spec in specs:
        try:
            fmt, total = PromptFormat(spec), 0.0
            for s in range(0, len(pairs), batch_size):
                chunk = pairs[s:s + batch_size]
                batch = encode_pairs(model, processor, images[s:s + batch_size], [p.prompt for p in chunk],
                                     [p.text for p in chunk], fmt)
                labels = batch.pop("labels").to(device)
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                total += per_sample_text_loss(logits, labels).sum().item()
            fits.append(FormatFit(spec, total / len(pairs)))
        except GradAuditError as exc:
            fits.append(FormatFit(spec, None, str(exc)))
    return sorted(fits, key=lambda f: (f.loss is None, f.loss if f.loss is not None else 0.0))


def format_table(fits: list[FormatFit], stated: str | None = None) -> str:
    """The ranking as lines a person reads, the stated format marked."""
    rows = [f"  {'loss':>7}  format"]
    for f in fits:
        mark = "  <- stated" if f.spec == stated else ""
        value = f"{f.loss:7.3f}" if f.loss is not None else "    n/a"
        rows.append(f"  {value}  {f.spec!r}{mark}" + (f"  ({f.error})" if f.error else ""))
    return "\n".join(rows)


def check_formats(model_dir: str, manifest: str, stated: list[str] | None = None, *, adapter: str | None = None,
                  limit: int = 32, device: str = "cpu") -> list[FormatFit]:
    """:func:`rank_formats` on the first ``limit`` pairs of a manifest of known members."""
    from gradaudit.models import load_model
    from gradaudit.store.manifest import read_manifest

    model, processor = load_model(model_dir, adapter=adapter, device=device)
    pairs = read_manifest(manifest)[0][:limit]
    return rank_formats(model, processor, pairs, candidates(processor, stated), device=device)
