"""Qwen2-VL: every image's patches packed into one sequence, merged 2×2 before the language model."""

from __future__ import annotations

import torch

from gradaudit.errors import ModelError
from gradaudit.models.encoding import text_labels, text_parts
from gradaudit.models.formats import PromptFormat, label_span
from gradaudit.models.layout import Layout
from gradaudit.models.registry import Architecture, register, tower_projector_lm

DOMAINS = tower_projector_lm(r"^model\.visual\.blocks\.(\d+)\.", r"^model\.visual\.merger\.",
                             r"^model\.language_model\.layers\.(\d+)\.")


IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def encode(processor, images, prompts, texts, fmt: PromptFormat) -> dict:
    """Each pair as ``fmt`` has it, built from the processor's image processor and tokenizer (its video
    processor, which needs torchvision, is not used): image pads expanded to the merged patch count."""
    tok, images_proc = processor.tokenizer, processor.image_processor
    tok.padding_side = "right"
    pixels = images_proc(images=images, return_tensors="pt")
    merged = (pixels["image_grid_thw"].prod(-1) // images_proc.merge_size**2).tolist()
    heads, tails = text_parts(fmt, processor, prompts, texts, IMAGE, tok.eos_token or "")
    heads = [h.replace("<|image_pad|>", "<|image_pad|>" * n, 1) for h, n in zip(heads, merged)]
    batch = dict(tok([h + t + e for h, t, e in zip(heads, texts, tails)], return_tensors="pt", padding=True))
    batch.update(pixels)
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    batch["mm_token_type_ids"] = (batch["input_ids"] == image_token).long()
    return text_labels(batch, [label_span(tok, h, t) for h, t in zip(heads, texts)], [0] * len(heads))


def layout(batch: dict) -> Layout:
    """Vision rows are each image's patches in one packed sequence; the merger sees them merged 2×2."""
    n_samples = batch["input_ids"].shape[0]
    thw = batch["image_grid_thw"]
    if thw.shape[0] != n_samples:
        raise ModelError(f"one image per sample is supported; got {thw.shape[0]} images for {n_samples} samples")
    patches = thw.prod(-1).cpu()
    merged = (batch["mm_token_type_ids"] == 1).sum(1).cpu()  # merged image tokens per sample

    def spans(counts):
        return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts.to(torch.int64), 0)])

    return Layout(
        num_samples=n_samples,
        keep={"language": batch["attention_mask"].bool().cpu()},
        row_sample={"language": torch.arange(n_samples)},
        flat_offsets={"vision": spans(patches), "projector": spans(merged)},
    )


register(Architecture("qwen2_vl", DOMAINS, encode, layout))
