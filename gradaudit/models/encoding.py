"""How pairs become a batch, shared by the families whose processors follow the chat-turn pattern, and
the layout of models that give every sample its own image rows."""

from __future__ import annotations

import torch

from gradaudit.errors import ModelError
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


def chat_heads(templated, prompts, default: str) -> list[str]:
    """The user turn (an image, then the prompt) and the assistant's cue, through the chat template of
    ``templated`` (a processor or tokenizer) where it has one, else ``default`` formatted with the prompt."""
    if not getattr(templated, "chat_template", None):
        return [default.format(prompt=p) for p in prompts]
    return [templated.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
        add_generation_prompt=True, tokenize=False) for p in prompts]


def joined(heads, texts, end: str) -> list[str]:
    return [f"{h}{'' if h.endswith((' ', chr(10))) else ' '}{t}{end}" for h, t in zip(heads, texts)]


def text_labels(batch: dict, head_lens) -> dict:
    """Labels = input ids, -100 on padding and on each sample's first ``head_lens[b]`` positions."""
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for b, n in enumerate(head_lens):
        labels[b, : int(n)] = -100
    batch["labels"] = labels
    return batch


def encode_turns(processor, images, prompts, texts, *, default: str, nest_images: bool = False) -> dict:
    """The chat template's user turn (or ``default``), then the text and the end token, which alone carry
    labels; right padding, so every sample keeps the positions it has alone. ``nest_images``: the
    processor takes a list of images per sample (Idefics3)."""
    tok = processor.tokenizer
    tok.padding_side = "right"
    heads = chat_heads(processor, prompts, default)
    images = [[im] for im in images] if nest_images else images
    batch = dict(processor(images=images, text=joined(heads, texts, tok.eos_token), return_tensors="pt",
                           padding=True))
    return text_labels(batch, processor(images=images, text=heads, return_tensors="pt",
                                        padding=True)["attention_mask"].sum(1))
