"""How pairs become a batch, shared by the families whose processors follow the chat-turn pattern, and
the layout of models that give every sample its own image rows."""

from __future__ import annotations

import torch

from gradaudit.errors import ModelError
from gradaudit.models.formats import PromptFormat, label_span
from gradaudit.models.layout import Layout


def image_rows(batch: dict) -> Layout:
    """Language rows are samples (padding masked); vision and projector rows are images, in sample order.

    ``pixel_values`` (B, 3, H, W) holds one image per sample; (B, N, 3, H, W) (Idefics3) up to N, an
    all-zero image being padding, which the model drops as this layout does.
    """
    n_samples = batch["input_ids"].shape[0]
    pixels = batch["pixel_values"]
    if pixels.dim() == 5:
        per_sample = (pixels != 0).flatten(2).any(-1).sum(1).cpu()
        rows = torch.repeat_interleave(torch.arange(n_samples), per_sample)
    elif pixels.shape[0] == n_samples:
        rows = torch.arange(n_samples)
    else:
        raise ModelError(f"this architecture's batches need one image per sample; got {pixels.shape[0]} images "
                         f"for {n_samples} samples")
    return Layout(
        num_samples=n_samples,
        keep={"language": batch["attention_mask"].bool().cpu(), "vision": None, "projector": None},
        row_sample={"language": torch.arange(n_samples), "vision": rows, "projector": rows},
    )


def text_parts(fmt: PromptFormat, processor, prompts, texts, image: str, end: str):
    """(heads, tails): what precedes and what ends each pair's text in format ``fmt``."""
    parts = [fmt.parts(processor, image, p, t, end) for p, t in zip(prompts, texts)]
    return [h for h, _ in parts], [t for _, t in parts]


def text_labels(batch: dict, spans, shifts) -> dict:
    """Labels = input ids on each sample's text tokens and the one token after them (the end token or end
    of turn); -100 elsewhere. ``spans[b]`` = [start, end) of the text in the tokenizer's ids of
    head + text, ``shifts[b]`` what the processor's image expansion adds before it."""
    labels = torch.full_like(batch["input_ids"], -100)
    length = batch["attention_mask"].sum(1)
    for b, ((start, end), shift) in enumerate(zip(spans, shifts)):
        stop = min(end + shift + 1, int(length[b]))
        labels[b, start + shift: stop] = batch["input_ids"][b, start + shift: stop]
    batch["labels"] = labels
    return batch


def encode_turns(processor, images, prompts, texts, fmt: PromptFormat, *, image: str = "<image>",
                 nest_images: bool = False) -> dict:
    """Each pair as ``fmt`` has it (head, text, tail), through the processor, which expands the image
    placeholder; the text and its end token alone carry labels. Right padding, so every sample keeps the
    positions it has alone. ``nest_images``: the processor takes a list of images per sample (Idefics3)."""
    tok = processor.tokenizer
    tok.padding_side = "right"
    heads, tails = text_parts(fmt, processor, prompts, texts, image, tok.eos_token or "")
    images = [[im] for im in images] if nest_images else images
    batch = dict(processor(images=images, text=[h + t + e for h, t, e in zip(heads, texts, tails)],
                           return_tensors="pt", padding=True))
    expanded = processor(images=images, text=heads, return_tensors="pt", padding=True)["attention_mask"].sum(1)
    shifts = [int(n) - len(tok(h)["input_ids"]) for n, h in zip(expanded, heads)]
    return text_labels(batch, [label_span(tok, h, t) for h, t in zip(heads, texts)], shifts)
