"""PaliGemma: LLaVA's weight names, its own prefix (image tokens + prompt) and suffix (the text)."""

from __future__ import annotations

from gradaudit.models.encoding import image_rows
from gradaudit.models.llava import TOWER_PROJECTOR_LM
from gradaudit.models.registry import Architecture, register


def encode(processor, images, prompts, texts) -> dict:
    """PaliGemma's own prefix (image tokens + prompt) and suffix (the text, which carries the labels)."""
    processor.tokenizer.padding_side = "right"
    return dict(processor(images=images, text=[f"<image>{p}" for p in prompts], suffix=list(texts),
                          return_tensors="pt", padding="longest"))


register(Architecture("paligemma", TOWER_PROJECTOR_LM, encode, image_rows))
